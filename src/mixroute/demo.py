"""``make demo``: train a routed mixture (MoA) and a single mixed LoRA on the built-in synthetic suite with the
embedded SmolLM2-135M-Instruct, evaluate both, print the comparison table and the router accuracy, and write
the HTML report. About 5-8 minutes on a 2-core CPU.

    python -m mixroute.demo                      # defaults
    python -m mixroute.demo --steps 10 --stage1-steps 4 --per-task 40    # smaller / faster
    MIXROUTE_DEMO_SCALE=0.5 python -m mixroute.demo                      # same, by environment
    python -m mixroute.demo --model tiny --out /tmp/demo                 # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

console = Console()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    scale = float(os.environ.get("MIXROUTE_DEMO_SCALE", "1"))
    p = argparse.ArgumentParser(prog="python -m mixroute.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Base model (default: the embedded SmolLM2-135M-Instruct; "
                                                 "'tiny' for a seconds-long smoke run).")
    p.add_argument("--out", default="runs/demo", help="Directory for the two run directories and the report.")
    p.add_argument("--steps", type=int, default=max(2, int(30 * scale)), help="Optimizer steps of each mixture.")
    p.add_argument("--stage1-steps", type=int, default=max(1, int(8 * scale)), help="MoA stage-1 steps per task.")
    p.add_argument("--per-task", type=int, default=max(12, int(80 * scale)), help="Synthetic records per task.")
    p.add_argument("--max-generate", type=int, default=4, help="Test prompts per task for BLEU / ROUGE-L.")
    p.add_argument("--max-new-tokens", type=int, default=20, help="Generated tokens per prompt.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p.parse_args(argv)


def demo_overrides(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    model = "null" if args.model is None else args.model
    return [f"output_dir={out / name}", f"model.name={model}", f"data.synthetic_per_task={args.per_task}",
            "data.template=plain", "data.max_length=64", f"train.max_steps={args.steps}",
            f"train.stage1_steps={args.stage1_steps}", "train.batch_size=8", "train.lr=0.001",
            "train.warmup_steps=2", f"train.eval_every={max(1, args.steps // 2)}", "train.save_every=0",
            "eval.max_eval=8", f"eval.max_generate={args.max_generate}",
            f"eval.max_new_tokens={args.max_new_tokens}"]


def base_perplexity(args: argparse.Namespace) -> None:
    """The first thing the demo shows: the frozen model's perplexity per synthetic task on one batch each."""
    from mixroute.config import load_config
    from mixroute.data import RunData
    from mixroute.evaluate import held_out_pass, perplexity
    from mixroute.rundir import load_model

    cfg = load_config(None, demo_overrides(args, "base", Path(args.out)))
    model, tok = load_model(cfg.model)
    data = RunData.build(cfg, tok)
    held = held_out_pass(model, None, data.batches("validation", 8))
    ppl = perplexity(held.nll, held.tokens, held.task_ids, data.categories)
    console.print(f"[bold]base model[/bold] ({getattr(model, 'mixroute_source', '?')}), tasks: "
                  f"{', '.join(data.categories)}")
    for c, v in ppl["per_category"].items():
        console.print(f"  perplexity {c:<16} {v:10.2f}")


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the demo; returns {method: eval.json dict} and "report": the HTML report's path."""
    from mixroute.config import load_config
    from mixroute.evaluate import evaluate_run
    from mixroute.models import quiet_transformers
    from mixroute.report import write_report
    from mixroute.report.compare import comparison_table, to_markdown
    from mixroute.train import train

    args = parse_args(argv)
    quiet_transformers()
    out = Path(args.out)
    t0 = time.time()
    base_perplexity(args)
    results = {}
    for method in ("lora_mixed", "moa"):
        console.rule(f"[bold]{method}")
        moa = ["mixture.route_train=label", "train.router_lr=0.01"] if method == "moa" else []  # as configs/moa.yaml
        cfg = load_config(None, [f"train.method={method}", "mixture.eta=0.1"] + moa + demo_overrides(args, method, out))
        run_dir = train(cfg, overwrite=True, progress=not args.quiet)
        results[method] = evaluate_run(run_dir)
    console.rule("[bold]comparison (test split)")
    print(to_markdown(comparison_table(list(results.values()))))
    acc, clf = results["moa"]["router_accuracy"], results["moa"]["classifier_accuracy"]
    if acc:
        console.print(f"MoA router accuracy (top-1 vs task label): [bold]{acc['overall']:.1%}[/bold]; "
                      f"logistic-regression classifier on the same pooled hidden states: {clf['overall']:.1%}")
        console.print(f"confusion (rows = task, columns = expert): {acc['confusion']}")
    for m, r in results.items():
        console.print(f"{m}: trainable parameters {r['trainable_parameters']:,}")
    report = write_report([out / m for m in results], out / "report")
    console.print(f"report: [bold]{report}[/bold]")
    results["report"] = str(report)
    console.print(f"demo finished in {time.time() - t0:.0f} s; runs in {out}")
    (out / "demo_summary.json").write_text(json.dumps({m: r for m, r in results.items() if m != "report"},
                                                      indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
