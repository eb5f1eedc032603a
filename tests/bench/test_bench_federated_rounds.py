"""bench/federated_rounds.py end to end on the tiny model: one round in Flower's simulation and the fresh process's
timing, the table printed. Its deployment runs are left out here to keep make test under 20 minutes: they are
LocalDeployment runs, which tests/federated/test_federated_deployment.py drives with the node worker (and whose
``keep-base-loaded=false`` ClientApp runs the same ``client.handle`` as the simulation)."""

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
                "--no-deployment"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| simulation", "| deployment"))]
    assert len(rows) == 1, out
    assert float(rows[0].split("|")[3]) > 0
    assert rows[0].rstrip().endswith("| 1.00x |")
    assert "A fresh process:" in out and "set-up" in out
