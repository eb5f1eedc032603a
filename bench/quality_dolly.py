"""MoA's table (perplexity, BLEU, ROUGE-L, router vs classifier) on a multi-domain data set -> docs/benchmarks.md.

Trains and evaluates, one after the other in one process, with SmolLM2-135M-Instruct on the same seeded split:
base, lora_single (one LoRA per category, oracle routing = MoA's stage 1), lora_mixed, moa, moe_lora,
moe_lora_naive, prompt_tuning, mop. ``moa`` and ``moe_lora`` start from the same seed's lora_single adapters
(``train.stage1_adapters``: the same weights, trained once).

``--budget full`` (bench/protocol.py) trains every method in epochs of its own data until validation perplexity
stops improving (early stopping, best weights kept, capped), first sweeps learning rates on the validation split
of the first seed (lora_single and moe_lora_naive use the rate chosen for lora_mixed; MoA's stage-2 lr,
router_lr and eta, MoE-LoRA's stage-2 lr, prompt tuning's lr and MoP's prompt and gate lr have their own),
then repeats the chosen configuration over three seeds and reports mean +/- std, paired bootstrap intervals
for the headline comparisons and the validation curves.
``--budget smoke`` is a few fixed steps (the test suite runs it on the tiny model).

``--data`` takes a Dolly-schema JSONL file (default: Dolly-15k), ``synthetic`` (the built-in suite of well
separated tasks) or ``dolly-groups`` (Dolly's 8 categories merged into 4 groups that differ in form: questions,
tasks on a given passage, classification, open-ended writing). Finished runs are reused and a run stopped after
one of its per-epoch checkpoints (or its finished stage-1 LoRAs) resumes from there, so a rerun after a crash or
the end of a session (or with more seeds) only does what is missing.

    python bench/quality_dolly.py --budget full                      # the docs table; hours on 2 cores
    python bench/quality_dolly.py --budget full --data dolly-groups --methods base lora_single lora_mixed moa
    python bench/quality_dolly.py --budget smoke --no-write          # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings as F  # noqa: E402
import protocol as P  # noqa: E402
from protocol import DOLLY, preset, write_section  # noqa: E402

ORDER = ["base", "lora_mixed", "lora_single", "moa", "moe_lora", "moe_lora_naive", "prompt_tuning", "mop"]
SHOWN = ["base", "lora_single", "lora_mixed", "moa", "moe_lora", "moe_lora_naive", "prompt_tuning", "mop"]
# Coordinate-wise sweeps on the first seed's validation split, starting from the presets: each stage tries its
# values with the best of the earlier stages. Every LoRA method trains at the lr chosen for lora_mixed.
SWEEPS: dict[str, list[tuple[str, list[float]]]] = {
    "lora_mixed": [("train.lr", [5e-4, 2e-3])],
    # stage 2 starts from stage-1 LoRAs that early stopping left at their validation optimum: at the LoRA rate
    # they overfit within an epoch (the first full run: every stage-2 trial's best was its start), so the
    # experts' rate in stage 2 is swept too
    # router_scope first: one decision per sequence from the frozen base (global) against the paper's one router
    # per layer; the rest is tuned for the chosen layout. The router rate is tried below the default, not above:
    # on Dolly-8 (seed 0, validation) stage 2 at 1e-2, ten times the pre-training rate, took the pre-trained
    # routers from 64% to 52% accuracy within an epoch. At 1e-3 they fell to 55% as well, so the rate is not
    # the cause; every trial kept its start. The training label loss fell meanwhile (0.16 to 0.02): the routers
    # fit the training prompts, so a rate of 0 (routers stay as pre-training left them, early stopped on
    # validation) is tried last. It held 64.5% but validation still rose (11.451 to 11.523 in 280 steps): the
    # experts, stage-1 LoRAs early stopped on the same data, overfit as well. eta before the router rate: with
    # ties the first value wins, so the finished trials stay the same runs
    "moa": [("mixture.router_scope", ["global", "layer"]), ("train.lr", [5e-5, 3e-4]),
            ("mixture.routers.task.eta", [0.1, 1.0]), ("train.router_lr", [1e-2, 1e-3, 0.0])],
    "moe_lora": [("train.lr", [5e-5, 3e-4])],
    "prompt_tuning": [("train.lr", [3e-2, 1e-1])],
    "mop": [("train.lr", [1.0, 3.0]), ("train.router_lr", [1e-3, 1e-2])],
}
LORA_LR_FROM = "lora_mixed"
USES_LORA_LR = {"lora_single", "moe_lora_naive"}
# the headline comparisons: (a, b), reported as (PPL_a - PPL_b) / PPL_b with a paired bootstrap interval
PAIRS = [("moa", "lora_mixed"), ("moa", "lora_single"), ("lora_mixed", "lora_single"), ("moe_lora", "moa"),
         ("moe_lora", "lora_mixed"), ("mop", "prompt_tuning")]
GROUPS = {"open_qa": "questions", "general_qa": "questions", "closed_qa": "passage tasks",
          "information_extraction": "passage tasks", "summarization": "passage tasks",
          "classification": "classification", "brainstorming": "open-ended writing",
          "creative_writing": "open-ended writing"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = P.parser(__doc__)
    p.add_argument("--data", default=DOLLY, help="A Dolly-schema JSONL file, 'synthetic' or 'dolly-groups'.")
    p.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    p.add_argument("--sweep-keys", nargs="+", default=None, metavar="KEY",
                   help="Sweep only these settings (e.g. mixture.router_scope); the others keep the presets' "
                        "values. Default: every setting in SWEEPS.")
    a = p.parse_args(argv)
    a.data_name = data_name(a.data)
    return P.finish_args(a, argv, f"quality_{a.data_name}_{a.budget}")


def data_name(data: str) -> str:
    if data in ("synthetic", "dolly-groups"):
        return data.replace("-", "_")
    return "dolly" if Path(data).resolve() == Path(DOLLY).resolve() else Path(data).stem


def data_label(a: argparse.Namespace) -> str:
    if a.data == "synthetic":
        return "the built-in synthetic suite (well separated task families)"
    if a.data == "dolly-groups":
        return ("Dolly-15k with its 8 categories merged into 4 groups (" + "; ".join(
            f"{g}: {', '.join(c for c, gg in GROUPS.items() if gg == g)}" for g in dict.fromkeys(GROUPS.values()))
                + ")")
    return "Dolly-15k (8 categories)" if a.data_name == "dolly" else f"`{a.data}`"


def heading(a: argparse.Namespace) -> str:
    return {"dolly": "## Quality", "synthetic": "## Quality: synthetic suite",
            "dolly_groups": "## Quality: Dolly in 4 merged groups"}.get(a.data_name, f"## Quality: {a.data_name}")


def data_path(a: argparse.Namespace) -> Optional[str]:
    """The JSONL the runs read (None = the synthetic suite); dolly-groups is written once under --out."""
    if a.data == "synthetic":
        return None
    if a.data != "dolly-groups":
        return str(Path(a.data).resolve())
    from mixroute.fileio import atomic_write_text

    path = Path(a.out) / "dolly_groups.jsonl"
    if not path.is_file():
        rows = []
        for line in Path(DOLLY).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["category"] = GROUPS[r["category"]]
                rows.append(json.dumps(r))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(rows) + "\n")
    return str(path)


# ------------------------------------------------------------------ configs
def base_overrides(a: argparse.Namespace, seed: int) -> list[str]:
    b = P.BUDGETS[a.budget]
    path = data_path(a)
    data = (["data.path=null", f"data.synthetic_per_task={a.per_category}"] if path is None
            else [f"data.path={path}"])
    return [f"model.name={a.model or 'null'}", *data, f"data.max_per_category={a.per_category}",
            f"data.max_length={b.max_length}", "data.template=plain", f"data.val_fraction={b.val_fraction}",
            f"data.test_fraction={b.test_fraction}", f"data.seed={seed}", f"model.precision={a.precision}",
            f"train.batch_size={a.batch_size}",
            "train.warmup_steps=2", "train.save_every=0", "train.length_grouped=true", f"train.seed={seed}",
            f"mixture.seed={seed}", "eval.max_eval=null", f"eval.max_generate={b.max_generate}",
            f"eval.max_new_tokens={b.max_new_tokens}", "eval.batch_size=8"]


# ------------------------------------------------------------------ one run
class Runner:
    """Trains (or reuses) runs and evaluates the chosen ones on the test split, once."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.commands: dict[str, str] = {}

    def config(self, method: str, seed: int, params: dict[str, float], run_dir: Path,
               stage1: Optional[list[str]] = None) -> tuple[Any, str]:
        from mixroute.config import load_config

        n_train, n_cat = P.split_sizes(tuple(base_overrides(self.a, seed)))
        sched = P.schedule(P.BUDGETS[self.a.budget], n_train, n_cat, self.a.batch_size)
        ov = base_overrides(self.a, seed) + P.schedule_overrides(sched) + [f"{k}={v}" for k, v in params.items()]
        if stage1:  # stage 1 is lora_single's run, so the preset's stage-1 rate does not apply
            ov += ["train.stage1_lr=null", "train.stage1_adapters=[" + ", ".join(stage1) + "]"]
        ov.append(f"output_dir={run_dir}")
        return load_config(preset(method), ov), (f"mixroute train configs/{preset(method).name} "
                                                 + " ".join(shlex.quote(o) for o in ov))

    def train(self, cfg: Any, weights_of: Optional[Path] = None) -> Path:
        """Train (or reuse) ``cfg``; ``weights_of``: the run whose adapters it starts from (retrained first
        when only its archived record is here)."""
        label = str(Path(cfg.output_dir).relative_to(self.a.out))
        before = None if weights_of is None else (
            lambda: P.ensure_weights(weights_of, str(weights_of.relative_to(self.a.out))))
        return P.train_once(cfg, label, self.a.only_finished, before_train=before)

    def test(self, run_dir: Path, method: str) -> dict[str, Any]:
        return P.test_once(run_dir, str(run_dir.relative_to(self.a.out)), self.a.only_finished,
                           classifier=method == "moa", precision=self.a.precision)


