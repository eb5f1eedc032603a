"""Expert library on Dolly-15k -> docs/benchmarks.md ("## Expert library").

The experts are the quality benchmark's own runs (bench/quality_dolly.py, one seed, same split, same budget,
learning rate chosen on validation): ``lora_single``'s LoRAs (each trained on its own category alone, early
stopped on that category's validation split) and ``lora_mixed`` (one LoRA on the union). Asking for them
trains only what that benchmark has not already trained, and what is trained here it reuses. A library starts
with the first ``--initial`` categories' LoRAs and gains the others one at a time, nothing retrained but the
task router (fit-router on the train split, frozen experts). After each addition, for every router (centroid,
arrow and the refitted task router per layer; centroid and task once per prompt from the frozen base, what a
server in front of vLLM applies): accuracy of the decisions the forward pass applied (every (example, layer)
decision counts for per-layer routing, with the spread over layers), routed test perplexity per category, the
oracle expert's, and the old categories' routed perplexity before and after the addition. At the end: routed
against the union LoRA, and the quality-vs-cost curve of cost-aware routing (costs 1..N, for illustration).

Full size (embedded SmolLM2-135M-Instruct, 8 Dolly categories, the full budget's 280 train / 40 validation /
80 test examples per category): the two runs (with lora_mixed's learning-rate sweep) take about 70 min on 2
CPU cores when bench/quality_dolly.py has not trained them yet, the library part about 20 min:

    python bench/library.py --budget full --precision bf16

Smoke (a minute, no files under docs/): python bench/library.py --budget smoke --model tiny --data synthetic \
    --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402
from protocol import DOLLY, ROOT, fmt, write_section  # noqa: E402

# (router, scope): per layer as MoA and the library's `--scope layer`; global = one decision per prompt from
# the frozen base at the library's global layer (arrow reads each layer's own LoRA, it has no global form)
ROUTERS = [("centroid", "layer"), ("arrow", "layer"), ("task", "layer"), ("centroid", "global"),
           ("task", "global")]


def label(router: str, scope: str) -> str:
    return f"{router} ({'per layer' if scope == 'layer' else 'per prompt'})"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--budget", choices=list(P.BUDGETS), default="full",
                   help="The quality benchmark's budget the experts are trained at (bench/protocol.py).")
    p.add_argument("--data", default=DOLLY, help="Dolly JSONL, or 'synthetic' for the built-in suite.")
    p.add_argument("--model", default=None, help="Base model (default: embedded SmolLM2-135M; 'tiny' to smoke).")
    p.add_argument("--seed", type=int, default=0, help="The quality benchmark's seed whose runs are the experts.")
    p.add_argument("--per-category", type=int, default=None, help="Records per category (default: the budget's).")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no",
                   help="model.precision of the two runs and of every evaluation here (bf16: autocast, ~2x faster "
                        "on CPUs with avx512_bf16).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sweep", action="store_true", help="The presets' learning rates (no validation sweep).")
    p.add_argument("--quality-out", default=None,
                   help="The quality benchmark's run directory (default: its own, so its runs are shared).")
    p.add_argument("--out", default=None, help="The library and its files (default: runs/library_<budget>).")
    p.add_argument("--initial", type=int, default=4, help="Categories in the library before the additions.")
    p.add_argument("--examples", type=int, default=16, help="Example prompts per expert (centroid prototypes).")
    p.add_argument("--fit-steps", type=int, default=300, help="Steps of the task router's refit.")
    p.add_argument("--max-eval", type=int, default=None, help="Test examples per category (default: all).")
    p.add_argument("--lambdas", default="0,0.002,0.005,0.01,0.02,0.05,0.1", help="Cost weights of the curve.")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="Where the section is written.")
    p.add_argument("--no-write", action="store_true", help="Print only; leave --docs alone.")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.out = str(Path(a.out or ROOT / "runs" / f"library_{a.budget}").resolve())
    return a


def expert_runs(a: argparse.Namespace) -> dict[str, Any]:
    """lora_single's and lora_mixed's results for ``a.seed`` from bench/quality_dolly.py (trained there when
    missing, reused otherwise)."""
    import quality_dolly as Q

    argv = ["--budget", a.budget, "--data", a.data, "--seeds", str(a.seed), "--methods", "lora_mixed",
            "lora_single", "--threads", str(a.threads), "--precision", a.precision, "--no-write"]
    argv += ["--model", a.model] if a.model else []
    argv += ["--per-category", str(a.per_category)] if a.per_category else []
    argv += ["--no-sweep"] if a.no_sweep else []
    argv += ["--out", a.quality_out] if a.quality_out else []
    return Q.main(argv)["results"][a.seed]


def evaluate(lib: Any, batches: list[dict], cats: list[str], oracle: dict[str, float]) -> dict[str, Any]:
    """Per router: accuracy of the applied decisions and routed perplexity per category of ``batches``; the
    oracle expert's perplexity per category. Every batch holds one category (its oracle pass forces one expert).
    ``oracle`` caches that perplexity across calls: a forced expert runs alone, so the other experts in the
    library do not change it and each category's is computed once, when it joins."""
    from mixroute.evaluate import applied_router_accuracy, held_out_pass, perplexity

    names = lib.man.names()
    if names != cats[: len(names)]:
        raise RuntimeError(f"experts {names} are not the first categories {cats[:len(names)]} in order")
    if any(len(set(b["task_ids"].tolist())) > 1 for b in batches):
        raise ValueError("every batch must hold one category")
    res: dict[str, Any] = {"routers": {}}
    for router, scope in ROUTERS:
        mix = lib.mixture(router, scope=scope)
        held = held_out_pass(mix.model, mix, batches)
        acc = applied_router_accuracy(held, names, len(names))
        per_layer = acc.get("per_router", {})
        res["routers"][label(router, scope)] = {
            "accuracy": acc["overall"], "interval": acc["interval"], "per_category": acc["per_category"],
            "layers": len(per_layer) or 1, "agreement": acc.get("agreement"),
            "layer_range": [min(per_layer.values()), max(per_layer.values())] if per_layer else None,
            "ppl": perplexity(held.nll, held.tokens, held.task_ids, cats)["per_category"]}
    mix = lib.mixture("centroid")
    for c in (c for c in names if c not in oracle):
        w = torch.zeros(len(names))
        w[names.index(c)] = 1.0
        mix.force(w)
        sel = [b for b in batches if int(b["task_ids"][0]) == cats.index(c)]
        try:
            held = held_out_pass(mix.model, mix, sel)
        finally:
            mix.force(None)
        oracle[c] = perplexity(held.nll, held.tokens, held.task_ids, cats)["per_category"][c]
    res["oracle"] = {c: oracle[c] for c in names}
    return res


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    a = parse_args(argv)
    t0 = time.time()
    from mixroute.data import Collator, make_batches
    from mixroute.devices import autocast
    from mixroute.evaluate import held_out_pass, perplexity
    from mixroute.library import Library
    from mixroute.library.curve import cost_curve
    from mixroute.models import quiet_transformers
    from mixroute.report.plots import cost_curve_plot
    from mixroute.rundir import load_run, stage1_dir

    quiet_transformers()
    torch.set_num_threads(max(1, a.threads))
    runs = expert_runs(a)
    single_dir, mixed_dir = Path(runs["lora_single"]["dir"]), Path(runs["lora_mixed"]["dir"])
    t_lib = time.time()
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
    out = Path(a.out)
    lib_dir = out / "library"
    if lib_dir.exists():   # rebuilt from the runs each time: minutes, and no stale router state
        import shutil

        shutil.rmtree(lib_dir)
    out.mkdir(parents=True, exist_ok=True)
    # evaluated at the precision the experts trained and were tested at (bench/quality_dolly.py's eval.json)
    with autocast("cpu", a.precision):
        lib = Library.create(lib_dir, a.model, template=run.cfg.data.template, max_length=run.cfg.data.max_length,
                             model=run.model, tok=run.tok, progress=sys.stdout.isatty())
        fit_file = out / "fit.jsonl"
        steps, fits, oracle = [], [], {}
        for k, c in enumerate(cats):
            examples = [r for r in train_recs if r.category == c][: a.examples]
            lib.add(c, stage1_dir(single_dir, c), examples, cost=float(k + 1))
            if k + 1 < a.initial:
                continue
            kept = [r for r in train_recs if r.category in lib.man.names()]
            fit_file.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in kept))
            fits.append({scope: lib.fit_router(fit_file, steps=a.fit_steps, scope=scope)["train_accuracy"]
                         for scope in ("layer", "global")})
            batches = [b for n in lib.man.names() for b in batches_of[n]]
            res = evaluate(lib, batches, cats, oracle)
            res["added"] = c if k + 1 > a.initial else None
            steps.append(res)
            print(f"{len(lib.man.names())} experts: applied accuracy "
                  + ", ".join(f"{r} {v['accuracy']:.3f}" for r, v in res["routers"].items()), flush=True)
        mixed = load_run(mixed_dir)
        held = held_out_pass(mixed.model, mixed.mix, [b for c in cats for b in batches_of[c]])
        union = perplexity(held.nll, held.tokens, held.task_ids, cats)["per_category"]
        mixed.mix.detach()
        val = out / "val.jsonl"
        val.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in run.data.records["validation"]))
        lib.calibrate(val)
        test_file = out / "test.jsonl"
        test_file.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in run.data.records["test"]))
        n_test = sum(len(v) for v in per_cat.values())
        curve = cost_curve(lib, test_file, [float(x) for x in a.lambdas.split(",")], router="centroid",
                           max_examples=n_test)
        cost_curve_plot(curve, out / "cost_curve.png", "Dolly expert library" if a.data != "synthetic" else "")
    result = {"args": dict(vars(a)), "experts": {m: runs[m]["dir"] for m in runs},
              "params": {m: runs[m].get("params") for m in runs}, "steps": steps, "fits": fits, "union": union,
              "curve": curve, "test_per_category": {c: len(v) for c, v in per_cat.items()},
              "library_seconds": time.time() - t_lib, "load": os.getloadavg()[0]}
    P.write_json(out / "results.json", result)
    text = section(a, cats, result, time.time() - t0)
    print(text)
    if not a.no_write:
        write_section(Path(a.docs), "## Expert library", text)
    return result


