"""Deployment mode with real processes on 127.0.0.1: one ``flower-superlink`` and one ``flower-supernode`` per
client (node config ``partition-id`` / ``num-partitions``), the app submitted with ``flwr run deploy/flower``.
One run of 2 rounds: both SuperNodes train round 1, SuperNode 1 is killed after it; the run still finishes,
round 2 aggregates the survivor and logs the failure. Marked ``integration`` (runs in CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mixroute import rundir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """output_dir: {out}
model: {{name: tiny}}
data: {{path: null, synthetic_per_task: 24, max_length: 64, template: plain}}
train: {{method: lora_mixed, batch_size: 4, lr: 0.01}}
eval: {{max_eval: 2}}
federated: {{clients: 2, rounds: {rounds}, local_steps: 1, min_clients: 1, round_timeout: {timeout}}}
"""


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    from mixroute.federated.local_deployment import LocalDeployment

    with LocalDeployment(tmp_path_factory.mktemp("flwr"), clients=2) as dep:
        yield dep


def _submit(dep, name: str, rounds: int, timeout: float) -> tuple[subprocess.Popen, Path]:
    out = dep.home / name
    cfg = dep.home / f"{name}.yaml"
    cfg.write_text(CONFIG.format(out=out, rounds=rounds, timeout=timeout))
    return dep.submit(cfg, out), out


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
    proc, out = _submit(link, "killed", rounds=2, timeout=25)
    end = time.monotonic() + 240
    while time.monotonic() < end and not rundir.read_rounds(out):
        time.sleep(0.5)
    assert rundir.read_rounds(out), "round 1 never finished"
    worker1 = int(link.worker_logs()[1].split("mixroute worker: pid ", 1)[1].split()[0])
    link.kill("supernode1")
    end = time.monotonic() + 30
    while time.monotonic() < end and _alive(worker1):
        time.sleep(0.5)
    assert not _alive(worker1), "the killed SuperNode's worker outlived it"
    _wait_final(out, proc, 300)
    rows = rundir.read_rounds(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["succeeded"] == [0, 1] and not rows[0]["failed"]   # both SuperNodes trained round 1
    assert rows[-1]["succeeded"] == [0] and rows[-1]["failed"][0]["client"] == 1
    assert rows[-1]["failed"][0]["reason"]
    assert rundir.load_run(out).mix is not None   # the run finished on the survivor and opens like any run
    # the surviving node loaded the base model once, in its worker, and handled every message there
    log0 = link.worker_logs()[0]
    assert log0.count("loaded the base model") == 1, log0
    assert log0.count("mixroute worker: train") == 2 and log0.count("mixroute worker: query") == 1, log0
    print("failure reason:", rows[-1]["failed"][0]["reason"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead too
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
