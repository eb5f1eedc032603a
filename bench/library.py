"""Expert library on Dolly-15k -> docs/benchmarks.md ("## Expert library").

Trains one LoRA per category separately (``lora_single``: each on its own category alone) and one LoRA on the
union (``lora_mixed``), on the same seeded split. Builds a library from the first ``--initial`` categories'
LoRAs, then adds the others one at a time. After each addition: router accuracy on every category so far for
centroid, arrow and a re-fitted task router; per-category test perplexity with routed experts (centroid) vs
the oracle expert; and the old categories' routed perplexity before and after the addition. At the end: the
library's routed perplexity against the union LoRA, and the quality-vs-cost curve of cost-aware routing
(calibrated, costs 1..N for illustration).

Full size (embedded SmolLM2-135M-Instruct, all 8 Dolly categories, about 50 min on 2 CPU cores):

    python bench/library.py --per-category 96 --stage1-steps 12 --mixed-steps 96

Smoke (seconds, no files): python bench/library.py --model tiny --data synthetic --per-category 6 \
    --stage1-steps 1 --mixed-steps 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import DOLLY, ROOT, fmt, write_section  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DOLLY, help="Dolly JSONL, or 'synthetic' for the built-in suite.")
    p.add_argument("--model", default=None, help="Base model (default: embedded SmolLM2-135M; 'tiny' to smoke).")
    p.add_argument("--out", default=str(ROOT / "runs" / "library_bench"))
    p.add_argument("--per-category", type=int, default=96, help="Records per category (seeded sample).")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--stage1-steps", type=int, default=12, help="Steps of each category's LoRA.")
    p.add_argument("--mixed-steps", type=int, default=96, help="Steps of the union LoRA.")
    p.add_argument("--initial", type=int, default=4, help="Categories in the library before the additions.")
    p.add_argument("--examples", type=int, default=16, help="Example prompts per expert (centroid prototypes).")
    p.add_argument("--fit-steps", type=int, default=300, help="Steps of the task router's refit.")
    p.add_argument("--max-eval", type=int, default=24, help="Test examples per category.")
    p.add_argument("--lambdas", default="0,0.002,0.005,0.01,0.02,0.05,0.1", help="Cost weights of the curve.")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


def train_runs(a: argparse.Namespace) -> tuple[Path, Path]:
    from mixroute.config import load_config, to_dict
    from mixroute.rundir import read_config, recorded_config
    from mixroute.train import train

    common = [f"model.name={a.model}" if a.model else "model.name=null", f"data.max_length={a.max_length}",
              "train.eval_every=0", "train.save_every=0", "eval.max_eval=4", "data.val_fraction=0.125",
              "data.test_fraction=0.25"]
    if a.data == "synthetic":
        common += ["data.path=null", f"data.synthetic_per_task={a.per_category}"]
    else:
        common += [f"data.path={a.data}", f"data.max_per_category={a.per_category}"]
    out = []
    for method, extra in (("lora_single", [f"train.stage1_steps={a.stage1_steps}"]),
                          ("lora_mixed", [f"train.max_steps={a.mixed_steps}"])):
        run_dir = Path(a.out) / method
        cfg = load_config(ROOT / "configs" / f"{method}.yaml", common + extra + [f"output_dir={run_dir}"])
        same = (run_dir / "final").is_dir() and (to_dict(recorded_config(read_config(run_dir), True))
                                                 == to_dict(recorded_config(cfg, True)))
        if not same:
            print(f"training {method} ...", flush=True)
            train(cfg, overwrite=True, progress=sys.stdout.isatty())
        out.append(run_dir)
    return out[0], out[1]


def evaluate(lib: Any, batches: list[dict], cats: list[str]) -> dict[str, Any]:
    """Router accuracy (centroid, arrow, task) and routed / oracle perplexity per category of ``batches``."""
    from mixroute.evaluate import held_out_pass, perplexity

    names = lib.man.names()
    label = lambda held: torch.tensor([names.index(cats[t]) for t in held.task_ids])  # noqa: E731
    res: dict[str, Any] = {"accuracy": {}, "routed": {}, "oracle": {}}
    for router in ("centroid", "arrow", "task"):
        mix = lib.mixture(router)
        held = held_out_pass(mix.model, mix, batches)
        picks = torch.stack(list(held.routing.values())).mean(0).argmax(-1)
        hit = picks == label(held)
        res["accuracy"][router] = {c: float(hit[held.task_ids == cats.index(c)].float().mean()) for c in names}
        if router == "centroid":
            res["routed"] = perplexity(held.nll, held.tokens, held.task_ids, cats)["per_category"]
    mix = lib.mixture("centroid")
    for c in names:
        w = torch.zeros(len(names))
        w[names.index(c)] = 1.0
        mix.force(w)
        sel = [b for b in batches if int(b["task_ids"][0]) == cats.index(c)]
        held = held_out_pass(mix.model, mix, sel)
        mix.force(None)
        res["oracle"][c] = perplexity(held.nll, held.tokens, held.task_ids, cats)["per_category"][c]
    return res


def main() -> None:
    a = parse_args()
    t0 = time.time()
    from mixroute.data import Collator, make_batches
    from mixroute.evaluate import held_out_pass, perplexity
    from mixroute.library import Library
    from mixroute.rundir import load_run, stage1_dir

    single_dir, mixed_dir = train_runs(a)
    run = load_run(single_dir)
    run.mix.detach()
    cats = list(run.data.categories)
    if a.initial >= len(cats):
        sys.exit(f"--initial {a.initial} must be below the {len(cats)} categories")
    collate = Collator(run.tok)
    test = run.data.examples["test"]
    per_cat = {c: [e for e in test if e["task_id"] == i][: a.max_eval] for i, c in enumerate(cats)}
    batches_of = {c: list(make_batches(ex, collate, 8)) for c, ex in per_cat.items()}
    train_recs = run.data.records["train"]
    lib_dir = Path(a.out) / "library"
    if lib_dir.exists():
        import shutil

        shutil.rmtree(lib_dir)
    lib = Library.create(lib_dir, a.model, template=run.cfg.data.template, max_length=a.max_length,
                         model=run.model, tok=run.tok, progress=sys.stdout.isatty())
    fit_file = Path(a.out) / "fit.jsonl"
    steps, before = [], None
    for k, c in enumerate(cats):
        examples = [r for r in train_recs if r.category == c][: a.examples]
        lib.add(c, stage1_dir(single_dir, c), examples, cost=float(k + 1))
        if k + 1 < a.initial:
            continue
        kept = [r for r in train_recs if r.category in lib.man.names()]
        fit_file.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in kept))
        lib.fit_router(fit_file, steps=a.fit_steps)
        batches = [b for n in lib.man.names() for b in batches_of[n]]
        res = evaluate(lib, batches, cats)
        res["added"] = c if k + 1 > a.initial else None
        res["old_before"] = before
        steps.append(res)
        before = res["routed"]
        print(f"{len(lib.man.names())} experts: accuracy "
              + ", ".join(f"{r} {sum(v.values()) / len(v):.3f}" for r, v in res["accuracy"].items()), flush=True)
    mixed = load_run(mixed_dir)
    held = held_out_pass(mixed.model, mixed.mix, [b for c in cats for b in batches_of[c]])
    union = perplexity(held.nll, held.tokens, held.task_ids, cats)["per_category"]
    mixed.mix.detach()
    val = Path(a.out) / "val.jsonl"
    val.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in run.data.records["validation"]))
    lib.calibrate(val)
    from mixroute.library.curve import cost_curve

    test_file = Path(a.out) / "test.jsonl"
    test_file.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in run.data.records["test"]))
    curve = cost_curve(lib, test_file, [float(x) for x in a.lambdas.split(",")], router="centroid",
                       max_examples=a.max_eval * len(cats))
    from mixroute.report.plots import cost_curve_plot

    cost_curve_plot(curve, Path(a.out) / "cost_curve.png", "Dolly expert library" if a.data != "synthetic" else "")
    (Path(a.out) / "results.json").write_text(json.dumps({"steps": steps, "union": union, "curve": curve},
                                                         indent=1, default=str))
    text = section(a, cats, steps, union, curve, time.time() - t0)
    print(text)
    if not a.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "## Expert library", text)


def section(a: argparse.Namespace, cats: list[str], steps: list[dict], union: dict, curve: list[dict],
            seconds: float) -> str:
    mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
    cmd = " ".join(["python bench/library.py"] + sys.argv[1:])
    lines = ["## Expert library", "",
             f"`{cmd}` ({seconds / 60:.0f} min; base {a.model or 'SmolLM2-135M-Instruct'}, "
             f"{a.per_category} records per category, {a.stage1_steps} steps per category LoRA, "
             f"{a.examples} example prompts per expert, {a.max_eval} test examples per category). One LoRA per "
             f"category trained alone; the library starts with {a.initial} and gains one expert at a time, "
             "nothing retrained but the task router (fit-router, frozen experts).", "",
             "| experts | added | centroid acc | arrow acc | task acc (refit) | routed ppl | oracle ppl | "
             "old categories ppl before -> after |", "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        acc = {r: mean(v) for r, v in s["accuracy"].items()}
        old = [c for c in (s["old_before"] or {})]
        drift = (f"{fmt(mean({c: s['old_before'][c] for c in old}))} -> {fmt(mean({c: s['routed'][c] for c in old}))}"
                 if old else "-")
        lines.append(f"| {len(s['routed'])} | {s['added'] or '(initial)'} | {fmt(acc['centroid'], 3)} | "
                     f"{fmt(acc['arrow'], 3)} | {fmt(acc['task'], 3)} | {fmt(mean(s['routed']))} | "
                     f"{fmt(mean(s['oracle']))} | {drift} |")
    last = steps[-1]
    lines += ["", "Per category with every expert in the library (test perplexity; accuracy of each router):", "",
              "| category | routed (centroid) | oracle expert | union LoRA | centroid acc | arrow acc | task acc |",
              "|---|---|---|---|---|---|---|"]
    for c in cats:
        lines.append(f"| {c} | {fmt(last['routed'].get(c))} | {fmt(last['oracle'].get(c))} | {fmt(union.get(c))} | "
                     f"{fmt(last['accuracy']['centroid'].get(c), 3)} | {fmt(last['accuracy']['arrow'].get(c), 3)} | "
                     f"{fmt(last['accuracy']['task'].get(c), 3)} |")
    lines.append(f"| **average** | {fmt(mean(last['routed']))} | {fmt(mean(last['oracle']))} | {fmt(mean(union))} "
                 "| | | |")
    lines += ["", findings(steps, union)]
    lines += ["", "Cost-aware routing (centroid with calibrated loss estimates, `mixroute library curve`; expert "
              "costs set to 1..N in the order added, for illustration):", "", "| lambda | routed ppl | mean cost |",
              "|---|---|---|"]
    lines += [f"| {r['lambda']:g} | {fmt(r['ppl'])} | {fmt(r['mean_cost'])} |" for r in curve]
    lines += ["", curve_finding(curve)]
    return "\n".join(lines) + "\n"


def findings(steps: list[dict], union: dict) -> str:
    """Sentences derived from the numbers only."""
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    last = steps[-1]
    n = len(last["routed"])
    routed, oracle, uni = mean(last["routed"]), mean(last["oracle"]), mean(union)
    acc = {r: mean(v) for r, v in last["accuracy"].items()}
    best = max(acc, key=acc.get)
    drift = [abs(s["routed"][c] - s["old_before"][c]) / s["old_before"][c] for s in steps if s["old_before"]
             for c in s["old_before"]]
    out = [f"With all {n} experts, routed (centroid) average test perplexity is {routed:.2f}, "
           f"{100 * (routed / oracle - 1):+.1f}% against the oracle expert ({oracle:.2f}) and "
           f"{100 * (routed / uni - 1):+.1f}% against one LoRA trained on the union ({uni:.2f}).",
           f"The most accurate router is {best} ({acc[best]:.3f}; chance is {1 / n:.3f}); "
           + ", ".join(f"{r} {v:.3f}" for r, v in acc.items() if r != best) + "."]
    below = [r for r, v in acc.items() if v <= 1.5 / n]
    if below:
        out.append(f"{' and '.join(below)} {'is' if len(below) == 1 else 'are'} within 1.5x of chance.")
    if drift:
        out.append(f"Adding an expert changed an old category's routed perplexity by at most {100 * max(drift):.1f}%.")
    return " ".join(out)


def curve_finding(curve: list[dict]) -> str:
    a, b = curve[0], curve[-1]
    moved = "lower" if b["ppl"] < a["ppl"] else "higher" if b["ppl"] > a["ppl"] else "the same"
    text = (f"From lambda {a['lambda']:g} to {b['lambda']:g} the mean cost goes {a['mean_cost']:.2f} -> "
            f"{b['mean_cost']:.2f} and the routed perplexity {a['ppl']:.2f} -> {b['ppl']:.2f} ({moved}).")
    if b["ppl"] < a["ppl"] and b["mean_cost"] < a["mean_cost"]:
        text += (" Cheaper experts at lower perplexity: at lambda 0 the calibrated loss estimates picked experts "
                 "that were worse than the cost-driven choice, so here they do not rank the experts by their loss.")
    return text


if __name__ == "__main__":
    main()
