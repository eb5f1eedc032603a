"""Deployment mode with real processes on 127.0.0.1: one ``flower-superlink`` and one ``flower-supernode`` per
client (node config ``partition-id`` / ``num-partitions``), the app submitted with ``flwr run deploy/flower``.
One run of 2 rounds: both SuperNodes train round 1, SuperNode 1 is killed after it; the run still finishes,
round 2 aggregates the survivor and logs the failure. Marked ``integration`` (runs in CI)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixroute import rundir

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """output_dir: {out}
model: {{name: tiny}}
data: {{path: null, synthetic_per_task: 24, max_length: 64, template: plain}}
train: {{method: lora_mixed, batch_size: 4, lr: 0.01}}
eval: {{max_eval: 2}}
federated: {{clients: 2, rounds: {rounds}, local_steps: 1, min_clients: 1, round_timeout: {timeout}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Started in their own sessions; stopped by process-group id (theirs only)."""

    def __init__(self, env: dict, logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        p = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=ROOT)
        self.procs[name] = p
        return p

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


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr")
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Processes(env, home)
    try:
        procs.start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                  "--disable-runtime-dependency-installation", "--port", str(port)])
        _wait_port(port)
        for k in range(2):
            procs.start(f"supernode{k}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                          f"127.0.0.1:{port}", "--port", str(free_port()),
                                          "--node-config", f"partition-id={k} num-partitions=2"])
        yield procs, env, home
    finally:
        procs.stop_all()


def _wait_port(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"SuperLink did not open port {port}")


def _submit(env: dict, home: Path, name: str, rounds: int, timeout: float) -> tuple[subprocess.Popen, Path]:
    out = home / name
    cfg = home / f"{name}.yaml"
    cfg.write_text(CONFIG.format(out=out, rounds=rounds, timeout=timeout))
    p = subprocess.Popen([str(BIN / "flwr"), "run", "deploy/flower", "local", "--stream", "--run-config",
                          f"config='{cfg}' run-dir='{out}'"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return p, out


def _wait_final(out: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not (rundir.final_dir(out) / "mixture.safetensors").is_file():
        time.sleep(1)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    assert (rundir.final_dir(out) / "mixture.safetensors").is_file(), proc.stdout.read() if proc.stdout else ""


def test_deployment_two_supernodes_then_one_killed(link):
    procs, env, home = link
    proc, out = _submit(env, home, "killed", rounds=2, timeout=25)
    end = time.monotonic() + 240
    while time.monotonic() < end and not rundir.read_rounds(out):
        time.sleep(0.5)
    assert rundir.read_rounds(out), "round 1 never finished"
    procs.kill("supernode1")
    _wait_final(out, proc, 300)
    rows = rundir.read_rounds(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["succeeded"] == [0, 1] and not rows[0]["failed"]   # both SuperNodes trained round 1
    assert rows[-1]["succeeded"] == [0] and rows[-1]["failed"][0]["client"] == 1
    assert rows[-1]["failed"][0]["reason"]
    assert rundir.load_run(out).mix is not None   # the run finished on the survivor and opens like any run
    print("failure reason:", rows[-1]["failed"][0]["reason"])