# ------------------------------------------------------------------ the experiment
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    import torch

    from mixroute.models import quiet_transformers

    a = parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(max(1, a.threads))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runner = Runner(a)
    chosen: dict[str, dict[str, float]] = {m: {} for m in ORDER}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    results: dict[int, dict[str, dict[str, Any]]] = {}   # seed -> method -> eval.json + run info
    methods = [m for m in ORDER if m in a.methods]
    missing: list[str] = []
    for si, seed in enumerate(a.seeds):
        results[seed] = {}
        for method in methods:
            try:
                one_run(a, runner, method, seed, si, chosen, sweeps, results)
            except P.NotFinished as e:
                missing.append(f"seed {seed} {method}")
                if getattr(e, "tried", None) is not None:
                    sweeps[method] = e.tried
                continue
            if not a.only_finished:
                P.write_json(out / "results.json", {"args": vars(a), "chosen": chosen, "sweeps": sweeps,
                                                    "results": slim(results)})
    figures = curve_figures(a, results)
    text = render(a, results, chosen, sweeps, figures, runner.commands, time.time() - started,
                  os.getloadavg()[0], missing)
    print(text)
    if not a.no_write:
        write_section(Path(a.docs), heading(a), text)
    return {"results": results, "chosen": chosen, "sweeps": sweeps, "text": text, "missing": missing}


