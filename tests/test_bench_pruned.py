"""bench/quality_pruned.py end to end on the tiny model and the synthetic suite: prune, train, table, figure,
section written, and a rerun reuses every finished output."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import bench/common.py as a sibling
    return importlib.import_module("quality_pruned")


def test_parse_setting():
    bench = _bench()
    assert bench.parse_setting("SparseGPT-75") == "sparsegpt-75"
    assert bench.parse_setting("wanda-2:4") == "wanda-2:4"
    assert bench.setting_target("sparsegpt-90") == ("sparsegpt", 0.9, None)
    assert bench.setting_target("sparsegpt-4:8") == ("sparsegpt", None, "4:8")
    assert bench.rel_diff(9.0, 10.0) == pytest.approx(-10.0)
    for bad in ("sgpt-50", "wanda-0", "wanda-100", "wanda-5:4", "wanda"):
        with pytest.raises(Exception):
            bench.parse_setting(bad)


def test_quality_pruned_tiny(tmp_path, capsys):
    bench = _bench()
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Quality\n\nkept\n")
    argv = ["--model", "tiny", "--data", "synthetic", "--settings", "wanda-50", "--methods", "base",
            "prompt_tuning", "mop", "--steps", "1", "--per-category", "8", "--max-length", "48", "--max-eval", "2",
            "--calib-samples", "2", "--calib-seq-len", "16", "--out", str(tmp_path / "runs"), "--img-dir",
            str(tmp_path / "img"), "--docs", str(docs)]
    out = bench.main(argv)

    setting = tmp_path / "runs" / "wanda-50"
    report = json.loads((setting / "model" / "prune_report.json").read_text())
    assert report["method"] == "wanda" and report["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    runs = out["results"]["wanda-50"]["runs"]
    assert set(runs) == {"base", "prompt_tuning", "mop"}
    assert all(r["perplexity"]["average"] > 0 for r in runs.values())
    assert runs["mop"]["router_accuracy"] is not None
    assert str(setting / "model") in (setting / "mop" / "config.yaml").read_text()
    png = Path(out["results"]["wanda-50"]["figure"]["png"])
    assert png.is_file() and png.stat().st_size > 1000 and png.parent == tmp_path / "img"

    text = docs.read_text()
    assert "## Quality\n\nkept" in text and text.count(bench.HEADING) == 1
    assert "| wanda 50% | pruned base |" in text and "MoP vs PT" in text
    mop, pt = runs["mop"]["perplexity"]["average"], runs["prompt_tuning"]["perplexity"]["average"]
    assert f"{bench.rel_diff(mop, pt):+.1f}%" in text

    mtime = (setting / "mop" / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    again = bench.main(argv)  # everything finished: reused, not redone
    printed = capsys.readouterr().out
    assert "wanda-50: reused" in printed and printed.count(": reused") == 4
    assert (setting / "mop" / "eval.json").stat().st_mtime_ns == mtime
    assert again["results"]["wanda-50"]["runs"]["mop"]["perplexity"] == runs["mop"]["perplexity"]
    assert docs.read_text().count(bench.HEADING) == 1

