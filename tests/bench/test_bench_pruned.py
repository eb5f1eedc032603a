"""bench/quality_pruned.py end to end on the tiny model and the synthetic suite: prune per seed, train, table with
the paired interval, figures, section written, and a rerun reuses every finished output."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from mixroute import rundir

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import bench/protocol.py as a sibling
    return importlib.import_module("quality_pruned")


def test_parse_setting():
    bench = _bench()
    assert bench.parse_setting("SparseGPT-75") == "sparsegpt-75"
    assert bench.parse_setting("wanda-2:4") == "wanda-2:4"
    assert bench.setting_target("sparsegpt-90") == ("sparsegpt", 0.9, None)
    assert bench.setting_target("sparsegpt-4:8") == ("sparsegpt", None, "4:8")
    assert bench.rel_diff(9.0, 10.0) == pytest.approx(-10.0)
    assert bench.sweep_on(["dense", "sparsegpt-50", "sparsegpt-75"]) == "sparsegpt-75"
    assert bench.sweep_on(["dense", "wanda-50"]) == "wanda-50"
    for bad in ("sgpt-50", "wanda-0", "wanda-100", "wanda-5:4", "wanda"):
        with pytest.raises(Exception):
            bench.parse_setting(bad)


def test_gate_evidence_follows_the_confusion_matrix():
    bench = _bench()
    import findings as F

    labels = ["a", "b", "c"]
    mop = {"trainable_parameters": 1500, "parameters": {"routers": 1200},
           "router_accuracy": {"overall": 0.6, "labels": labels,
                               "confusion": [[10, 0, 0], [1, 3, 6], [0, 0, 10]]}}
    results = {"sparsegpt-75": {"runs": {0: {"mop": mop, "prompt_tuning": {"trainable_parameters": 80}}}}}
    within = {"sparsegpt-75": F.Comparison("mop", "prompt_tuning", 1.0, -1.0, 3.0)}
    (ev,) = bench.gate_evidence(results, within)
    assert ev.accuracy == 0.6 and ev.merged == [("b", "c", 0.6)]
    assert (ev.trainable, ev.gate, ev.prompt_tuning) == (1500, 1200, 80)
    won = {"sparsegpt-75": F.Comparison("mop", "prompt_tuning", -5.0, -8.0, -2.0)}
    assert bench.gate_evidence(results, won) == []  # MoP won: no why
    mop["router_accuracy"]["confusion"] = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    (ev,) = bench.gate_evidence(results, within)
    assert ev.merged == [] and "another category's expert" not in ev.text()


@pytest.mark.parametrize("diffs, grows, ahead", [
    ({"sparsegpt-50": -2.0, "sparsegpt-75": -9.0}, True, 2),    # the paper's trend
    ({"sparsegpt-50": 5.0, "sparsegpt-75": 0.5}, True, 0),      # moving MoP's way, still behind
    ({"sparsegpt-50": -5.0, "sparsegpt-75": -1.0}, False, 2),   # ahead, but shrinking
])
def test_sparsity_trend_follows_the_numbers(monkeypatch, diffs, grows, ahead):
    import argparse

    bench = _bench()
    import findings as F   # beside the bench scripts, on the path _bench() puts them

    results = {s: {"runs": {}} for s in diffs}
    monkeypatch.setattr(bench, "mop_vs_pt", lambda r, s: (diffs[s], diffs[s] - 1, diffs[s] + 1, [diffs[s]]))
    a = argparse.Namespace(budget="full", settings=list(diffs), sweep_each=False)
    found = {type(f): f for f in bench.findings(a, results)}
    trend = found[F.SparsityTrend]
    assert trend.ladder == [(0.5, diffs["sparsegpt-50"]), (0.75, diffs["sparsegpt-75"])]
    assert (trend.grows, trend.ahead) == (grows, ahead)
    assert found[F.ReusedRates].chosen_on == "sparsegpt 75%" and found[F.ReusedRates].reused_for == ["sparsegpt 50%"]
    a.sweep_each = True  # each setting tuned on its own validation split: nothing to warn about
    assert F.ReusedRates not in {type(f) for f in bench.findings(a, results)}
    assert [bench.rates_from(a, s) for s in ("dense", "sparsegpt-50")] == ["sparsegpt-75", "sparsegpt-50"]


def test_sweep_each_tunes_every_setting_on_its_own_validation(tmp_path, monkeypatch, one_thread):
    bench = _bench()
    P = bench.P
    monkeypatch.setattr(P, "RUNS", tmp_path)
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")
    monkeypatch.setitem(P.BUDGETS, "full", P.Budget("full", per_category=12, max_length=48, val_fraction=0.25,
                                                    test_fraction=0.25, seeds=(0, 1), max_generate=1,
                                                    max_new_tokens=2, max_epochs=2, patience=1, sweep=True))
    monkeypatch.setattr(bench, "SWEEPS", {"prompt_tuning": [("train.lr", [1e-2, 3e-1])]})
    argv = ["--budget", "full", "--model", "tiny", "--data", "synthetic", "--settings", "wanda-50", "wanda-75",
            "--methods", "base", "prompt_tuning", "--calib-samples", "2", "--calib-seq-len", "16", "--threads", "1",
            "--out", str(tmp_path / "runs"), "--img-dir", str(tmp_path / "img"), "--no-write", "--sweep-each"]
    out = bench.main(argv)
    assert set(out["sweeps"]) == set(out["chosen"]) == {"wanda-50", "wanda-75"}
    for setting in ("wanda-50", "wanda-75"):
        tried = out["sweeps"][setting]["prompt_tuning"]
        scores = {t["params"]["train.lr"]: t["validation_ppl"] for t in tried}
        pick = out["chosen"][setting]["prompt_tuning"]["train.lr"]
        assert pick == min(scores, key=scores.get) and all(setting in t["dir"] for t in tried)
        for seed in (0, 1):  # every seed of the setting runs at the rate chosen on that setting
            run = out["results"][setting]["runs"][seed]["prompt_tuning"]["run"]
            run_dir = (tmp_path / "runs" / setting / f"seed{seed}").joinpath(*([] if seed else ["sweep"]), run)
            assert rundir.read_config(run_dir).train.lr == pick
    assert "every seed of wanda 50%\n" in out["text"] and "every seed of wanda 75%\n" in out["text"]
    assert "reused for" not in out["text"]


def test_quality_pruned_smoke_tiny(tmp_path, capsys, monkeypatch, one_thread):
    bench = _bench()
    P = bench.P
    monkeypatch.setattr(P, "RUNS", tmp_path)
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Quality\n\nkept\n")
    argv = ["--budget", "smoke", "--model", "tiny", "--data", "synthetic", "--settings", "wanda-50", "--methods",
            "base", "prompt_tuning", "mop", "--per-category", "12", "--seeds", "0", "1", "--calib-samples", "2",
            "--calib-seq-len", "16", "--threads", "1", "--out", str(tmp_path / "runs"), "--img-dir",
            str(tmp_path / "img"), "--docs", str(docs)]
    out = bench.main(argv)

    for seed in (0, 1):  # pruned once per seed, calibrated on that seed's own train split
        report = json.loads((tmp_path / "runs" / "wanda-50" / f"seed{seed}" / "model" / "prune_report.json")
                            .read_text())
        assert report["method"] == "wanda" and report["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert report["calibration"]["seed"] == seed
    runs = out["results"]["wanda-50"]["runs"]
    assert set(runs) == {0, 1} and all(set(r) == {"base", "prompt_tuning", "mop"} for r in runs.values())
    assert all(r["perplexity"]["average"] > 0 for rs in runs.values() for r in rs.values())
    assert runs[0]["mop"]["router_accuracy"] is not None
    png = Path(out["results"]["wanda-50"]["figure"]["png"])
    assert png.is_file() and png.stat().st_size > 1000 and png.parent == tmp_path / "img"
    # an earlier MoP run's heatmap left in the setting's report folder is not the one copied
    sdir = tmp_path / "runs" / "wanda-50" / "seed0"
    own = png.read_bytes()
    (sdir / "report" / "gates_0_an_earlier_run.png").write_bytes(b"stale")
    png.unlink()
    assert Path(bench.gate_figure(bench.parse_args(argv), "wanda-50", sdir, sdir / "mop")["png"]).read_bytes() == own

    text = docs.read_text()
    assert "## Quality\n\nkept" in text and text.count(bench.HEADING) == 1
    assert "| wanda 50% |" in text and "MoP vs PT" in text and "Budget `smoke`" in text
    d = bench.mop_vs_pt(out["results"], "wanda-50")
    assert len(d[3]) == 2 and d[1] <= d[0] <= d[2]
    assert f"{d[0]:+.1f}% | [{d[1]:+.1f}%, {d[2]:+.1f}%]" in text

    mtime = (tmp_path / "runs" / "wanda-50" / "seed0" / "mop" / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    again = bench.main(argv)  # everything finished: reused, not redone
    printed = capsys.readouterr().out
    assert printed.count(": reused") == 2 and not [ln for ln in printed.splitlines() if ln.startswith(("train ", "test "))]
    assert (tmp_path / "runs" / "wanda-50" / "seed0" / "mop" / "eval.json").stat().st_mtime_ns == mtime
    assert again["results"]["wanda-50"]["runs"][0]["mop"]["perplexity"] == runs[0]["mop"]["perplexity"]
    assert docs.read_text().count(bench.HEADING) == 1

    # a fresh checkout: the archive restores every run without pruning; a run missing from it prunes its
    # seed's model first, then trains
    shutil.rmtree(tmp_path / "runs")
    restored = bench.main(argv)
    printed = capsys.readouterr().out
    assert printed.count(": reused") == 2 and not [ln for ln in printed.splitlines() if ln.startswith(("train ", "test "))]
    assert restored["results"]["wanda-50"]["runs"][1]["mop"]["perplexity"] == runs[1]["mop"]["perplexity"]
    assert not (tmp_path / "runs" / "wanda-50" / "seed1" / "model" / "prune_report.json").exists()
    shutil.rmtree(tmp_path / "archive" / "runs" / "wanda-50" / "seed1" / "prompt_tuning")
    third = bench.main(argv)
    printed = capsys.readouterr().out
    assert [ln for ln in printed.splitlines() if ln.startswith(("train ", "test "))] == [
        "train wanda-50 seed 1 prompt_tuning",
        f"test wanda-50 seed 1 prompt_tuning: PPL {third['results']['wanda-50']['runs'][1]['prompt_tuning']['perplexity']['average']:.3f}"]
    assert (tmp_path / "runs" / "wanda-50" / "seed1" / "model" / "prune_report.json").is_file()
    assert third["results"]["wanda-50"]["runs"][1]["prompt_tuning"]["perplexity"]["average"] == pytest.approx(
        runs[1]["prompt_tuning"]["perplexity"]["average"], rel=1e-4)