def one_run(a: argparse.Namespace, runner: Runner, method: str, seed: int, si: int, chosen: dict, sweeps: dict,
            results: dict) -> None:
    """Train (after its sweep, on the first seed) and test one method on one seed into ``results``."""
    from mixroute import rundir

    sdir = Path(a.out) / f"seed{seed}"
    params = dict(chosen[method])
    if method in USES_LORA_LR and "train.lr" in chosen.get(LORA_LR_FROM, {}):
        params["train.lr"] = chosen[LORA_LR_FROM]["train.lr"]
    stage1 = None
    if method in ("moa", "moe_lora"):
        single = results[seed].get("lora_single")
        if single is None and "lora_single" in a.methods:
            raise P.NotFinished(f"seed {seed} lora_single")
        if single is None:
            print(f"seed {seed}: {method} needs lora_single's stage-1 LoRAs (add lora_single to "
                  "--methods)", flush=True)
            return
        stage1 = [str(rundir.stage1_dir(Path(single["dir"]), c)) for c in single["categories"]]
    weights_of = Path(results[seed]["lora_single"]["dir"]) if stage1 else None
    stages = [st for st in SWEEPS.get(method, []) if a.sweep_keys is None or st[0] in a.sweep_keys]
    if si == 0 and a.sweep and stages:
        start = {**P.sweep_start(stages), **params}

        def train_with(trial: dict, method: str = method, stage1: Optional[list] = stage1) -> Path:
            cfg, _ = runner.config(method, seed, trial, sdir / "sweep" / P.run_name(method, trial), stage1)
            return runner.train(cfg, weights_of)
        params, sweeps[method] = P.sweep(stages, start, train_with, method)
        chosen[method] = {k: v for k, v in params.items() if k != "train.lr" or method not in USES_LORA_LR}
        sdir = sdir / "sweep"  # the chosen configuration's run is the first seed's run: not trained twice
    cfg, command = runner.config(method, seed, params, sdir / P.run_name(method, params), stage1)
    runner.commands.setdefault(method, command)
    run_dir = runner.train(cfg, weights_of)
    res = runner.test(run_dir, method)
    res["dir"], res["params"] = str(run_dir), params
    res["curve"], res["stage1_curves"] = P.validation_curve(run_dir), P.stage1_curves(run_dir)
    res["stopping"] = P.stopping(run_dir)
    results[seed][method] = res


