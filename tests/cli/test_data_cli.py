"""`mixroute data inspect` and `mixroute data synthetic` through typer's CliRunner."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixroute.cli import app
from mixroute.data import load_records, synthetic_suite

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
DOLLY = Path("/work/shared/data/dolly-15k/databricks-dolly-15k.jsonl")
runner = CliRunner()


def test_inspect_fixture_prints_counts_and_lengths():
    res = runner.invoke(app, ["data", "inspect", str(FIXTURES / "mini.jsonl"), "--template", "plain"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "12 records" in out and "3 categories" in out
    for cat in ("brainstorming", "classification", "closed_qa"):
        assert cat in out
    for word in ("prompt", "response", "total", "mean", "median", "p95", "max"):
        assert word in out
    assert "0 truncated" in out and "0 dropped" in out


def test_inspect_column_mapping_and_truncation_count():
    res = runner.invoke(app, ["data", "inspect", str(FIXTURES / "mini_mapped.csv"), "--tokenizer", "tiny",
                              "--columns", "instruction=prompt,context=input,response=completion,category=task",
                              "--max-length", "40"])
    assert res.exit_code == 0, res.output
    assert "4 records" in res.output and "translate" in res.output
    assert "1 truncated" in res.output and "0 dropped" in res.output  # the summary prompt is over 40
    res = runner.invoke(app, ["data", "inspect", str(FIXTURES / "mini.jsonl"), "--max-length", "30"])
    assert res.exit_code == 0, res.output
    assert "0 truncated" in res.output and "12 dropped" in res.output  # the chat frame alone is ~33 tokens


@pytest.mark.parametrize("args, expected", [
    (["data", "inspect", "nope.jsonl"], "nope.jsonl: file not found"),
    (["data", "inspect", str(FIXTURES / "mini_mapped.csv")], "line 2: missing field(s) 'instruction'"),
    (["data", "inspect", str(FIXTURES / "mini.jsonl"), "--columns", "prompt"], "FIELD=COLUMN"),
    (["data", "inspect", str(FIXTURES / "mini.jsonl"), "--template", "fancy"], "'chat' or 'plain'"),
    (["data", "inspect", str(FIXTURES / "mini.jsonl"), "--tokenizer", "/no/such/tok"], "not found locally"),
    (["data", "synthetic", "--out", "x.jsonl", "--suite", "poetry"],
     "--suite must be one of formats, conventions, ciphers"),
    (["data", "synthetic", "--out", "x.txt"], "must be a .jsonl file"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], res.output


def test_inspect_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b", "category": "c"}\n{oops\n')
    res = runner.invoke(app, ["data", "inspect", str(path)])
    assert res.exit_code == 2 and f"{path}:2: malformed JSON" in res.output


def test_synthetic_writes_the_suite(tmp_path):
    out = tmp_path / "syn.jsonl"
    res = runner.invoke(app, ["data", "synthetic", "--per-task", "4", "--seed", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 32 records" in res.output
    assert load_records(out).records == synthetic_suite(per_task=4, seed=2)
    first = out.read_text()
    runner.invoke(app, ["data", "synthetic", "--per-task", "4", "--seed", "2", "--out", str(out)])
    assert out.read_text() == first
    assert set(json.loads(first.splitlines()[0])) == {"instruction", "context", "response", "category"}
    res = runner.invoke(app, ["data", "synthetic", "--per-task", "3", "--suite", "conventions", "--out", str(out)])
    assert res.exit_code == 0 and "wrote 18 records (6 task families x 3)" in res.output, res.output
    assert load_records(out).records == synthetic_suite(per_task=3, suite="conventions")
    res = runner.invoke(app, ["data", "synthetic", "--per-task", "3", "--suite", "ciphers", "--out", str(out)])
    assert res.exit_code == 0 and "wrote 12 records (4 task families x 3)" in res.output, res.output
    assert load_records(out).records == synthetic_suite(per_task=3, suite="ciphers")


@pytest.mark.slow
def test_inspect_dolly():
    if not DOLLY.is_file():
        pytest.skip(f"Dolly-15k not found at {DOLLY}")
    res = runner.invoke(app, ["data", "inspect", str(DOLLY)])
    assert res.exit_code == 0, res.output
    assert "15,011 records" in res.output and "8 categories" in res.output
    for cat, n in (("open_qa", "3,742"), ("creative_writing", "709"), ("summarization", "1,188")):
        line = next(ln for ln in res.output.splitlines() if f" {cat} " in ln)
        assert n in line
