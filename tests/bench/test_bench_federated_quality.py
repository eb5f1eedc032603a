"""bench/quality_federated.py's conclusions from hand-made rows: paired intervals pooled over seeds, federated
against central, and the gap along sparsity, as findings (the full run is hours; its smoke is in the docstring)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("quality_federated")


def _eval(nll: list[float]) -> dict:
    n = len(nll)
    return {"perplexity": {"average": 1.0, "per_category": {"x": 1.0}},
            "per_example": {"nll": nll, "tokens": [10] * n, "task_ids": [i % 2 for i in range(n)]}}


def _row(setting, method, seed, fed, central):
    return {"setting": setting, "method": method, "seed": seed, "sweep": {}, "lr": 0.1,
            "federated": _eval(fed), "central": _eval(central), "bytes": {"down": 2e6, "up": 1e6}}


def test_federated_and_central_gaps_and_their_trend_along_sparsity():
    bench = _bench()
    import findings as F

    base = [20.0] * 40
    rows = []
    for seed in (0, 1):
        # dense: MoP 10% below prompt tuning federated, 5% central; sparsegpt-75: 30% and 5%
        for setting, fed_gain, central_gain in (("dense", 0.9, 0.95), ("sparsegpt-75", 0.7, 0.95)):
            rows.append(_row(setting, "fed_prompt_tuning", seed, base, base))
            rows.append(_row(setting, "fed_mop_fedavg", seed, [x * fed_gain for x in base],
                             [x * central_gain for x in base]))
    found = bench.comparisons(rows)
    assert [f.setting for f in found] == ["dense", "sparsegpt-75"]
    dense = found[0]
    assert dense.federated.a == "MoP (FedAvg)" and dense.federated.b == "prompt tuning (FedAvg)"
    assert dense.federated.hi < 0 and dense.central.hi < 0 and dense.larger_federated
    assert found[1].federated.point < dense.federated.point
    trends = {t.where: t for t in bench.sparsity_trends(found)}
    assert [sp for sp, _ in trends["federated"].ladder] == [0.0, 0.75]
    assert trends["federated"].grows and not trends["central"].grows   # central: the same gap at both
    table = bench.table(rows, ["x"])
    assert "| dense | MoP (FedAvg) | 0.1 | federated |" in table and "2 / 1" in table
    assert all(isinstance(f, F.FederatedVsCentral) for f in found)


def test_a_method_without_its_reference_has_no_comparison():
    bench = _bench()
    rows = [_row("dense", "fed_mop_fedavg", 0, [1.0] * 4, [1.0] * 4)]
    assert bench.comparisons(rows) == [] and bench.sparsity_trends([]) == []