def slim(results: dict[int, dict[str, dict[str, Any]]]) -> dict[int, dict[str, dict[str, Any]]]:
    """results without per-example arrays (results.json stays small; eval.json beside each run has them)."""
    return {s: {m: {k: v for k, v in r.items() if k not in ("per_example", "generation")} for m, r in rs.items()}
            for s, rs in results.items()}


def curve_figures(a: argparse.Namespace, results: dict[int, dict[str, dict[str, Any]]]) -> dict[int, str]:
    """One PNG per seed: every method's validation curve, and each stage-1 LoRA's on its own category."""
    figs = {}
    for seed, rs in results.items():
        curves = {m: r["curve"] for m, r in rs.items() if m != "base" and len(r["curve"]) > 1}
        stage1 = (rs.get("lora_single") or {}).get("stage1_curves") or None
        if not curves and not stage1:
            continue
        png = Path(a.img_dir) / f"quality_{a.data_name}_{a.budget}_curves_seed{seed}.png"
        P.curves_figure(curves, f"{data_name(a.data)}, seed {seed}: validation during training", png, stage1)
        figs[seed] = str(png)
    return figs


# ------------------------------------------------------------------ the section
def _per_seed(results: dict, method: str, get) -> list[Optional[float]]:
    return [get(rs[method]) if method in rs else None for rs in results.values()]


