"""bench/federated_rounds.py end to end on the tiny model: one round in Flower's simulation and one in deployment
mode (a real SuperLink and two SuperNodes) with and without the node worker, all finished, the table printed
with a ratio for each mode."""

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
    bench.main(["--model", "tiny", "--rounds", "1", "--work", str(tmp_path / "work"), "--timeout", "600"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| simulation", "| deployment"))]
    assert len(rows) == 3, out
    sim, dep, per_message = (float(r.split("|")[3]) for r in rows)
    assert sim > 0 and dep > 0 and per_message > 0
    assert "node worker" in rows[1] and "keep-base-loaded=false" in rows[2]
    assert rows[0].rstrip().endswith("| 1.00x |")
    assert "A fresh process:" in out and "set-up" in out