def _mean(d: dict) -> Optional[float]:
    vals = [v for v in d.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _interval(iv: Optional[list[float]]) -> str:
    return "" if not iv else f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def section(a: argparse.Namespace, cats: list[str], r: dict[str, Any], seconds: float) -> str:
    steps, union, curve = r["steps"], r["union"], r["curve"]
    names = list(steps[-1]["routers"])
    b = P.BUDGETS[a.budget]
    per_cat = a.per_category or b.per_category
    n_test = sorted(set(r["test_per_category"].values()))
    lr = {m: (p or {}).get("train.lr") for m, p in r["params"].items()}
    lines = ["## Expert library", "",
             f"`{P.command('bench/library.py', a.argv)}` ({seconds / 60:.0f} min in all, {r['library_seconds'] / 60:.0f} "
             f"min of it the library; 2-core CPU, 1-minute load average {r['load']:.2f} at the end; a quality run, not a "
             f"timing). Base {a.model or 'SmolLM2-135M-Instruct'}; {'the built-in synthetic suite' if a.data == 'synthetic' else 'Dolly-15k'}, "
             f"{per_cat} records per category, split {1 - b.val_fraction - b.test_fraction:.0%} / {b.val_fraction:.0%} / "
             f"{b.test_fraction:.0%} train / validation / test with seed {a.seed}. The experts are bench/quality_dolly.py's "
             f"seed-{a.seed} runs at the `{a.budget}` budget: lora_single (one LoRA per category trained on that category "
             f"alone, early stopped on its validation split; lr {fmt(lr.get('lora_single'), 4) if lr.get('lora_single') else 'preset'}) "
             f"and lora_mixed (one LoRA on the union; lr {fmt(lr.get('lora_mixed'), 4) if lr.get('lora_mixed') else 'preset'}, chosen "
             f"on validation). The library starts with {a.initial} categories' LoRAs and gains one at a time; nothing is "
             f"retrained but the task router ({a.fit_steps} full-batch steps on the train split's cached features, "
             f"experts frozen). Centroid prototypes: {a.examples} train prompts per expert. Test: "
             f"{'/'.join(map(str, n_test))} examples per category. Training and every evaluation at "
             f"{'float32' if a.precision == 'no' else a.precision + ' autocast (weights float32)'}.", "",
             "Accuracy is of the decisions the forward pass applied: per-layer routers count every (example, layer) "
             "decision (interval: bootstrap over examples); per-prompt routers make one decision per example (Wilson "
             "interval). Chance is 1 / experts.", "",
             "**Applied routing accuracy as the library grows**", "",
             "| experts | added | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for s in steps:
        lines.append(f"| {len(s['oracle'])} | {s['added'] or '(initial)'} | "
                     + " | ".join(_pct(s["routers"][n]["accuracy"]) for n in names) + " |")
    lines += ["", "**Routed test perplexity as the library grows** (mean of the library's categories; old = the "
              "categories already in the library, before -> after the addition, for each router)", "",
              "| experts | added | " + " | ".join(names) + " | oracle expert |", "|---|---|" + "---:|" * (len(names) + 1)]
    for i, s in enumerate(steps):
        cells = []
        for n in names:
            cell = fmt(_mean(s["routers"][n]["ppl"]))
            if i:
                old = list(steps[i - 1]["oracle"])
                cell += (f" (old {fmt(_mean({c: steps[i - 1]['routers'][n]['ppl'][c] for c in old}))} -> "
                         f"{fmt(_mean({c: s['routers'][n]['ppl'][c] for c in old}))})")
            cells.append(cell)
        lines.append(f"| {len(s['oracle'])} | {s['added'] or '(initial)'} | " + " | ".join(cells)
                     + f" | {fmt(_mean(s['oracle']))} |")
    last = steps[-1]
    lines += ["", f"**Per category with all {len(last['oracle'])} experts** (test perplexity)", "",
              "| category | " + " | ".join(names) + " | oracle expert | union LoRA |", "|---|" + "---:|" * (len(names) + 2)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(fmt(last["routers"][n]["ppl"].get(c)) for n in names)
                     + f" | {fmt(last['oracle'].get(c))} | {fmt(union.get(c))} |")
    lines.append("| **average** | " + " | ".join(f"**{fmt(_mean(last['routers'][n]['ppl']))}**" for n in names)
                 + f" | **{fmt(_mean(last['oracle']))}** | **{fmt(_mean(union))}** |")
    lines += ["", f"**Applied accuracy per category with all {len(last['oracle'])} experts** (overall with its 95% "
              "interval; per-layer routers: lowest / highest layer, share of examples whose layers all agree)", "",
              "| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(_pct(last["routers"][n]["per_category"].get(c)) for n in names) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{_pct(last['routers'][n]['accuracy'])}**"
                                                 f"{_interval(last['routers'][n]['interval'])}" for n in names) + " |")
    lines.append("| layers (lowest / highest; all agree) | " + " | ".join(
        (f"{_pct(v['layer_range'][0])} / {_pct(v['layer_range'][1])}; {_pct(v['agreement'])}" if v["layer_range"]
         else "one decision") for v in (last["routers"][n] for n in names)) + " |")
    lines += ["", findings(steps, union, r["fits"])]
    lines += ["", "Cost-aware routing (centroid per layer with calibrated loss estimates, `mixroute library curve`; "
              "expert costs set to 1..N in the order added, for illustration):", "", "| lambda | routed ppl | mean cost |",
              "|---|---|---|"]
    lines += [f"| {c['lambda']:g} | {fmt(c['ppl'])} | {fmt(c['mean_cost'])} |" for c in curve]
    lines += ["", curve_finding(curve)]
    return "\n".join(lines) + "\n"


def findings(steps: list[dict], union: dict, fits: list[dict]) -> str:
    """Sentences derived from the numbers only."""
    last = steps[-1]
    n = len(last["oracle"])
    oracle, uni = _mean(last["oracle"]), _mean(union)
    routed = {k: _mean(v["ppl"]) for k, v in last["routers"].items()}
    acc = {k: v["accuracy"] for k, v in last["routers"].items()}
    best_ppl = min(routed, key=routed.get)
    best_acc = max(acc, key=acc.get)
    out = [f"With all {n} experts the lowest routed perplexity is {best_ppl}'s, {routed[best_ppl]:.2f}: "
           f"{100 * (routed[best_ppl] / oracle - 1):+.1f}% against the oracle expert ({oracle:.2f}) and "
           f"{100 * (routed[best_ppl] / uni - 1):+.1f}% against one LoRA trained on the union ({uni:.2f}).",
           f"The oracle expert is {100 * (oracle / uni - 1):+.1f}% against the union LoRA: "
           + ("even perfect routing to these experts is worse than the shared LoRA, so the library's gap to it is the "
              "experts', not the routers'." if oracle > uni else "routing to these experts can beat the shared LoRA."),
           f"The most accurate router is {best_acc} ({_pct(acc[best_acc])}{_interval(last['routers'][best_acc]['interval'])}; "
           f"chance {_pct(1 / n)}); " + ", ".join(f"{k} {_pct(v)}" for k, v in acc.items() if k != best_acc) + "."]
    below = [k for k, v in acc.items() if v <= 1.5 / n]
    if below:
        out.append(f"{', '.join(below)} {'is' if len(below) == 1 else 'are'} within 1.5x of chance.")
    fit = fits[-1]
    out.append(f"The refitted task router's train accuracy: {_pct(fit['layer'])} per layer (mean over layers), "
               f"{_pct(fit['global'])} per prompt.")
    drift = [abs(s["routers"][k]["ppl"][c] - p["routers"][k]["ppl"][c]) / p["routers"][k]["ppl"][c]
             for p, s in zip(steps, steps[1:]) for k in s["routers"] for c in p["oracle"]]
    if drift:
        out.append(f"Adding an expert changed an old category's routed perplexity by at most {100 * max(drift):.1f}% "
                   "(any router).")
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