def render(a: argparse.Namespace, results: dict, chosen: dict, sweeps: dict, figures: dict[int, str],
           commands: dict[str, str], wall: float, load: float, missing: Optional[list[str]] = None) -> str:
    import torch

    b = P.BUDGETS[a.budget]
    rs0 = next(iter(results.values()), {})
    methods = [m for m in SHOWN if any(m in rs for rs in results.values())]
    cats = next(iter(rs0.values()))["categories"] if rs0 else []
    n_test = {c: sum(1 for t in next(iter(rs0.values()))["per_example"]["task_ids"] if t == i)
              for i, c in enumerate(cats)} if rs0 else {}
    seconds = sum((r.get("train_seconds") or 0) + (r.get("eval_seconds") or 0)
                  for rs in results.values() for r in rs.values())
    sweep_seconds = sum(_timing(Path(t["dir"])) for tried in sweeps.values() for t in tried)
    command = P.command("bench/quality_dolly.py", a.argv)
    model = "SmolLM2-135M-Instruct (embedded, float32)" if a.model is None else f"`{a.model}`"
    n_train, n_cat = P.split_sizes(tuple(base_overrides(a, a.seeds[0])))
    sched = P.schedule(b, n_train, n_cat, a.batch_size)
    out = [heading(a), "",
           f"Data: {data_label(a)}. Model: {model}. Machine: {os.cpu_count()}-core {platform.machine()} CPU "
           f"({platform.processor() or 'unknown'}), torch {torch.__version__}, {a.threads} threads, "
           f"{P.load_note([r for rs in results.values() for r in rs.values()], load)}. Command: `{command}` "
           f"({time.strftime('%Y-%m-%d')}, commit "
           f"{P.commit()}); training + test evaluation {seconds / 60:.0f} min summed over the reported runs, plus "
           f"{sweep_seconds / 60:.0f} min of sweep runs." + P.archive_note(Path(a.out)), ""]
    if b.steps is None:
        how = (f"every method trains in epochs of its own data (one single LoRA: its category's ~{n_cat} train "
               f"examples, {P.PAPER_PER_TASK[0] / n_cat:.0f}-{P.PAPER_PER_TASK[1] / n_cat:.0f}x below the MoA "
               f"authors' advice: quality drops below {P.PAPER_PER_TASK[0]:,} per domain, more than "
               f"{P.PAPER_PER_TASK[1]:,} works best; "
               f"{sched['stage1_eval_every']} steps an epoch; the others: the union of {n_train}, "
               f"{sched['eval_every']} steps an epoch), is validated every half epoch (the trainer validates "
               f"at least twice per epoch) on the validation split (category-average perplexity; a stage-1 "
               f"LoRA on its own category) and stops after {b.patience} validations without improvement, "
               f"keeping its best weights, at most {b.max_epochs} epochs. moa's stage 2 runs to its own "
               "plateau from the stage-1 LoRAs, after its routers are pre-trained on the labels with the "
               "experts frozen.")
    else:
        how = (f"a fixed {b.steps} steps per method ({b.stage1_steps} per single LoRA), no early stopping: a "
               "check that everything runs, not a measurement.")
    out += [f"Budget `{a.budget}`: {a.per_category} records per category sampled with each seed, stratified "
            f"{100 * (1 - b.val_fraction - b.test_fraction):.0f}/{100 * b.val_fraction:.0f}/"
            f"{100 * b.test_fraction:.0f} % train/validation/test (test: "
            + ", ".join(f"{n}" for n in sorted(set(n_test.values()))) + " examples per category for perplexity, "
            f"the first {b.max_generate} of each for BLEU / ROUGE-L with {b.max_new_tokens} greedy tokens); "
            f"plain template, max_length {b.max_length}, batch {a.batch_size}, length-grouped batches, AdamW with "
            f"2 warm-up steps and cosine decay over the cap; LoRA r=8 alpha=16 on all linear projections; {how} "
            f"Seeds {', '.join(map(str, a.seeds))} (each: data sample, split, initialisation and data order). "
            "Tables: mean ± standard deviation over the seeds.", ""]
    out += P.missing_note(missing or [])
    if sweeps:
        lora = chosen.get(LORA_LR_FROM, {}).get("train.lr")
        only = ("" if a.sweep_keys is None else "; only " + ", ".join(f"`{k}`" for k in a.sweep_keys)
                + " swept, every other setting (learning rates included) is the preset's "
                "(configs/<method>_dolly.yaml)")
        out += P.sweep_table(sweeps, " on the first seed; the chosen values are used for every seed" + only + (
            f"; lora_single (MoA's stage 1) and moe_lora_naive train at lr {lora:g}, the rate chosen for "
            f"{LORA_LR_FROM}; the stage 2 of moa and moe_lora, which continues from those stage-1 LoRAs, has "
            "its own" if lora is not None else ""), {m: chosen[m] for m in sweeps if chosen.get(m)})
    for title, key, nd in (("Test perplexity (lower is better)", "perplexity", 3), ("BLEU", "bleu", 2),
                           ("ROUGE-L", "rougeL", 2)):
        out += [f"**{title}**", "", "| category | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for c in cats + ["average"]:
            cells = [P.fmt_ms(_per_seed(results, m, (lambda r, c=c: r[key].get("average") if c == "average"
                                                     else r[key]["per_category"].get(c))), nd) for m in methods]
            out.append(f"| {'**average**' if c == 'average' else c} | " + " | ".join(cells) + " |")
        out.append("")
    out += paired_table(results)
    out += router_table(results)
    out += ["**Trainable parameters, steps and time** (steps: where early stopping kept the weights / where it "
            "stopped, per seed; single LoRAs: the range over categories; train s / eval s: wall-clock seconds of one "
            "run, which include any slowdown from other jobs on the machine at the time)", "",
            "| method | trainable parameters | best / stopped step | train s | eval s |", "|---|---:|---|---:|---:|"]
    for m in methods:
        r0 = next(rs[m] for rs in results.values() if m in rs)
        steps = "; ".join(_steps(rs[m]) for rs in results.values() if m in rs)
        out.append(f"| {m} | {r0['trainable_parameters']:,} | {steps or '-'} | "
                   f"{P.fmt_ms(_per_seed(results, m, lambda r: r.get('train_seconds')), 0)} | "
                   f"{P.fmt_ms(_per_seed(results, m, lambda r: r.get('eval_seconds')), 0)} |")
    out.append("")
    if figures:
        docs_dir = Path(a.docs).resolve().parent
        out += ["**Validation curves** (category-average validation perplexity at each epoch; the right panel: "
                "each stage-1 LoRA on its own category)", ""]
        out += [f"![validation curves, seed {s}]({os.path.relpath(p, docs_dir)})" for s, p in figures.items()]
        out.append("")
    out += ["**What this shows, against the papers**", ""] + F.render(findings(a, results, methods)) + [""]
    out += ["<details><summary>Exact commands (first seed; the others change the seeds)</summary>", "", "```"]
    out += [commands[m] for m in methods if m in commands]
    out += ["```", "", "</details>", ""]
    return "\n".join(out)


def _timing(run_dir: Path) -> float:
    path = run_dir / "bench_timing.json"
    return json.loads(path.read_text()).get("train_seconds", 0) if path.is_file() else 0


def _steps(r: dict[str, Any]) -> str:
    """Where early stopping kept the weights / where it stopped (single LoRAs: ranges over categories)."""
    if r.get("stage1_curves") and r.get("method") == "lora_single":
        curves = r["stage1_curves"].values()
        best = [min(c, key=lambda p: p[1])[0] for c in curves if c]
        last = [c[-1][0] for c in curves if c]
        return f"{min(best)}-{max(best)} / {min(last)}-{max(last)}" if best else "-"
    stops = [s for s in r.get("stopping") or [] if "category" not in s]
    if not stops:
        return "-"
    from mixroute.report.compare import KEPT_PRETRAINED

    flag = ""
    if P.kept_start(stops[-1]):
        flag = (KEPT_PRETRAINED if r.get("dir") and P.pretrained_start(Path(r["dir"]))
                else " **not trained** (kept its start)")
    return f"{stops[-1]['best_step']} / {stops[-1]['stopped_step']}{flag}"



def paired(results: dict, a: str, b: str) -> Optional[tuple[P.Paired, list[float]]]:
    p, per_seed = P.Paired(), []
    for seed, rs in results.items():
        if a in rs and b in rs and "per_example" in rs[a] and "per_example" in rs[b]:
            one = P.Paired()
            one.add(rs[a], rs[b])
            per_seed.append(P.relative_ppl_diff(one, range(len(one.tokens))))
            p.add(rs[a], rs[b], tag=seed)
    return (p, per_seed) if per_seed else None


def paired_table(results: dict) -> list[str]:
    rows = []
    for a, b in PAIRS:
        got = paired(results, a, b)
        if got is None:
            continue
        p, per_seed = got
        point, lo, hi = P.paired_bootstrap(p)
        rows.append(f"| {a} vs {b} | " + ", ".join(f"{d:+.1f}%" for d in per_seed)
                    + f" | {point:+.1f}% | [{lo:+.1f}%, {hi:+.1f}%] | {P.verdict(lo, hi, a, b)} |")
    if not rows:
        return []
    return ["**Paired comparisons** (relative difference of the average test perplexity, (a - b) / b, negative = a "
            "better; per seed, and pooled over the seeds' test examples with a paired bootstrap 95% interval: "
            "2000 resamples of test examples within each category, the same examples for both methods)", "",
            "| a vs b | per seed | pooled | 95% interval | verdict |", "|---|---|---:|---|---|", *rows, ""]


def router_table(results: dict) -> list[str]:
    rows = []
    for seed, rs in results.items():
        r = rs.get("moa") or {}
        ra, ca = r.get("router_accuracy") or {}, r.get("classifier_accuracy") or {}
        if ra.get("overall") is None:
            continue
        n = len(r["per_example"]["task_ids"])
        cells = []
        for block in (ra, ca):
            acc = block.get("overall")
            if acc is None:
                cells.append("-")
                continue
            # eval.json's own interval where it has one: per-layer routers' is over examples, not decisions
            lo, hi = block.get("interval") or P.accuracy_interval(round(acc * n), n)
            cells.append(f"{100 * acc:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
        layers = (f"{ra['routers']} routers, all agree on {100 * ra['agreement']:.1f}%" if ra.get("agreement")
                  is not None else "1 decision per example")
        rows.append(f"| {seed} | {n} | " + " | ".join(cells) + f" | {layers} |")
    if not rows:
        return []
    return ["**MoA's router vs a standalone classifier** (the expert each example was given by the decisions the "
            "forward pass applied vs the category label on the test split: with one router per layer every "
            "(example, layer) decision counts, interval a bootstrap over examples; with one router a Wilson 95% "
            "interval. Classifier = logistic regression on the same features from the frozen base, fit on the whole "
            "train split)", "", "| seed | test examples | router | classifier | routers |", "|---|---:|---|---|---|",
            *rows, ""]


def _avg_ppl(results: dict, m: str) -> Optional[float]:
    return P.mean_std(_per_seed(results, m, lambda r: r["perplexity"]["average"]))[0]


def findings(a: argparse.Namespace, results: dict, methods: list[str]) -> list:
    """What the section concludes, as data (``bench/findings.py``), each computed from the numbers above it."""
    out: list = []
    ppl = {m: _avg_ppl(results, m) for m in methods}
    ppl = {m: v for m, v in ppl.items() if v is not None}
    if ppl:
        out.append(F.Ranking(ppl))

    def ci(x: str, y: str) -> Optional[F.Comparison]:
        got = paired(results, x, y)
        return F.Comparison(x, y, *P.paired_bootstrap(got[0])) if got else None

    trio = [m for m in ("moa", "lora_mixed", "lora_single") if m in ppl]
    if len(trio) == 3:
        pairs = [ci(x, y) for x, y in (("moa", "lora_mixed"), ("moa", "lora_single"), ("lora_mixed", "lora_single"))]
        out.append(F.PaperOrder({m: ppl[m] for m in trio}, [c for c in pairs if c]))
    for key, name in (("bleu", "BLEU"), ("rougeL", "ROUGE-L")):
        stats = {m: P.mean_std(_per_seed(results, m, lambda r, k=key: r[k].get("average"))) for m in trio}
        vals = {m: st[0] for m, st in stats.items() if st[0] is not None}
        if len(vals) == 3:
            stds = [stats[m][1] for m in vals]
            out.append(F.MetricOrder(name, vals, None if any(sd is None for sd in stds) else max(stds)))
    moe = [m for m in ("moe_lora", "moe_lora_naive") if m in ppl]
    if moe and "moa" in ppl and "lora_mixed" in ppl:
        out.append(F.MoEPlacement({m: ppl[m] for m in moe}, ppl["moa"], ppl["lora_mixed"],
                                  [c for m in moe if (c := ci(m, "lora_mixed"))]))
    seeds_acc = []
    for rs in results.values():
        r = rs.get("moa") or {}
        ra, ca = (r.get("router_accuracy") or {}).get("overall"), (r.get("classifier_accuracy") or {}).get("overall")
        if ra is not None and ca is not None:
            seeds_acc.append((ra, ca, len(r["per_example"]["task_ids"])))
    if seeds_acc:
        n = sum(x[2] for x in seeds_acc)
        ra = sum(x[0] * x[2] for x in seeds_acc) / n
        ca = sum(x[1] * x[2] for x in seeds_acc) / n
        out.append(F.RouterVsClassifier(len(seeds_acc), n, (ra, *P.accuracy_interval(round(ra * n), n)),
                                        (ca, *P.accuracy_interval(round(ca * n), n))))
    at_start = [seed for seed, rs in results.items()
                if any(P.kept_start(st) for st in (rs.get("moa") or {}).get("stopping") or []
                       if "category" not in st)]
    if at_start:
        out.append(F.KeptStart(at_start, sum(1 for rs in results.values() if "moa" in rs)))
    if "mop" in ppl and "prompt_tuning" in ppl and (got := ci("mop", "prompt_tuning")):
        out.append(F.Labelled("MoP vs prompt tuning (MoP's paper: MoP lower)", got))
    if "base" in ppl and (worse := [m for m in ppl if m != "base" and ppl[m] > ppl["base"]]):
        out.append(F.MethodList("above_base", worse))
    capped = list(dict.fromkeys(m for m in methods for rs in results.values()
                                for s in (rs.get(m) or {}).get("stopping") or []
                                if s["best_step"] == s["stopped_step"]))
    if capped and P.BUDGETS[a.budget].steps is None:
        out.append(F.MethodList("at_cap", capped))
    return out


if __name__ == "__main__":
    main()
