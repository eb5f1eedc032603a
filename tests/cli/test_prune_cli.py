"""`mixroute prune` through typer's CliRunner on the tiny model: a full run, and bad input -> exit 2."""

import json

import pytest
from typer.testing import CliRunner

from mixroute.cli import app

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-examples", "8", "--no-progress"]


def invoke(*args):
    return runner.invoke(app, ["prune", *args])


def test_cli_prune_tiny(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny-2of4"
    result = invoke("tiny", "--method", "sparsegpt", "--pattern", "2:4", *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "sparsegpt 2:4" in result.output and "perplexity" in result.output
    report = json.loads((out / "prune_report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.5)
    assert report["ppl_before"] > 1 and report["ppl_after"] > 1 and report["eval"]["examples"] == 8
    assert report["calibration"]["source"] == "built-in synthetic suite" and report["calibration"]["tokens"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def test_cli_help_states_convention():
    result = runner.invoke(app, ["prune", "--help"])
    assert "keeps N of every M" in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity 1.5 is outside (0, 1)"),
    (["--method", "wanda", "--sparsity", "0"], "sparsity 0.0 is outside (0, 1)"),
    (["--method", "wanda", "--pattern", "5:4"], "pattern 5:4 is invalid"),
    (["--method", "wanda", "--pattern", "0:4"], "pattern 0:4 is invalid"),
    (["--method", "wanda", "--pattern", "two:four"], "pattern 'two:four' does not parse"),
    (["--method", "wanda"], "exactly one of sparsity"),
    (["--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4"], "exactly one of sparsity"),
    (["--method", "obs", "--sparsity", "0.5"], "valid: magnitude, wanda, sparsegpt"),
    (["--method", "magnitude", "--pattern", "3:5"], "M=5 does not divide the input width 64"),
])
def test_cli_bad_input(tmp_path, args, message):
    result = invoke("tiny", *args, *SMALL, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_cli_out_not_empty(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    result = invoke("tiny", "--method", "magnitude", "--sparsity", "0.5", *SMALL, "--out", str(out))
    assert result.exit_code == 2 and "not empty; pass --force" in " ".join(result.output.split())


def test_cli_empty_calibration(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke("tiny", "--method", "wanda", "--sparsity", "0.5", "--calib", str(empty), *SMALL,
                    "--out", str(tmp_path / "o2"))
    assert result.exit_code == 2, result.output
    assert "empty.jsonl" in " ".join(result.output.split())
    assert not (tmp_path / "o2").exists()
