"""The train / eval / compare / generate commands through typer's CliRunner (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixroute.cli import app

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.name=tiny", "data.synthetic_per_task=4", "data.max_length=48", "train.max_steps=2",
         "train.stage1_steps=1", "train.eval_every=0", "train.save_every=1", "eval.max_eval=2",
         "eval.max_generate=1", "eval.max_new_tokens=3"]
runner = CliRunner()


@pytest.mark.slow
def test_train_eval_compare_generate(tmp_path):
    runs = {}
    for preset in ("lora_mixed", "moa"):
        out = tmp_path / preset
        res = runner.invoke(app, ["train", str(ROOT / "configs" / f"{preset}.yaml"), *SMALL, f"output_dir={out}",
                                  "--no-progress", "--eval"])
        assert res.exit_code == 0, res.output
        assert (out / "eval.json").is_file() and "run directory" in res.output
        runs[preset] = out
    csv = tmp_path / "table.csv"
    res = runner.invoke(app, ["compare", str(runs["lora_mixed"]), str(runs["moa"]), "--csv", str(csv)])
    assert res.exit_code == 0, res.output
    assert "lora_mixed PPL" in res.output and "moa ROUGE-L" in res.output and "average" in res.output
    cats = json.loads((runs["moa"] / "eval.json").read_text())["categories"]
    assert len(csv.read_text().strip().splitlines()) == len(cats) + 2
    res = runner.invoke(app, ["generate", str(runs["moa"]), "Reverse: a b c", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "expert:" in res.output
    res = runner.invoke(app, ["eval", str(runs["moa"]), "--max-new-tokens", "2", "--max-generate", "1"])
    assert res.exit_code == 0 and "router accuracy" in res.output, res.output


def test_stop_and_resume_from_the_cli(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(ROOT / "configs" / "lora_mixed.yaml"), *SMALL, "train.max_steps=3", f"output_dir={out}",
            "--no-progress"]
    assert runner.invoke(app, args + ["--stop-at-step", "1"]).exit_code == 0
    assert not (out / "final").exists() and (out / "checkpoints" / "step-1").is_dir()
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["train", "--resume", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "mixture.safetensors").is_file()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_errors_are_clear(tmp_path):
    res = runner.invoke(app, ["train", str(ROOT / "configs" / "moa.yaml"), "train.method=nope"])
    assert res.exit_code == 2 and "train.method" in res.output
    res = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in _flat(res.output)
    res = runner.invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in _flat(res.output)
    res = runner.invoke(app, ["compare", str(tmp_path)])
    assert res.exit_code == 2 and "eval.json" in _flat(res.output)
