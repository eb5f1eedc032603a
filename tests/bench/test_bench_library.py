"""bench/library.py on the tiny model: its experts are the quality benchmark's own runs (trained once, reused
on rerun), and the accuracy it reports is of the decisions the forward pass applied, layer by layer."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow   # a minute of real training: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("library")


def test_smoke_reads_the_quality_runs_and_reports_applied_routing(tmp_path, capsys, one_thread):
    from mixroute.data import Collator, make_batches
    from mixroute.evaluate import held_out_pass
    from mixroute.library import Library
    from mixroute.rundir import load_run

    bench = _bench()
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Expert library\n\nold table\n\n## Next\n\nkept\n")
    argv = ["--budget", "smoke", "--model", "tiny", "--data", "synthetic", "--threads", "1", "--out",
            str(tmp_path / "lib"), "--quality-out", str(tmp_path / "quality"), "--docs", str(docs)]
    r = bench.main(argv)
    for method in ("lora_single", "lora_mixed"):   # the quality benchmark's seed-0 runs, not copies
        assert Path(r["experts"][method]).parent == tmp_path / "quality" / "seed0"
    text = docs.read_text()
    assert "old table" not in text and "## Next\n\nkept" in text
    section = text.split("## Expert library", 1)[1].split("## Next", 1)[0]
    cats = list(r["union"])
    for k, c in enumerate(cats[4:], start=5):   # one row per addition, in both growth tables
        assert section.count(f"| {k} | {c} |") == 2
    assert "bench/quality_dolly.py's seed-0 runs" in section and "--only-finished" not in section

    # the per-layer accuracy it reports is the mean over every (example, layer) decision applied, not a vote
    run = load_run(r["experts"]["lora_single"])
    run.mix.detach()
    cats = list(run.data.categories)
    test = run.data.examples["test"]
    batches = [b for i in range(len(cats)) for b in make_batches([e for e in test if e["task_id"] == i],
                                                                 Collator(run.tok), 8)]
    lib = Library(tmp_path / "lib" / "library", model=run.model, tok=run.tok)
    oracle: dict[str, float] = {}
    got = bench.evaluate(lib, batches, cats, oracle)["routers"]
    # the oracle perplexity cached when a category joined a smaller library is the full library's
    assert oracle == pytest.approx(r["steps"][-1]["oracle"], rel=1e-4)
    disagree = 0
    for router in ("centroid", "arrow"):
        mix = lib.mixture(router, scope="layer")
        held = held_out_pass(mix.model, mix, batches)
        picks = torch.stack([w.argmax(-1) for w in held.routing.values()], dim=1)   # (N, layers)
        assert picks.shape[1] > 1
        hit = picks == held.task_ids[:, None]
        reported = got[f"{router} (per layer)"]
        assert reported["accuracy"] == pytest.approx(float(hit.float().mean()))
        lo, hi = reported["layer_range"]
        assert lo == pytest.approx(float(hit.float().mean(0).min())) and hi == pytest.approx(float(
            hit.float().mean(0).max()))
        disagree += int((picks != picks[:, :1]).any())
    assert disagree   # on the tiny model some layers disagree, so a vote would have reported something else
    one = got["task (per prompt)"]
    assert one["layers"] == 1 and one["layer_range"] is None

    capsys.readouterr()
    bench.main(argv)   # a rerun trains nothing: the runs are reused
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("train ", "test "))]
