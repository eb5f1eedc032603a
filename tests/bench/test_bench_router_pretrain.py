"""bench/router_pretrain.py end to end on a tiny MoA run: one row per setting, measured from the run's own
stage-1 experts; records reused on a rerun; the section written in place; a run that is not MoA refused."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from mixroute.config import load_config
from mixroute.train.centralized import train

pytestmark = pytest.mark.slow   # minutes of real training: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.name=tiny", "data.synthetic_per_task=12", "data.max_length=48", "train.max_steps=4",
        "train.stage1_steps=2", "train.eval_every=2", "train.patience=1", "train.save_every=0", "eval.max_eval=4",
        "mixture.gate_pretrain_steps=20", "mixture.gate_pretrain_lr=0.01",
        "data.categories=[acronym,arithmetic,word_count]"]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports bench/protocol.py as a sibling
    return importlib.import_module("router_pretrain")


def test_router_pretrain_tiny(tmp_path):
    bench = _bench()
    run = train(load_config(ROOT / "configs" / "moa.yaml", TINY + [f"output_dir={tmp_path / 'runs' / 'moa'}"]),
                progress=False)
    docs, records = tmp_path / "benchmarks.md", tmp_path / "rec.json"
    docs.write_text("# Benchmarks\n\n## Before\n\nkept\n")
    args = ["--run", str(run), "--records", str(records), "--docs", str(docs), "--threads", "1"]
    bench.main(args)
    rec = json.loads(records.read_text())
    assert sorted(r["mode"] for r in rec.values()) == ["label", "none", "uniform"]
    assert all(k.startswith("runs/moa|") for k in rec)      # the scratch folder is not recorded
    for r in rec.values():
        assert r["n"] >= 3 and 0 <= r["applied"] <= 1 and r["ppl_average"] > 1
        assert r["applied_first"] == r["cached_first"]      # layer 0 reads the embeddings: nothing leaks there
    text = docs.read_text()
    assert "kept" in text and text.count("## MoA router pre-training") == 1
    # a rerun reuses the records (an edited one shows) and rewrites the section in place
    key = next(k for k in rec if "|none|" in k)
    rec[key]["ppl_average"] = 123.456
    records.write_text(json.dumps(rec))
    bench.main(args)
    text = docs.read_text()
    assert "| 123.456 |" in text and text.count("## MoA router pre-training") == 1

    base = train(load_config(ROOT / "configs" / "lora_mixed.yaml", TINY + [f"output_dir={tmp_path / 'mixed'}"]),
                 progress=False)
    with pytest.raises(SystemExit, match="a MoA run is needed"):
        bench.main(["--run", str(base), "--records", str(records), "--no-write"])
