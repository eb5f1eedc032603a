"""bench/quality_federated.py's conclusions from hand-made rows: paired intervals pooled over seeds, federated
against central, and the gap along sparsity, as findings (the full run is hours; its smoke is in the docstring); and
its archive of finished runs, on the tiny model, as a fresh checkout sees it."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
@pytest.mark.integration   # real Flower simulations on the tiny model
def test_a_fresh_checkout_restores_finished_runs_and_retrains_only_a_missing_evaluation(tmp_path, capsys,
                                                                                        monkeypatch):
    bench = _bench()
    import protocol as P

    import mixroute.federated as federated

    monkeypatch.setattr(P, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")
    out = tmp_path / "runs" / "quality_federated"
    argv = ["--model", "tiny", "--data", "synthetic", "--settings", "dense", "--methods", "fed_lora",
            "--clients", "2", "--rounds", "1", "--local-steps", "1", "--per-category", "24", "--central-steps",
            "1", "--seeds", "0", "--lr", "5e-4", "1e-3", "--out", str(out), "--no-write"]
    bench.main(argv)
    first = json.loads((out / "results_test.json").read_text())[0]
    chosen = f"fed_lora-lr{first['lr']:g}"
    archived = tmp_path / "archive" / "quality_federated" / "seed0" / "dense"
    assert {"bench_done.json", "bench_eval_test.json", "bench_eval_validation.json", "rounds.jsonl",
            "config.yaml", "metrics.jsonl"} <= {f.name for f in (archived / chosen).iterdir()}
    assert not list((tmp_path / "archive").rglob("*.safetensors"))
    capsys.readouterr()

    # a fresh checkout (runs/ gone, the archive kept): nothing trains, every number is the archived one
    shutil.rmtree(tmp_path / "runs")

    def no_training(*args, **kwargs):
        raise AssertionError("a run the archive holds was trained again")

    with monkeypatch.context() as m:
        m.setattr(federated, "run", no_training)
        m.setattr(bench, "central_reference", no_training)
        bench.main(argv)
    again = json.loads((out / "results_test.json").read_text())[0]
    assert again["sweep"] == first["sweep"] and again["lr"] == first["lr"]
    for where in ("federated", "central"):
        assert again[where]["perplexity"] == first[where]["perplexity"]
    assert capsys.readouterr().out.count("restored ") == 3   # two federated trials and the central reference

    # an evaluation the archive lacks retrains that run alone (same overrides and seed: the same numbers)
    shutil.rmtree(tmp_path / "runs")
    (archived / chosen / "bench_eval_test.json").unlink()
    bench.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("retrain ") == 1 and f"retrain {out / 'seed0' / 'dense' / chosen}" in printed
    third = json.loads((out / "results_test.json").read_text())[0]
    assert third["federated"]["perplexity"]["average"] == pytest.approx(
        first["federated"]["perplexity"]["average"], rel=1e-4)
    assert (archived / chosen / "bench_eval_test.json").is_file()
