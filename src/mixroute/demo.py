"""``make demo``: train a routed mixture (MoA) and a single mixed LoRA on the built-in ``ciphers`` suite with the
embedded SmolLM2-135M-Instruct, evaluate them, print the comparison table, the router accuracy and a summary of
which method won, by how much, at what budget and what would change it, and write the HTML report. About 5 to 6
minutes on an idle 2-core CPU (estimated; 11.5 min measured with one thread on a loaded 2-core CPU).

The suite (``mixroute.data.synthetic``) is built as the case a routed mixture exists for: four tasks with the
same inputs (8 digits from 1-5) and conflicting outputs, a different substitution of the digits per task, told
apart only by the key the instruction names (``Encode with the amber key: 33531122``). Under the four keys
every input digit becomes each of the four other digits once, so the same input has a different answer under
every task at every output token. One LoRA shared by the four must learn all four tables and read the key; one
LoRA per task learns a single table, and a router reading the prompt picks it. Measured at these defaults, the
shared LoRA still won (docs/training.md, "The demo"); the summary says whichever way it comes out.

Four runs, evaluated alike on the test split: ``base`` (the frozen model), ``lora_mixed`` (one LoRA on all
tasks), ``lora_single`` (MoA's stage 1: one LoRA per task, the task label picks the expert) and ``moa`` (stage 2
from those LoRAs: experts + a learned router, with the MoA recipe's defaults, router pre-training included; the
experts at a lower learning rate, since stage 2 at the stage-1 rate undoes them). lora_mixed takes as many steps
of the same batch size as MoA's stage 1 and stage 2 together: both see the same number of training sequences.

    python -m mixroute.demo                      # defaults: 4 tasks x 12 stage-1 steps + 6 stage-2 steps
    python -m mixroute.demo --stage1-steps 24 --steps 12    # about twice the training time
    python -m mixroute.demo --suite conventions  # six date conventions (one shared LoRA learns them all)
    python -m mixroute.demo --suite formats      # the default suite of `mixroute train` instead
    MIXROUTE_DEMO_SCALE=0.5 python -m mixroute.demo                       # smaller / faster, by environment
    python -m mixroute.demo --model tiny --out /tmp/demo                  # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

console = Console()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    scale = float(os.environ.get("MIXROUTE_DEMO_SCALE", "1"))
    p = argparse.ArgumentParser(prog="python -m mixroute.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Base model (default: the embedded SmolLM2-135M-Instruct; "
                                                 "'tiny' for a seconds-long smoke run).")
    p.add_argument("--out", default="runs/demo", help="Directory for the run directories and the report.")
    p.add_argument("--suite", default="ciphers", choices=["ciphers", "conventions", "formats"],
                   help="Built-in synthetic suite (data.synthetic_suite): ciphers (same inputs, four conflicting "
                        "digit substitutions), conventions (same inputs, six conflicting date formats) or formats "
                        "(eight different input/output formats).")
    p.add_argument("--stage1-steps", type=int, default=max(1, int(12 * scale)),
                   help="MoA stage 1: steps of each task's LoRA.")
    p.add_argument("--steps", type=int, default=max(2, int(6 * scale)),
                   help="MoA stage 2: steps of the experts and the router together.")
    p.add_argument("--mixed-steps", type=int, default=None,
                   help="lora_mixed steps (default: tasks x stage-1 steps + stage-2 steps, the same number of "
                        "training sequences as MoA).")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per step, every method.")
    p.add_argument("--per-task", type=int, default=max(12, int(40 * scale)), help="Synthetic records per task.")
    p.add_argument("--lr", type=float, default=4e-3, help="Peak learning rate of the stage-1 LoRAs and lora_mixed.")
    p.add_argument("--stage2-lr", type=float, default=5e-4, help="Peak learning rate of the experts in MoA's "
                                                                 "stage 2 (the router's: the recipe's "
                                                                 "train.router_lr).")
    p.add_argument("--max-generate", type=int, default=4, help="Test prompts per task for BLEU / ROUGE-L.")
    p.add_argument("--max-new-tokens", type=int, default=10, help="Generated tokens per prompt.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p.parse_args(argv)


def demo_overrides(args: argparse.Namespace, name: str, out: Path, steps: Optional[int] = None,
                   lr: Optional[float] = None) -> list[str]:
    """The demo's config overrides for run ``name`` (``steps``: train.max_steps, default ``args.steps``;
    ``lr``: train.lr, default ``args.lr``)."""
    model = "null" if args.model is None else args.model
    steps = args.steps if steps is None else steps
    return [f"output_dir={out / name}", f"model.name={model}", f"data.synthetic_suite={args.suite}",
            f"data.synthetic_per_task={args.per_task}", "data.template=plain", "data.max_length=64",
            f"train.max_steps={steps}", f"train.stage1_steps={args.stage1_steps}",
            f"train.batch_size={args.batch_size}", f"train.lr={args.lr if lr is None else lr}", "train.warmup_steps=2",
            f"train.eval_every={max(1, steps // 2)}", "train.save_every=0", "eval.max_eval=8",
            f"eval.max_generate={args.max_generate}", f"eval.max_new_tokens={args.max_new_tokens}"]


def demo_budget(args: argparse.Namespace, tasks: int) -> dict[str, Any]:
    """Steps of each method; lora_mixed defaults to MoA's total (stage 1 of every task + stage 2)."""
    moa = tasks * args.stage1_steps + args.steps
    return {"tasks": tasks, "stage1_steps": args.stage1_steps, "stage2_steps": args.steps, "moa_steps": moa,
            "mixed_steps": args.mixed_steps or moa, "batch_size": args.batch_size, "lr": args.lr,
            "stage2_lr": args.stage2_lr, "per_task": args.per_task, "suite": args.suite}


