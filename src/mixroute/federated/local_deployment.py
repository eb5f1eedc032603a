"""Flower's deployment mode on one machine: one ``flower-superlink`` and one ``flower-supernode`` per client on
127.0.0.1 (node config ``partition-id`` / ``num-partitions``), and ``flwr run deploy/flower`` to submit a run:
the commands of docs/federated.md "Deployment mode", as a context manager for the tests and bench/ (a real
deployment runs the same commands on its own machines).

    with LocalDeployment(home, clients=2) as dep:
        proc = dep.submit("configs/fed_lora_skew.yaml", "runs/fed_dep")
        ...

Every process starts in its own session and is stopped by its process-group id (its children, e.g. the
ClientApp processes a SuperNode starts and the node's mixroute worker, go with it). ``home/tmp`` is the
processes' TMPDIR: the workers' sockets and logs are under it (``worker_logs``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[3]   # the repository (deploy/flower lives there)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class LocalDeployment:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1; ``home`` holds FLWR_HOME and every process's log;
    ``node_config`` is added to every SuperNode's (e.g. ``keep-base-loaded=false``)."""

    def __init__(self, home: Path, clients: int, bin_dir: Optional[Path] = None, node_config: str = "") -> None:
        self.home, self.clients, self.node_config = Path(home), clients, node_config
        self.bin = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.port = free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.home),
                    # the SuperLink starts flower-superexec from PATH
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    # the nodes' mixroute workers keep their sockets and logs here (federated.worker)
                    "TMPDIR": str(self.home / "tmp")}
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "LocalDeployment":
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                               f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            self.start("superlink", [str(self.bin / "flower-superlink"), "--insecure",
                                     "--disable-runtime-dependency-installation", "--port", str(self.port)])
            wait_port(self.port)
            # the nodes share this machine's cores (node config threads) unless told otherwise
            threads = "" if "threads=" in self.node_config else f"threads={max(1, (os.cpu_count() or 1) // self.clients)}"
            for k in range(self.clients):
                node = f"partition-id={k} num-partitions={self.clients} {threads} {self.node_config}"
                self.start(f"supernode{k}", [str(self.bin / "flower-supernode"), "--insecure", "--superlink",
                                             f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                             "--node-config", " ".join(node.split())])
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with (self.home / f"{name}.log").open("w") as log:   # the child keeps its own copy of the descriptor
            p = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 cwd=ROOT)
        self.procs[name] = p
        return p

    def submit(self, config: str | Path, run_dir: str | Path, overrides: str = "") -> subprocess.Popen:
        """``flwr run deploy/flower local --stream`` with this run's config (its output streamed to the pipe)."""
        rc = f"config='{config}' run-dir='{run_dir}'" + (f" overrides='{overrides}'" if overrides else "")
        return subprocess.Popen([str(self.bin / "flwr"), "run", "deploy/flower", "local", "--stream",
                                 "--run-config", rc], env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def worker_logs(self) -> dict[int, str]:
        """{partition: log text} of the nodes' mixroute workers (``federated.worker``) so far."""
        out = {}
        for path in sorted((self.home / "tmp").glob("mixroute-*/*.log")):
            text = path.read_text(errors="replace")
            for line in text.splitlines():
                if "for partition " in line:
                    out[int(line.rsplit("for partition ", 1)[1].split()[0])] = text
                    break
        return out

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)
