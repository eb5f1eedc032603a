"""CLI commands of the training feature: ``train``, ``eval``, ``compare``, ``generate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("train", epilog=TRAIN_EXAMPLES)(train_cmd)
    app.command("eval", epilog=EVAL_EXAMPLES)(eval_cmd)
    app.command("compare", epilog=COMPARE_EXAMPLES)(compare_cmd)
    app.command("generate", epilog=GENERATE_EXAMPLES)(generate_cmd)


# typer/rich keeps blank-line separated paragraphs of an epilog; one example per paragraph reads best
TRAIN_EXAMPLES = """Examples:

mixroute train configs/moa.yaml   (MoA on the built-in synthetic suite, embedded SmolLM2-135M)

mixroute train configs/moa_dolly.yaml train.max_steps=300 data.max_per_category=500

mixroute train configs/lora_mixed.yaml model.name=tiny train.max_steps=5   (seconds: a smoke run)

mixroute train --resume runs/moa   (continue a killed run from its newest checkpoint)

Methods (train.method): base, prompt_tuning, lora_mixed, lora_single, moa, moe_lora, moe_lora_naive, poly, mhr, smora, mop, mixture. Every key: mixroute config show CONFIG. Docs: docs/training.md."""

EVAL_EXAMPLES = """Examples:

mixroute eval runs/moa   (test split: PPL, BLEU, ROUGE-L, router accuracy -> runs/moa/eval.json)

mixroute eval runs/moa --max-generate 8 --max-new-tokens 48"""

COMPARE_EXAMPLES = """Examples:

mixroute compare runs/lora_mixed runs/moa   (markdown table; each run needs its eval.json: mixroute eval RUN_DIR)

mixroute compare runs/* --csv table.csv"""

GENERATE_EXAMPLES = """Examples:

mixroute generate runs/moa "Convert 5 km to metres."   (prints the expert the router chose, then the answer)"""


def _fail(message: str) -> None:
    from mixroute.cli import fail

    fail(message)


def train_cmd(
    config: Optional[str] = typer.Argument(None, help="YAML config (configs/*.yaml); omit with --resume."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=300"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this run directory from its newest "
                                                               "checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output_dir."),
    evaluate: bool = typer.Option(False, "--eval", help="Run `mixroute eval` on the run when training ends."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", help="Checkpoint and stop after this "
                                                                          "step (as if killed; resume later)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train a method (setup, stage 1 when needed, train, save) into a run directory."""
    from mixroute.cli import console
    from mixroute.config import ConfigError, load_config
    from mixroute.train import TrainingDiverged
    from mixroute.train import resume as resume_run
    from mixroute.train import train

    try:
        if resume:
            if config or overrides:
                _fail("--resume RUN_DIR continues a run with its own config.yaml; do not pass a config or overrides")
            run_dir = resume_run(resume, stop_at_step=stop_at_step, progress=progress)
        else:
            if config is None:
                _fail("give a config file (e.g. configs/moa.yaml) or --resume RUN_DIR")
            cfg = load_config(config, overrides or [])
            run_dir = train(cfg, overwrite=overwrite, stop_at_step=stop_at_step, progress=progress)
    except (ConfigError, TrainingDiverged, FileNotFoundError) as e:
        _fail(str(e))
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    if evaluate and not (stop_at_step is not None and not (Path(run_dir) / "final").is_dir()):
        eval_cmd(str(run_dir), None, None, None, True)


def eval_cmd(
    run_dir: str = typer.Argument(..., help="Run directory written by `mixroute train`."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation length (default: "
                                                                              "eval.max_new_tokens)."),
    max_generate: Optional[int] = typer.Option(None, "--max-generate", help="Examples per category for BLEU / "
                                                                          "ROUGE-L (default: eval.max_generate; 0 = "
                                                                          "no generation)."),
    split: Optional[str] = typer.Option(None, "--split", help="validation or test (default: eval.split)."),
    classifier: bool = typer.Option(True, "--classifier/--no-classifier",
                                    help="Fit the logistic-regression baseline on the pooled states the router "
                                         "reads (runs the train split through the model once more)."),
) -> None:
    """Perplexity, BLEU, ROUGE-L, router accuracy and the classifier baseline -> RUN_DIR/eval.json."""
    from mixroute.cli import console
    from mixroute.config import ConfigError
    from mixroute.evaluate import evaluate_run

    if split not in (None, "validation", "test"):
        _fail(f"--split {split!r}: expected validation or test")
    try:
        result = evaluate_run(run_dir, max_new_tokens=max_new_tokens, max_generate=max_generate, split=split,
                              classifier=classifier)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    print(_compare_markdown([result]))
    acc, clf = result.get("router_accuracy"), result.get("classifier_accuracy")
    if acc:
        console.print(f"router accuracy {acc['overall']:.2%}" +
                      (f", classifier baseline {clf['overall']:.2%}" if clf else ""))
    console.print(f"trainable parameters: {result['trainable_parameters']:,}")
    console.print(f"wrote {Path(run_dir) / 'eval.json'}")


def compare_cmd(
    run_dirs: list[str] = typer.Argument(..., help="Run directories with an eval.json."),
    csv: Optional[str] = typer.Option(None, "--csv", help="Also write the table as CSV to this file."),
) -> None:
    """One table of several runs: rows = categories + average, column groups = methods (PPL / BLEU / ROUGE-L)."""
    from mixroute.cli import console
    from mixroute.config import atomic_write_text

    evals = []
    for d in run_dirs:
        path = Path(d) / "eval.json"
        if not path.is_file():
            _fail(f"{path} does not exist; run `mixroute eval {d}` first")
        evals.append(json.loads(path.read_text()))
    print(_compare_markdown(evals))
    if csv:
        atomic_write_text(csv, _compare_csv(evals))
        console.print(f"wrote {csv}")


def _compare_markdown(evals: list[dict]) -> str:
    from mixroute.train.compare import comparison_table, to_markdown

    return to_markdown(comparison_table(evals))


def _compare_csv(evals: list[dict]) -> str:
    from mixroute.train.compare import comparison_table, to_csv

    return to_csv(comparison_table(evals))


def generate_cmd(
    run_dir: str = typer.Argument(..., help="Run directory written by `mixroute train`."),
    prompt: str = typer.Argument(..., help="The instruction to answer."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (greedy)."),
    category: Optional[str] = typer.Option(None, "--category", help="Category label, for methods that route by "
                                                                   "label (lora_single, poly, mhr)."),
    context: str = typer.Option("", "--context", help="Optional context passage (Dolly's context field)."),
) -> None:
    """Generate an answer; the router picks the expert. Prints the chosen expert and the text."""
    from mixroute.cli import console
    from mixroute.config import ConfigError
    from mixroute.evaluate import routed_generate

    try:
        out = routed_generate(run_dir, prompt, max_new_tokens=max_new_tokens, category=category, context=context)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(f"[bold]expert:[/bold] {out['expert']}", highlight=False)
    console.print(out["text"], markup=False, highlight=False)
