"""A node-local worker that keeps the frozen base model loaded across the messages of a deployment-mode run.

Flower 1.42's SuperNode starts a fresh ClientApp process for every message (``flwr-clientapp``, in both
isolation modes), so a client that loaded the base model in its ClientApp would load it every round. Instead
the ClientApp hands each message to this worker (``call``): one process per node and run, started by the first
message, reached over a Unix socket with an authentication key (``multiprocessing.connection``), running
``client.handle`` with the base model, data and mixture it set up once. Tensors travel as safetensors bytes.

The worker ends when its SuperNode does (it watches the SuperNode's process), after ``worker-idle-s`` seconds
without a message (node config; default 900), or when killed; the next message then starts a new one. Its log
is beside its socket in ``$TMPDIR/mixroute-<uid>/``. Node config ``keep-base-loaded=false`` turns it off (the
ClientApp then loads the base itself, per message). Written by hand because Flower has no long-running
ClientApp process in 1.42; ``multiprocessing.connection`` is the standard library's authenticated local IPC.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Optional

IDLE_S = 900.0
START_TIMEOUT_S = 600.0


def wanted(node: dict) -> bool:
    """Whether this process should hand its messages to a worker: it is a deployment-mode ClientApp process
    (started per message by a SuperNode) and the node config does not say ``keep-base-loaded=false``."""
    flag = str(node.get("keep-base-loaded", "true")).lower()
    return Path(sys.argv[0]).name == "flwr-clientapp" and flag not in ("false", "0", "no")


def paths(node_id: int, cfg_text: str) -> dict[str, Path]:
    """The worker's socket, key, lock and log files, per node and run config."""
    folder = Path(tempfile.gettempdir()) / f"mixroute-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    stem = f"node{node_id}-{hashlib.sha256(cfg_text.encode()).hexdigest()[:12]}"
    out = {s: folder / f"{stem}.{s}" for s in ("sock", "key", "lock", "log")}
    if len(str(out["sock"])) > 100:   # a Unix socket's path is limited to 107 bytes: a short folder of its own
        short = Path("/tmp") / f"mixroute-{os.getuid()}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
        short.mkdir(mode=0o700, exist_ok=True)
        out["sock"] = short / f"{hashlib.sha256(stem.encode()).hexdigest()[:16]}.sock"
    return out


def call(node_id: int, cfg_text: str, op: str, k: int, conf: dict, arrays: dict, node: dict) -> tuple:
    """``client.handle(op, ...)`` run by this node's worker (started if there is none): (arrays, metrics,
    config)."""
    from safetensors.torch import load, save

    p = paths(node_id, cfg_text)
    conn = _connect(p, cfg_text, node)
    try:
        conn.send({"op": op, "cfg": cfg_text, "k": k, "conf": conf, "node": node,
                   "arrays": save({n: t.contiguous() for n, t in arrays.items()}) if arrays else b""})
        reply = conn.recv()
    except EOFError:
        raise RuntimeError(f"the node's mixroute worker ended while handling a {op} message; its log: "
                           f"{p['log']}\n{_tail(p['log'])}") from None
    finally:
        conn.close()
    if not reply["ok"]:
        raise RuntimeError(f"the node's mixroute worker failed: {reply['error']}")
    return (load(reply["arrays"]) if reply["arrays"] else {}), reply["metrics"], reply["config"]


def _connect(p: dict[str, Path], cfg_text: str, node: dict) -> Any:
    with open(p["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one starter at a time
        conn = _try(p)
        if conn is not None:
            return conn
        p["sock"].unlink(missing_ok=True)
        p["key"].write_bytes(secrets.token_bytes(32))
        p["key"].chmod(0o600)
        idle = float(node.get("worker-idle-s", IDLE_S))
        with open(p["log"], "ab") as log:
            # no new session: the worker stays in the SuperNode's process group, and watches its SuperNode
            proc = subprocess.Popen([sys.executable, "-m", "mixroute.federated.worker", str(p["sock"]),
                                     "--key", str(p["key"]), "--parent-pid", str(_supernode_pid()),
                                     "--idle-s", str(idle)], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, close_fds=True)
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the mixroute worker exited with code {proc.returncode} while starting; its "
                                   f"log ({p['log']}):\n{_tail(p['log'])}")
            conn = _try(p)
            if conn is not None:
                return conn
            time.sleep(0.2)
        raise TimeoutError(f"the mixroute worker did not listen on {p['sock']} within {START_TIMEOUT_S:.0f} s")


def _try(p: dict[str, Path]) -> Optional[Any]:
    if not (p["sock"].exists() and p["key"].exists()):
        return None
    try:
        return Client(str(p["sock"]), family="AF_UNIX", authkey=p["key"].read_bytes())
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _supernode_pid() -> int:
    """The SuperNode behind this ClientApp process: its parent is Flower's SuperExec, whose parent is the
    SuperNode (the SuperExec itself exits with its SuperNode, so either will do; the nearer is safer)."""
    return os.getppid()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------ the worker process
def serve(sock: Path, key: bytes, parent_pid: int, idle_s: float) -> None:
    from flwr.supercore.app_utils import start_parent_process_monitor
    from safetensors.torch import load, save

    from mixroute.federated.client import handle, local_for

    start_parent_process_monitor(parent_pid)   # SIGINT here once the SuperNode side is gone
    last = [time.monotonic()]

    def watchdog() -> None:
        while time.monotonic() - last[0] < idle_s:
            time.sleep(min(5.0, idle_s))
        print(f"mixroute worker: idle for {idle_s:.0f} s, exiting", flush=True)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    with Listener(str(sock), family="AF_UNIX", authkey=key) as listener:
        print(f"mixroute worker: pid {os.getpid()} listening on {sock}", flush=True)
        while True:
            conn = listener.accept()
            last[0] = float("inf")   # busy: a long round is not idleness
            with conn:
                req = conn.recv()
                misses, t0 = local_for.cache_info().misses, time.perf_counter()
                try:
                    arrays = load(req["arrays"]) if req["arrays"] else {}
                    out, metrics, config = handle(req["op"], req["cfg"], req["k"], req["conf"], arrays, req["node"])
                    reply = {"ok": True, "arrays": save({n: t.contiguous() for n, t in out.items()}) if out else b"",
                             "metrics": metrics, "config": config}
                except Exception:
                    reply = {"ok": False, "error": traceback.format_exc()}
                if local_for.cache_info().misses > misses:
                    print(f"mixroute worker: loaded the base model and the run's data for partition {req['k']}",
                          flush=True)
                phase = f" {req['conf']['phase']}" if req["conf"].get("phase") else ""
                print(f"mixroute worker: {req['op']}{phase} round {req['conf'].get('round', '-')} in "
                      f"{time.perf_counter() - t0:.1f} s{'' if reply['ok'] else ' (failed)'} "
                      f"(ended {time.strftime('%H:%M:%S')})", flush=True)
                conn.send(reply)
            last[0] = time.monotonic()


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="mixroute's node-local worker for Flower deployment mode (started "
                                             "by the ClientApp; see mixroute.federated.worker)")
    ap.add_argument("sock", type=Path)
    ap.add_argument("--key", type=Path, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--idle-s", type=float, default=IDLE_S)
    a = ap.parse_args(argv)
    try:
        serve(a.sock, a.key.read_bytes(), a.parent_pid, a.idle_s)
    except KeyboardInterrupt:
        print("mixroute worker: the SuperNode is gone, exiting", flush=True)
    finally:
        a.sock.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