def demo_tasks(args: argparse.Namespace) -> list[str]:
    """The suite's task names (the categories, in the order the experts are numbered); no model needed."""
    from mixroute.config import load_config
    from mixroute.data import load_config_records

    return load_config_records(load_config(None, demo_overrides(args, "base", Path(args.out))).data).categories


def _pct(x: float) -> str:
    return f"{x:.1%}"


def summary_lines(results: dict[str, dict], budget: dict[str, Any]) -> list[str]:
    """The demo's verdict, every number and every either-or derived from ``results`` (eval.json dicts of
    ``moa`` and ``lora_mixed``, optionally ``lora_single``: the same experts picked by the task label, and
    ``base``: the frozen model) and ``budget`` (``demo_budget``): which method has the lower average perplexity
    and by how much, every method's perplexity, the router against the classifier, the budget, and what the
    outcome means or what would change it."""
    moa, mixed, oracle = results["moa"], results["lora_mixed"], results.get("lora_single")
    a, b = moa["perplexity"]["average"], mixed["perplexity"]["average"]
    diff, rel = a - b, (a - b) / b
    pa, pb = moa["perplexity"]["per_category"], mixed["perplexity"]["per_category"]
    common = [c for c in pa if c in pb]
    gains = sorted((c for c in common if pa[c] < pb[c]), key=lambda c: pa[c] - pb[c])  # largest gain first
    losses = sorted((c for c in common if pa[c] > pb[c]), key=lambda c: pb[c] - pa[c])  # largest loss first
    split = moa.get("split", "test")
    lines = []

    # ---- which method won, by how much
    if abs(rel) < 0.01:
        outcome = "tie"
        lines.append(f"Result: a tie on average {split} perplexity: MoA {a:.2f}, lora_mixed {b:.2f} "
                     f"({diff:+.2f}, {rel:+.1%}); MoA is lower on {len(gains)} of {len(common)} tasks.")
    elif a < b:
        outcome = "moa"
        lines.append(f"Result: MoA wins: average {split} perplexity {a:.2f} against {b:.2f} for the single mixed "
                     f"LoRA, {-diff:.2f} lower ({-rel:.1%} below lora_mixed); MoA is lower on {len(gains)} of "
                     f"{len(common)} tasks.")
    else:
        outcome = "mixed"
        lines.append(f"Result: the single mixed LoRA wins: average {split} perplexity {b:.2f} against {a:.2f} for "
                     f"MoA, {diff:.2f} lower (MoA is {rel:.1%} above lora_mixed); MoA is lower on {len(gains)} of "
                     f"{len(common)} tasks.")
    per_task = [f"largest MoA {kind} {c[0]} ({pa[c[0]]:.2f} vs {pb[c[0]]:.2f} for lora_mixed)"
                for kind, c in (("gain", gains), ("loss", losses)) if c]
    if per_task:
        lines.append("Per task: " + ", ".join(per_task) + ".")
    order = [m for m in ("base", "lora_mixed", "lora_single", "moa") if m in results]
    lines.append(f"Average {split} perplexity per method (lower is better, {len(common)} tasks): "
                 + ", ".join(f"{m} {results[m]['perplexity']['average']:.2f}" for m in order) + ".")

    # ---- the router
    acc = (moa.get("router_accuracy") or {}).get("overall")
    clf = (moa.get("classifier_accuracy") or {}).get("overall")
    if acc is None:
        lines.append("Router accuracy: none in MoA's results (no label-aligned router was evaluated).")
    else:
        text = f"Router accuracy: MoA's router sent {_pct(acc)} of the {split} prompts to their own task's expert"
        if clf is not None:
            gap = 100 * (acc - clf)
            if abs(gap) < 0.05:
                text += f"; a logistic-regression classifier on the same hidden states: {_pct(clf)} (the same)"
            else:
                text += (f"; a logistic-regression classifier on the same hidden states: {_pct(clf)} (the router is "
                         f"{abs(gap):.1f} points {'above' if gap > 0 else 'below'} it)")
        lines.append(text + ".")
    o = oracle["perplexity"]["average"] if oracle else None
    if o is not None:
        lines.append(f"Where the difference comes from: the same experts picked by the task label (lora_single) "
                     f"reach {o:.2f}, {'below' if o < b else 'above'} lora_mixed's {b:.2f}; MoA's learned routing "
                     f"and stage 2 move that to {a:.2f} ({a - o:+.2f}).")

    # ---- the budget
    bs, s1, s2, tasks = budget["batch_size"], budget["stage1_steps"], budget["stage2_steps"], budget["tasks"]
    moa_n, mixed_n = budget["moa_steps"] * bs, budget["mixed_steps"] * bs
    lr2 = f" at lr {budget['stage2_lr']:g}" if budget.get("stage2_lr") is not None else ""
    suite = f" of the {budget['suite']!r} suite" if budget.get("suite") else ""
    lines.append(f"Budget ({'equal data' if moa_n == mixed_n else 'UNEQUAL data'}): MoA {tasks} tasks x {s1} "
                 f"stage-1 steps + {s2} stage-2 steps{lr2} = {budget['moa_steps']} steps, {moa_n:,} training "
                 f"sequences; lora_mixed {budget['mixed_steps']} steps, {mixed_n:,} sequences (batch {bs}, lr "
                 f"{budget['lr']:g}{' for stage 1 and lora_mixed' if lr2 else ''}, {budget['per_task']} synthetic "
                 f"records per task{suite}).")

    # ---- what it means / what would change it
    routed_well = acc is None or acc >= 0.9
    more = (f"--stage1-steps {2 * s1}: lora_mixed then gets {tasks * 2 * s1 + s2} steps for equal data, and "
            "training takes about twice as long")
    if outcome == "moa":
        why = ("each task gets its own LoRA and the router finds the task from the prompt" if routed_well else
               f"each task gets its own LoRA, even though the router misroutes {1 - acc:.0%} of the prompts")
        lines.append(f"Meaning: with the same training data, {why}, so no task shares its adapter with the "
                     f"other {tasks - 1}: that is what a routed mixture is for.")
    elif not routed_well:
        lines.append(f"What would change it: the router sends {1 - acc:.0%} of the prompts to another task's "
                     f"expert, which was not trained on them; more stage-2 steps (--steps {2 * s2}) train the router "
                     "longer.")
    elif o is not None and o < b:
        lines.append(f"What would change it: the experts alone beat the shared LoRA, the router finds the task "
                     f"({_pct(acc)}), so what MoA loses is in stage 2: fewer stage-2 steps or a lower --stage2-lr "
                     "keep the experts as stage 1 left them.")
    else:
        lines.append(f"What would change it: the router is not the problem ({_pct(acc)} routed right); the "
                     f"experts are: each trained {s1} steps on its own task, while one LoRA shared by all {tasks} "
                     f"took {budget['mixed_steps']} steps and can carry what the tasks have in common from one to "
                     f"another. More steps per expert narrow the gap ({more}); a routed mixture pays off where "
                     "one shared adapter suffers from conflicting tasks or runs out of capacity, "
                     + ("and at this budget the two are level." if outcome == "tie" else
                        f"and at this budget one LoRA copes with these {tasks} tasks."))
    if moa_n != mixed_n:
        lines.append("Note: the two methods trained on different amounts of data (--mixed-steps): the comparison "
                     "is not like for like.")
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the demo; returns {run: eval.json dict}, "report": the HTML report's path, "summary": its lines."""
    from mixroute.config import load_config
    from mixroute.evaluate import evaluate_run
    from mixroute.models import quiet_transformers
    from mixroute.report import write_report
    from mixroute.report.compare import comparison_table, to_markdown
    from mixroute.rundir import stage1_dir
    from mixroute.train import train

    args = parse_args(argv)
    quiet_transformers()
    out = Path(args.out)
    t0 = time.time()
    tasks = demo_tasks(args)
    budget = demo_budget(args, len(tasks))
    console.print(f"suite {args.suite!r}: {len(tasks)} tasks ({', '.join(tasks)}), {args.per_task} records each",
                  highlight=False)
    equal = "equal data" if budget["mixed_steps"] == budget["moa_steps"] else "UNEQUAL data"
    console.print(f"budget ({equal}): lora_mixed {budget['mixed_steps']} steps; MoA {len(tasks)} tasks x "
                  f"{args.stage1_steps} stage-1 steps + {args.steps} stage-2 steps; batch {args.batch_size}",
                  highlight=False)
    experts = "[" + ",".join(str(stage1_dir(out / "lora_single", c)) for c in tasks) + "]"
    runs = {  # run name -> overrides; moa's stage 2 starts from lora_single's stage-1 LoRAs
        "base": demo_overrides(args, "base", out),
        "lora_mixed": demo_overrides(args, "lora_mixed", out, budget["mixed_steps"]),
        "lora_single": demo_overrides(args, "lora_single", out),
        # one router for the whole sequence, reading the frozen base's middle layer: one decision per prompt,
        # the layout `mixroute serve --engine vllm` can serve (per-layer routers need the local engine)
        "moa": demo_overrides(args, "moa", out, lr=args.stage2_lr) + [f"train.stage1_adapters={experts}",
                                                                        "mixture.router_scope=global"],
    }
    results: dict[str, Any] = {}
    titles = {"base": "the frozen model, nothing trained",
              "lora_mixed": f"one LoRA on all tasks, {budget['mixed_steps']} steps",
              "lora_single": f"MoA stage 1: one LoRA per task, {args.stage1_steps} steps each",
              "moa": f"MoA stage 2: those LoRAs + a learned router, {args.steps} steps"}
    for name, overrides in runs.items():
        console.rule(f"[bold]{name}[/bold]: {titles[name]}")
        cfg = load_config(None, [f"train.method={name}"] + overrides)
        run_dir = train(cfg, overwrite=True, progress=not args.quiet)
        results[name] = evaluate_run(run_dir, progress=not args.quiet, classifier=name == "moa")
        ppl = results[name]["perplexity"]
        per_task = ", ".join(f"{c} {v:.2f}" for c, v in ppl["per_category"].items())
        console.print(f"{name}: test perplexity {per_task}; average {ppl['average']:.2f}", highlight=False)
    console.rule("[bold]comparison (test split)")
    print(to_markdown(comparison_table(list(results.values()))))
    acc = results["moa"]["router_accuracy"]
    if acc:
        console.print(f"confusion of MoA's router (rows = task, columns = expert): {acc['confusion']}")
    for m, r in results.items():
        console.print(f"{m}: trainable parameters {r['trainable_parameters']:,}")
    report = write_report([out / m for m in results if m != "base"], out / "report")  # base: no gates to draw
    console.print(f"report: [bold]{report}[/bold]")
    console.rule("[bold]summary")
    lines = summary_lines(results, budget)
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"demo finished in {time.time() - t0:.0f} s; runs in {out}")
    summary = {m: r for m, r in results.items()}
    summary.update(budget=budget, summary=lines)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    results.update(report=str(report), summary=lines)
    return results


if __name__ == "__main__":
    main()
