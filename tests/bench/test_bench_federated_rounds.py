"""bench/federated_rounds.py end to end on the tiny model: one round in Flower's simulation and one in deployment
mode (a real SuperLink and two SuperNodes, with the node worker), both finished, the table printed with a ratio
for each mode. The run without the worker (``keep-base-loaded=false``) is skipped here to keep make test short:
its ClientApp calls the same ``client.handle`` the simulation runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]   # real Flower processes: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]


def test_federated_rounds_tiny(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    bench = importlib.import_module("federated_rounds")
    bench.main(["--model", "tiny", "--rounds", "1", "--work", str(tmp_path / "work"), "--timeout", "600",
                "--no-per-message"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| simulation", "| deployment"))]
    assert len(rows) == 2, out
    sim, dep = (float(r.split("|")[3]) for r in rows)
    assert sim > 0 and dep > 0
    assert "node worker" in rows[1]
    assert rows[0].rstrip().endswith("| 1.00x |")
    assert "A fresh process:" in out and "set-up" in out
