"""bench/train_speed.py end to end on the tiny model and a small Dolly-shaped file: every row measured on the
same examples, throughputs positive, padding efficiency of the two orders, the section written once."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import bench/protocol.py as a sibling
    return importlib.import_module("train_speed")


def _dolly(path: Path) -> None:
    """3 categories x 12 records whose lengths vary a lot (short and truncated ones): padding to measure."""
    words = "the river runs past an old mill where bakers sell warm bread every morning".split()
    rows = []
    for c, cat in enumerate(["open_qa", "summarization", "brainstorming"]):
        for i in range(12):
            n = 2 + (7 * i + 5 * c) % 40
            rows.append({"instruction": f"Question {i} about {cat}?", "context": "",
                         "response": " ".join(words[(i + j) % len(words)] for j in range(n)), "category": cat})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_train_speed_tiny(tmp_path, capsys):
    bench = _bench()
    data = tmp_path / "dolly.jsonl"
    _dolly(data)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Speed\n\nkept\n\n## Training throughput\n\nold table\n\n## Serving\n\n"
                    "kept too\n")
    out = bench.main(["--model", "tiny", "--data", str(data), "--per-category", "12", "--max-length", "64",
                      "--batch-size", "2", "--steps", "2", "--repeats", "1", "--eval-every", "1", "--moa", "--bf16",
                      "--threads", "1", "--docs", str(docs)])
    printed = capsys.readouterr().out

    res = out["results"]
    assert list(res) == ["peft_random", "peft_grouped", "mixroute_random", "mixroute_grouped",
                         "mixroute_grouped_eval", "peft_grouped_bf16", "mixroute_grouped_bf16", "moa_grouped"]
    for key, r in res.items():
        (m,) = r.runs
        assert m.tps > 0 and m.seconds > 0 and m.steps == 1, key
        assert 0 < m.tokens <= m.padded, key
        assert m.evals == (1 if key == "mixroute_grouped_eval" else 0), key
        assert (m.call_seconds is None) == (r.case.kind == "peft"), key
        assert f"| {r.case.label} |" in printed
    # the same batches for PEFT and mixroute in each order
    assert res["peft_random"].runs[0].tokens == res["mixroute_random"].runs[0].tokens
    assert res["peft_random"].runs[0].padded == res["mixroute_random"].runs[0].padded
    grouped = {(r.runs[0].tokens, r.runs[0].padded) for k, r in res.items() if r.case.grouped}
    assert len(grouped) == 1
    info = out["info"]
    assert info["targets"] == 14  # tiny Llama: 2 layers x 7 projections, the same names for PEFT
    assert 0 < info["eff_random"] < info["eff_grouped"] <= 1
    assert f"| {res['peft_random'].case.label} | " in out["table"] and "| 1.00x |" in out["table"]

    text = docs.read_text()  # the old section replaced in place, the others kept
    assert "## Speed\n\nkept" in text and "## Serving\n\nkept too" in text and "old table" not in text
    assert text.count(bench.HEADING) == 1 and text.index("## Speed") < text.index(bench.HEADING) < \
        text.index("## Serving")
    assert out["table"] in text and "--model tiny" in text and "Load average at the start" in text
    assert f"random batches {info['eff_random']:.1%}, length-grouped {info['eff_grouped']:.1%}" in text


def test_steps_at_least_two():
    with pytest.raises(SystemExit):
        _bench().parse_args(["--steps", "1"])
