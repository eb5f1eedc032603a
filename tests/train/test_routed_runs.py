"""Prompt experts go through the same routing pipeline as LoRA experts end to end: a trained MoP run's
`mixroute generate` names the expert its gate chose, and its eval.json reports router accuracy while
generating (both were missing when MoP had a pipeline of its own)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mixroute.cli import app
from mixroute.config import load_config
from mixroute.evaluate import evaluate_run
from mixroute.rundir import load_run
from mixroute.train import train

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Convert 5 km to metres."


@pytest.fixture(scope="module")
def mop_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mop"
    cfg = load_config(ROOT / "configs" / "mop.yaml", [
        "model.name=tiny", "data.synthetic_per_task=6", "data.max_length=48", "train.max_steps=2",
        "mixture.gate_pretrain_steps=30", "mixture.gate_pretrain_lr=0.01",
        "mixture.experts.prompt.num_virtual_tokens=2",
        "train.eval_every=0", "train.save_every=0", "eval.max_eval=3", "eval.max_generate=2",
        "eval.max_new_tokens=3", f"output_dir={out}"])
    return train(cfg, progress=False)


def gate_choice(run_dir: Path) -> tuple[int, list[str]]:
    """The expert the run's gate picks for PROMPT, from one plain forward of the prompt tokens."""
    run = load_run(run_dir)
    cats = run.data.categories
    ids = run.data.prompt_ids({"instruction": PROMPT, "context": "", "response": "", "category": cats[0]})
    with torch.no_grad():
        w = run.mix(torch.tensor([ids])).routing["gate"]
    assert w.shape == (1, len(cats))
    return int(w.argmax()), cats


def test_generate_on_a_mop_run_names_the_gates_expert(mop_run):
    expert, cats = gate_choice(mop_run)
    result = CliRunner().invoke(app, ["generate", str(mop_run), PROMPT, "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("expert:"))
    assert re.fullmatch(rf"expert: {expert} \({re.escape(cats[expert])}\)", line.strip()), line


def test_mop_eval_reports_router_accuracy_while_generating(mop_run):
    result = evaluate_run(mop_run, classifier=False)
    acc = result["router_accuracy"]
    assert acc is not None and 0.0 <= acc["generation"] <= 1.0
    assert json.loads((mop_run / "eval.json").read_text())["router_accuracy"]["generation"] == acc["generation"]
