"""``mixroute eval``, ``compare`` and ``generate``: read a trained run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mixroute.cli.common import console, device_option, fail, precision_option, user_errors

# typer/rich keeps blank-line separated paragraphs of an epilog; one example per paragraph reads best
EVAL_EXAMPLES = """Examples:

mixroute eval runs/moa   (test split: PPL, BLEU, ROUGE-L, router accuracy -> runs/moa/eval.json)

mixroute eval runs/moa --max-generate 8 --max-new-tokens 48"""

COMPARE_EXAMPLES = """Examples:

mixroute compare runs/lora_mixed runs/moa   (markdown table; each run needs its eval.json: mixroute eval RUN_DIR)

mixroute compare runs/* --csv table.csv"""

GENERATE_EXAMPLES = """Examples:

mixroute generate runs/moa "Convert 5 km to metres."   (prints the expert the router chose, then the answer)"""


@user_errors()
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
    device: str = device_option(),
    precision: str = precision_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Show a progress bar per phase (perplexity, generation, classifier)."),
) -> None:
    """Perplexity, BLEU, ROUGE-L, router accuracy and the classifier baseline -> RUN_DIR/eval.json."""
    from mixroute.evaluate import evaluate_run

    if split not in (None, "validation", "test"):
        fail(f"--split {split!r}: expected validation or test")
    result = evaluate_run(run_dir, max_new_tokens=max_new_tokens, max_generate=max_generate, split=split,
                          classifier=classifier, device=device, precision=precision, progress=progress)
    from mixroute.report.compare import comparison_table, to_markdown
    from mixroute.rundir import EVAL

    print(to_markdown(comparison_table([result])))
    acc, clf = result.get("router_accuracy"), result.get("classifier_accuracy")
    if acc:
        console.print(f"router accuracy {acc['overall']:.2%}" +
                      (f", classifier baseline {clf['overall']:.2%}" if clf else ""))
    console.print(f"trainable parameters: {result['trainable_parameters']:,}")
    console.print(f"wrote {Path(run_dir) / EVAL}")


@user_errors()
def compare_cmd(
    run_dirs: list[str] = typer.Argument(..., help="Run directories with an eval.json."),
    csv: Optional[str] = typer.Option(None, "--csv", help="Also write the table as CSV to this file."),
) -> None:
    """One table of several runs: rows = categories + average, column groups = methods (PPL / BLEU / ROUGE-L)."""
    from mixroute.fileio import atomic_write_text
    from mixroute.report.compare import comparison_table, to_csv, to_markdown
    from mixroute.rundir import EVAL, read_eval

    evals = []
    for d in run_dirs:
        result = read_eval(d)
        if result is None:
            fail(f"{Path(d) / EVAL} does not exist; run `mixroute eval {d}` first")
        evals.append(result)
    table = comparison_table(evals)
    print(to_markdown(table))
    if csv:
        atomic_write_text(csv, to_csv(table))
        console.print(f"wrote {csv}")


@user_errors(ValueError)
def generate_cmd(
    run_dir: str = typer.Argument(..., help="Run directory written by `mixroute train`."),
    prompt: str = typer.Argument(..., help="The instruction to answer."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (greedy)."),
    category: Optional[str] = typer.Option(None, "--category", help="Category label, for methods that route by "
                                                                   "label (lora_single, poly, mhr)."),
    context: str = typer.Option("", "--context", help="Optional context passage (Dolly's context field)."),
    device: str = device_option(),
    precision: str = precision_option(),
) -> None:
    """Generate an answer; the router picks the expert. Prints the chosen expert and the text."""
    from mixroute.evaluate import routed_generate

    out = routed_generate(run_dir, prompt, max_new_tokens=max_new_tokens, category=category, context=context,
                          device=device, precision=precision)
    console.print(f"[bold]expert:[/bold] {out['expert']}", highlight=False)
    console.print(out["text"], markup=False, highlight=False)
