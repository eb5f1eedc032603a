"""MoP vs prompt tuning on pruned bases (MoP's table setting, scaled down for a 2-core CPU) -> docs/benchmarks.md.

Prunes SmolLM2-135M-Instruct (embedded) with ``mixroute.prune`` (Wanda / SparseGPT, unstructured or N:M,
calibrated on windows of each seed's own train split), saves each pruned model under
``OUT/<setting>/seed<S>/model`` and then, on that pruned base (``model.name=<dir>``), trains and evaluates: the
pruned base itself, prompt tuning, MoP and, on request, one LoRA on the mixed data (lora_mixed) and MoA.

``--budget full`` (bench/protocol.py) trains each method in epochs of the train split until validation perplexity
stops improving (best weights kept, capped), after sweeping prompt tuning's lr and MoP's prompt and gate lr on
the validation split of SparseGPT-75%'s (else the first pruned setting's) first seed; the chosen rates are used
for every setting and seed (three). ``--sweep-each`` sweeps every pruned setting on its own first seed instead,
so each setting's comparison runs at rates tuned for its own base. It reports mean +/- std over seeds and, per
setting, a paired bootstrap 95% interval of MoP vs prompt tuning on the same test examples, the validation
curves and MoP's gate figure. ``--budget smoke`` is a few fixed steps (the test suite runs it on the tiny model).

Settings are ``METHOD-PERCENT`` (unstructured, e.g. ``sparsegpt-75``), ``METHOD-N:M`` (keep N of every M,
e.g. ``sparsegpt-2:4``) or ``dense`` (the unpruned model; its methods come from ``--dense-methods``).
Finished runs (same config) and pruned models (same pruning request) are reused, so a rerun after a crash only
redoes what is missing; ``--force`` redoes everything.

    python bench/quality_pruned.py --budget full                                  # dense + SparseGPT 50/75 %
    python bench/quality_pruned.py --budget full --sweep-each                     # each setting tuned on its own
    python bench/quality_pruned.py --budget full --settings sparsegpt-2:4 wanda-75
    python bench/quality_pruned.py --budget smoke --settings sparsegpt-50 --no-write   # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings as F  # noqa: E402
import protocol as P  # noqa: E402
from protocol import DOLLY, fmt, preset, write_section  # noqa: E402

HEADING = "## MoP on pruned bases"
METHOD_ORDER = ["base", "prompt_tuning", "mop", "lora_mixed", "moa"]
NAMES = {"base": "pruned base", "prompt_tuning": "prompt tuning", "mop": "MoP", "lora_mixed": "single LoRA",
         "moa": "MoA"}
DEFAULT_SETTINGS = ["dense", "sparsegpt-50", "sparsegpt-75"]
FULL_GRID = ["dense", "sparsegpt-50", "sparsegpt-75", "sparsegpt-90", "wanda-50", "wanda-75", "wanda-90",
             "sparsegpt-2:4", "sparsegpt-4:8"]
SWEEPS: dict[str, list[tuple[str, list[float]]]] = {
    "prompt_tuning": [("train.lr", [3e-2, 1e-1])],
    "mop": [("train.lr", [1.0, 3.0]), ("train.router_lr", [1e-3, 1e-2])],
}


# ------------------------------------------------------------------ arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = P.parser(__doc__)
    p.add_argument("--data", default=DOLLY, help="Dolly-schema data file; 'synthetic' = the built-in suite.")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, type=parse_setting,
                   help="METHOD-PERCENT (unstructured), METHOD-N:M (keep N of every M), dense, or full (= "
                        f"{' '.join(FULL_GRID)}); METHOD is magnitude, wanda or sparsegpt (default: "
                        f"{' '.join(DEFAULT_SETTINGS)}).")
    p.add_argument("--methods", nargs="+", default=["base", "prompt_tuning", "mop"], choices=METHOD_ORDER)
    p.add_argument("--dense-methods", nargs="*", default=["base"], choices=METHOD_ORDER,
                   help="Methods run on the 'dense' setting (default: base only, the unpruned reference row).")
    p.add_argument("--mop-set", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra config override for the mop runs, repeatable "
                        "(e.g. mixture.experts.prompt.inject_layer=0).")
    p.add_argument("--sweep-each", action="store_true",
                   help="Sweep the learning rates on every pruned setting's own first seed (default: on SparseGPT-75%% "
                        "only, reused for the other settings).")
    p.add_argument("--calib-samples", type=int, default=32, help="Calibration windows (Wanda / SparseGPT).")
    p.add_argument("--calib-seq-len", type=int, default=128, help="Tokens per calibration window.")
    p.add_argument("--force", action="store_true", help="Re-prune and re-train even when finished outputs exist.")
    a = p.parse_args(argv)
    a.settings = list(dict.fromkeys(x for s in a.settings for x in (FULL_GRID if s == "full" else [s])))
    return P.finish_args(a, argv, f"quality_pruned_{a.budget}")


def parse_setting(text: str) -> str:
    """Validate a setting name ('sparsegpt-75', 'wanda-2:4', 'dense'); returns it normalised."""
    from mixroute.prune import METHODS, parse_pattern

    text = text.strip().lower()
    if text in ("dense", "full"):
        return text
    method, _, target = text.partition("-")
    if method not in METHODS or not target:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected METHOD-PERCENT, METHOD-N:M or dense with "
                                         f"METHOD in {', '.join(METHODS)}")
    try:
        if ":" in target:
            return f"{method}-{parse_pattern(target)}"
        pct = float(target)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"setting {text!r}: {e}") from None
    if not 0 < pct < 100:
        raise argparse.ArgumentTypeError(f"setting {text!r}: the percentage must be in (0, 100)")
    return f"{method}-{pct:g}"


def setting_target(setting: str) -> tuple[str, Optional[float], Optional[str]]:
    """(prune method, unstructured sparsity, N:M pattern) of a non-dense setting."""
    method, _, target = setting.partition("-")
    return (method, None, target) if ":" in target else (method, float(target) / 100, None)


def setting_dirname(setting: str) -> str:
    return setting.replace(":", "of")


def setting_label(setting: str) -> str:
    if setting == "dense":
        return "dense (unpruned)"
    method, sparsity, pattern = setting_target(setting)
    return f"{method} {pattern}" if pattern else f"{method} {sparsity * 100:g}%"


# ------------------------------------------------------------------ configs
def base_overrides(a: argparse.Namespace, seed: int) -> list[str]:
    b = P.BUDGETS[a.budget]
    path = (["data.path=null", f"data.synthetic_per_task={a.per_category}"] if a.data == "synthetic"
            else [f"data.path={a.data}"])
    # eval.max_generate must be >= 1 in a config; generation itself is skipped (evaluate_run(max_generate=0))
    return [*path, f"data.max_per_category={a.per_category}", f"data.max_length={b.max_length}",
            "data.template=plain", f"data.val_fraction={b.val_fraction}", f"data.test_fraction={b.test_fraction}",
            f"data.seed={seed}", f"model.precision={a.precision}", f"train.batch_size={a.batch_size}",
            "train.warmup_steps=2", "train.save_every=0",
            "train.length_grouped=true", f"train.seed={seed}", f"mixture.seed={seed}", "eval.max_eval=null",
            "eval.max_generate=1", "eval.max_new_tokens=1", "eval.batch_size=8"]


def overrides(a: argparse.Namespace, method: str, seed: int, model: Optional[str], params: dict[str, Any],
              run_dir: Path) -> list[str]:
    sched = P.schedule(P.BUDGETS[a.budget], *P.split_sizes(tuple(base_overrides(a, seed))), a.batch_size)
    return [f"model.name={model if model is not None else 'null'}", *base_overrides(a, seed),
            *P.schedule_overrides(sched), *[f"{k}={v}" for k, v in params.items()],
            *(a.mop_set if method == "mop" else []), f"output_dir={run_dir}"]


# ------------------------------------------------------------------ pruning
def prune_request(a: argparse.Namespace, setting: str, seed: int) -> dict[str, Any]:
    method, sparsity, pattern = setting_target(setting)
    return {"setting": setting, "method": method, "sparsity": sparsity, "pattern": pattern,
            "model": a.model or "embedded", "data": a.data, "per_category": a.per_category,
            "max_length": P.BUDGETS[a.budget].max_length, "samples": a.calib_samples, "seq_len": a.calib_seq_len,
            "seed": seed, "split": [P.BUDGETS[a.budget].val_fraction, P.BUDGETS[a.budget].test_fraction]}


def prune_setting(a: argparse.Namespace, setting: str, seed: int, model_dir: Path,
                  lazy: bool = False) -> tuple[dict[str, Any], bool]:
    """Prune (or reuse) the model of ``setting`` calibrated on ``seed``'s train split (never on its test
    examples); returns (prune_report dict, whether it was (re)pruned). ``lazy``: an archived report of the same
    request is enough (the model is pruned when a run that is not archived needs it)."""
    from mixroute import rundir
    from mixroute.config import load_config
    from mixroute.data import RunData
    from mixroute.models import load_base_model
    from mixroute.prune import pack_windows, prune_model, save_pruned

    want = prune_request(a, setting, seed)
    report_path = model_dir / rundir.PRUNE_REPORT
    archived = P.archive_path(model_dir)
    archived = archived / rundir.PRUNE_REPORT if archived is not None else None

    def request(path: Optional[Path]) -> Optional[dict[str, Any]]:
        if path is None or not path.is_file():
            return None
        return json.loads(path.read_text()).get("calibration", {}).get("request")

    if request(report_path) == want and not a.force:
        P.archive_run(model_dir)
        return json.loads(report_path.read_text()), False
    if lazy and request(archived) == want and not a.force:
        return json.loads(archived.read_text()), False
    if a.only_finished:
        raise P.NotFinished(f"{setting} seed {seed}: pruned model")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    if report_path.is_file() or a.force:
        # runs on an older pruned model must not be reused after a crash or a changed request
        for stale in [d for d in model_dir.parent.iterdir() if d.is_dir() and d != model_dir]:
            shutil.rmtree(stale)
    if archived is not None and request(archived) not in (None, want):
        shutil.rmtree(archived.parent.parent)  # likewise their archived records
    method, sparsity, pattern = setting_target(setting)
    model, tok = load_base_model(a.model)
    # the calibration windows come from the train split the runs train on (same data config)
    cfg = load_config(preset("base"), overrides(a, "base", seed, a.model, {}, model_dir.parent / "base"))
    data = RunData.build(cfg, tok)
    train_ids = [list(map(int, ex["input_ids"])) for ex in data.examples["train"]]
    calib = pack_windows(train_ids, a.calib_samples, a.calib_seq_len, seed=seed)
    report = prune_model(model, method, sparsity, pattern, calib)
    report.calibration.update({"source": f"{a.data} (train split)", "samples": len([w for b in calib for w in
                                                                                     b["input_ids"]]),
                               "seq_len": a.calib_seq_len, "seed": seed, "request": want})
    report.model = getattr(model, "mixroute_source", a.model or "embedded")
    save_pruned(model, tok, model_dir, report, force=True)
    P.archive_run(model_dir)
    return report.to_dict(), True


# ------------------------------------------------------------------ gate figures
def gate_figure(a: argparse.Namespace, setting: str, sdir: Path, mop_dir: Path) -> dict[str, Optional[str]]:
    """MoP's gate figure of one setting: {"png": in --img-dir (committed), "html": mixroute.report's page}.

    The report page covers the MoP run and the pruned model (sparsity per layer) and lands in the (git-ignored)
    setting directory; its gate heatmap (before / after training) is copied to --img-dir.
    """
    from mixroute import rundir
    from mixroute.report import write_report

    png = Path(a.img_dir) / f"quality_pruned_{setting_dirname(setting).replace('.', '_')}_mop_gates.png"
    html = sdir / "report" / "report.html"
    evaluated = mop_dir / rundir.EVAL
    if png.is_file() and evaluated.is_file() and not a.force \
            and png.stat().st_mtime >= evaluated.stat().st_mtime:  # drawn after this run finished
        return {"png": str(png), "html": str(html) if html.is_file() else None}
    dirs = [mop_dir] + ([sdir / "model"] if (sdir / "model" / rundir.PRUNE_REPORT).is_file() else [])
    shutil.rmtree(sdir / "report", ignore_errors=True)  # an earlier MoP run's heatmap must not be picked below
    html = write_report(dirs, sdir / "report", warn=lambda m: None)
    found: dict[str, Optional[str]] = {"png": None, "html": str(html)}
    heat = sorted(p for p in html.parent.glob("gates_*.png") if "_layer" not in p.name)
    if heat:
        png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(heat[0], png)
        found["png"] = str(png)
    return found


# ------------------------------------------------------------------ the run
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    import torch

    from mixroute.config import load_config
    from mixroute.models import quiet_transformers

    a = parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(max(1, a.threads))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, dict[str, Any]] = {}  # setting -> {"prune": {seed: ...}, "runs": {seed: {method: eval}}}
    chosen: dict[str, dict[str, dict[str, Any]]] = {}  # swept setting -> method -> chosen rates
    sweeps: dict[str, dict[str, list[dict]]] = {}       # swept setting -> method -> trials
    commands: list[str] = []
    missing: list[str] = []
    primary = sweep_on(a.settings)
    # the primary sweep's setting first: the settings without a sweep of their own reuse what it chose
    for setting in sorted(a.settings, key=lambda s: s != primary):
        entry: dict[str, Any] = {"prune": {}, "runs": {}, "figure": {}, "curves": {}}
        results[setting] = entry
        methods = [m for m in METHOD_ORDER if m in (a.dense_methods if setting == "dense" else a.methods)]
        source = rates_from(a, setting)
        for si, seed in enumerate(a.seeds):
            sdir = out / setting_dirname(setting) / f"seed{seed}"
            model_name = a.model
            if setting != "dense":
                t0 = time.time()
                try:
                    report, fresh = prune_setting(a, setting, seed, sdir / "model", lazy=True)
                except P.NotFinished:
                    missing += [f"{setting} seed {seed} {m}" for m in methods]
                    continue
                entry["prune"][seed] = {k: report.get(k) for k in ("method", "sparsity", "pattern",
                                                                   "overall_sparsity", "wall_time_s")}
                print(f"{setting} seed {seed}: {'pruned' if fresh else 'reused'} {sdir / 'model'} (sparsity "
                      f"{report['overall_sparsity']:.3f}, {time.time() - t0:.0f} s)", flush=True)
                model_name = str(sdir / "model")

            def ensure_model(setting: str = setting, seed: int = seed, sdir: Path = sdir) -> None:
                if setting != "dense":
                    prune_setting(a, setting, seed, sdir / "model")
            runs: dict[str, Any] = {}
            entry["runs"][seed] = runs
            for method in methods:
                try:
                    def make(params: dict[str, Any], where: Path, method: str = method) -> Any:
                        ov = overrides(a, method, seed, model_name, params, where / P.run_name(method, params))
                        return load_config(preset(method), ov), ov

                    swept = a.sweep and method in SWEEPS and source == setting and si == 0
                    params = dict(chosen.get(source, {}).get(method, {}))
                    if swept:
                        start = P.sweep_start(SWEEPS[method])

                        def train_with(trial: dict[str, Any], make=make, sdir=sdir) -> Path:
                            return P.train_once(make(trial, sdir / "sweep")[0], f"{setting} seed {seed} sweep",
                                                a.only_finished, before_train=ensure_model)
                        params, sweeps.setdefault(setting, {})[method] = P.sweep(SWEEPS[method], start,
                                                                                   train_with, method)
                        chosen.setdefault(setting, {})[method] = params
                    # the chosen configuration's sweep run is this seed's run: not trained twice
                    cfg, ov = make(params, sdir / "sweep" if swept else sdir)
                    if si == 0:
                        commands.append(f"mixroute train configs/{preset(method).name} " + shlex.join(ov))
                    run_dir = P.train_once(cfg, f"{setting} seed {seed} {method}", a.only_finished,
                                           before_train=ensure_model)
                    res = P.test_once(run_dir, f"{setting} seed {seed} {method}", a.only_finished,
                                      before_eval=ensure_model, max_generate=0, classifier=False,
                                      precision=a.precision)
                    res["curve"], res["stopping"] = P.validation_curve(run_dir), P.stopping(run_dir)
                    runs[method] = res
                    if method == "mop" and si == 0:
                        entry["figure"] = gate_figure(a, setting, sdir, run_dir)
                except P.NotFinished as e:
                    missing.append(f"{setting} seed {seed} {method}")
                    if getattr(e, "tried", None) is not None:
                        sweeps.setdefault(setting, {})[method] = e.tried
            curves = {NAMES[m]: r["curve"] for m, r in runs.items() if m != "base" and len(r["curve"]) > 1}
            if si == 0 and curves:
                name = setting_dirname(setting).replace(".", "_")
                png = Path(a.img_dir) / f"quality_pruned_{a.budget}_{name}_curves.png"
                entry["curves"] = str(P.curves_figure(curves, f"{setting_label(setting)}, seed {seed}", png))
        if not a.only_finished:
            P.write_json(out / "results.json", {"args": vars(a), "chosen": chosen, "sweeps": sweeps,
                                                "results": _slim(results)})
    results = {s: results[s] for s in a.settings}
    text = render(a, results, chosen, sweeps, commands, time.time() - started, os.getloadavg()[0],
                  missing)
    print(text)
    if not a.no_write:
        write_section(Path(a.docs), HEADING, text)
    return {"results": results, "chosen": chosen, "sweeps": sweeps, "text": text, "missing": missing}


def sweep_on(settings: list[str]) -> Optional[str]:
    """The setting whose first seed's validation split chooses the learning rates: SparseGPT 75% (MoP's
    headline regime) when it is run, else the first pruned setting."""
    pruned = [s for s in settings if s != "dense"]
    return "sparsegpt-75" if "sparsegpt-75" in pruned else next(iter(pruned), None)


def rates_from(a: argparse.Namespace, setting: str) -> Optional[str]:
    """The setting whose sweep chooses this setting's learning rates: its own with ``--sweep-each`` (pruned
    settings), else the primary one (``sweep_on``)."""
    if a.sweep_each and setting != "dense":
        return setting
    return sweep_on(a.settings)


def _slim(results: dict[str, Any]) -> dict[str, Any]:
    return {s: {**e, "runs": {seed: {m: {k: v for k, v in r.items() if k != "per_example"} for m, r in rs.items()}
                              for seed, rs in e["runs"].items()}} for s, e in results.items()}


# ------------------------------------------------------------------ the section
def rel_diff(mop: Optional[float], pt: Optional[float]) -> Optional[float]:
    """(MoP - PT) / PT in percent: negative when MoP's perplexity is lower."""
    if mop is None or pt is None or pt == 0:
        return None
    return 100.0 * (mop - pt) / pt


def _avgs(results: dict[str, Any], setting: str, method: str) -> list[Optional[float]]:
    return [rs[method]["perplexity"]["average"] if method in rs else None
            for rs in results[setting]["runs"].values()]


def _mean(results: dict[str, Any], setting: str, method: str) -> Optional[float]:
    return P.mean_std(_avgs(results, setting, method))[0]


def mop_vs_pt(results: dict[str, Any], setting: str) -> Optional[tuple[float, float, float, list[float]]]:
    """Pooled paired bootstrap of MoP vs prompt tuning on one setting, with the per-seed differences."""
    pooled, per_seed = P.Paired(), []
    for seed, rs in results[setting]["runs"].items():
        if "mop" in rs and "prompt_tuning" in rs:
            one = P.Paired()
            one.add(rs["mop"], rs["prompt_tuning"])
            per_seed.append(P.relative_ppl_diff(one, range(len(one.tokens))))
            pooled.add(rs["mop"], rs["prompt_tuning"], tag=seed)
    if not per_seed:
        return None
    return (*P.paired_bootstrap(pooled), per_seed)


def render(a: argparse.Namespace, results: dict[str, dict], chosen: dict, sweeps: dict, commands: list[str],
           wall: float, load: float, missing: Optional[list[str]] = None) -> str:
    import torch

    b = P.BUDGETS[a.budget]
    cats: list[str] = []
    n_test = 0
    for entry in results.values():
        for rs in entry["runs"].values():
            for r in rs.values():
                cats = cats or list(r["categories"])
                n_test = n_test or len(r["per_example"]["task_ids"])
    run_seconds = sum((r.get("train_seconds") or 0) + (r.get("eval_seconds") or 0)
                      for e in results.values() for rs in e["runs"].values() for r in rs.values())
    prune_seconds = sum(p.get("wall_time_s") or 0 for e in results.values() for p in e["prune"].values())
    command = P.command("bench/quality_pruned.py", a.argv)
    model = "SmolLM2-135M-Instruct (embedded, float32)" if a.model is None else f"`{a.model}`"
    data = "Dolly-15k (8 categories)" if a.data == DOLLY else (
        "the built-in synthetic suite" if a.data == "synthetic" else f"`{a.data}`")
    n_train, n_cat = P.split_sizes(tuple(base_overrides(a, a.seeds[0])))
    sched = P.schedule(b, n_train, n_cat, a.batch_size)
    how = (f"each method trains in epochs of the {n_train} train examples ({sched['eval_every']} steps an epoch), "
           f"is validated every half epoch (the trainer validates at least twice per epoch; category-average "
           f"validation perplexity) and stops after {b.patience} validations without improvement, keeping its "
           f"best weights, at most {b.max_epochs} epochs"
           if b.steps is None else f"a fixed {b.steps} steps per method, no early stopping (a check that "
                                   "everything runs, not a measurement)")
    out = [HEADING, "",
           f"MoP's central experiment: {data}, {model} pruned with `mixroute.prune`, then each method trained on the "
           f"frozen pruned base (`model.name=<pruned dir>`). Machine: {os.cpu_count()}-core {platform.machine()} "
           f"CPU, torch {torch.__version__}, {a.threads} threads, "
           f"{P.load_note([r for e in results.values() for rs in e['runs'].values() for r in rs.values()], load)}."
           f" Command: `{command}` ({time.strftime('%Y-%m-%d')}, commit {P.commit()}); pruning "
           f"{prune_seconds / 60:.1f} min + training/evaluation {run_seconds / 60:.1f} min summed over the reported "
           "runs."
           + P.archive_note(Path(a.out)), "",
           f"Budget `{a.budget}`: {a.per_category} records per category sampled with each seed, stratified "
           f"{100 * (1 - b.val_fraction - b.test_fraction):.0f}/{100 * b.val_fraction:.0f}/"
           f"{100 * b.test_fraction:.0f} % train/validation/test ({n_test} test examples per seed, "
           f"{n_test // max(1, len(cats))} per category), plain template, max_length {b.max_length}, batch "
           f"{a.batch_size}, length-grouped batches, AdamW with 2 warm-up steps and cosine decay over the cap; {how}. "
           f"Seeds {', '.join(map(str, a.seeds))} (each: data sample, split, pruning calibration, initialisation, "
           f"data order). Pruning: decoder Linears only, calibration = {a.calib_samples} windows x "
           f"{a.calib_seq_len} tokens packed from the seed's train split, SparseGPT blocksize 128 / percdamp 0.01. "
           "Prompt tuning: 10 virtual tokens at the input; MoP: 8 experts x 8 tokens at the middle layer, its gate "
           "pre-trained 50 steps on labels, then trained jointly at train.router_lr. Metric: token-weighted test "
           "perplexity of the responses; `average` = mean of the per-category PPLs; mean ± std over seeds.", ""]
    out += P.missing_note(missing or [])
    for swept, tables in sweeps.items():
        reusing = [setting_label(s) for s in a.settings if s != swept and rates_from(a, s) == swept
                   and any(m in SWEEPS for m in (a.dense_methods if s == "dense" else a.methods))]
        out += P.sweep_table(tables, f" on {setting_label(swept)}, first seed; the chosen values are used for "
                                     f"every seed of {setting_label(swept)}"
                                     + (f" and of {', '.join(reusing)}" if reusing else ""), chosen.get(swept))
    shown = [m for m in METHOD_ORDER if any(m in rs for e in results.values() for rs in e["runs"].values())]
    out += ["**Average test perplexity per setting** (lower is better; MoP vs PT = (MoP - PT) / PT pooled over the "
            "seeds' test examples, negative = MoP better, with its paired bootstrap 95% interval)", "",
            "| setting | sparsity | " + " | ".join(NAMES[m] for m in shown) + " | MoP vs PT | 95% interval |",
            "|---|---:|" + "---:|" * len(shown) + "---:|---|"]
    for s, e in results.items():
        sp = "0" if s == "dense" else P.fmt_ms([p.get("overall_sparsity") for p in e["prune"].values()], 3)
        got = mop_vs_pt(results, s)
        cells = [P.fmt_ms(_avgs(results, s, m)) for m in shown]
        out.append(f"| {setting_label(s)} | {sp} | " + " | ".join(cells) + " | "
                   + (f"{got[0]:+.1f}% | [{got[1]:+.1f}%, {got[2]:+.1f}%]" if got else "- | -") + " |")
    out.append("")
    out += ["**Test perplexity per category** (mean over seeds; rows = setting x method)", "",
            "| setting | method | " + " | ".join(cats) + " | **average** |", "|---|---|" + "---:|" * (len(cats) + 1)]
    for s, e in results.items():
        for m in shown:
            vals = [rs[m]["perplexity"] for rs in e["runs"].values() if m in rs]
            if not vals:
                continue
            name = "base (unpruned)" if s == "dense" and m == "base" else NAMES[m]
            per = [fmt(P.mean_std([v["per_category"].get(c) for v in vals])[0]) for c in cats]
            out.append(f"| {setting_label(s)} | {name} | " + " | ".join(per)
                       + f" | **{fmt(P.mean_std([v['average'] for v in vals])[0])}** |")
    out.append("")
    docs_dir = Path(a.docs).resolve().parent
    curves = [(s, e["curves"]) for s, e in results.items() if e.get("curves")]
    if curves:
        out += ["**Validation curves** (first seed; category-average validation perplexity once per epoch)", ""]
        out += [f"![validation curves, {setting_label(s)}]({os.path.relpath(p, docs_dir)})" for s, p in curves]
        out.append("")
    figs = [(s, e["figure"]) for s, e in results.items() if (e.get("figure") or {}).get("png")]
    if figs:
        out += ["**MoP gate weights** (first seed; average gate weight per test category and prompt expert, before "
                "and after training; the gate is pre-trained to send category i to expert i, so a bright diagonal "
                "= routing by category). Top-1 = share of test examples whose highest-weighted expert is their "
                "category's, mean over seeds.", ""]
        for s, fig in figs:
            acc = [(rs["mop"].get("router_accuracy") or {}).get("overall") for rs in results[s]["runs"].values()
                   if "mop" in rs]
            out.append(f"- {setting_label(s)}: top-1 {P.fmt_ms(acc, 1, 100)}%"
                       f"<br>![MoP gates, {setting_label(s)}]({os.path.relpath(fig['png'], docs_dir)})")
        out.append("")
    out += ["**What this shows, against the paper**", ""] + F.render(findings(a, results)) + [""]
    out += ["<details><summary>Exact training commands (first seed; the pruned models are written by the script "
            "with <code>mixroute.prune.prune_model</code>)</summary>", "", "```", *commands, "```", "", "</details>",
            ""]
    return "\n".join(out)


def gate_evidence(results: dict[str, dict], diffs: dict[str, F.Comparison]) -> list[F.GateEvidence]:
    """Where MoP does not beat prompt tuning, what its gate and size measured (first seed): the evidence for why,
    not a proof."""
    out = []
    for s, c in diffs.items():
        if c.hi < 0:
            continue
        rs = next(iter(results[s]["runs"].values()), {})
        mop, pt = rs.get("mop"), rs.get("prompt_tuning")
        acc = (mop or {}).get("router_accuracy") or {}
        if not acc.get("confusion") or not pt:
            continue
        labels, merged = acc["labels"], []
        for i, row in enumerate(acc["confusion"]):
            j = max(range(len(row)), key=row.__getitem__)
            if j != i and sum(row) and row[j] / sum(row) >= 0.5:
                merged.append((labels[i], labels[j], row[j] / sum(row)))
        out.append(F.GateEvidence(setting_label(s), acc["overall"], merged, mop["trainable_parameters"],
                                  (mop.get("parameters") or {}).get("routers"), pt["trainable_parameters"]))
    return out


def findings(a: argparse.Namespace, results: dict[str, dict]) -> list:
    """What the section concludes, as data (``bench/findings.py``), each from the numbers in the tables above."""
    out: list = []
    got = {s: mop_vs_pt(results, s) for s in results}
    got = {s: d for s, d in got.items() if d is not None}
    diffs = {s: F.Comparison("mop", "prompt_tuning", *d[:3]) for s, d in got.items()}
    if diffs:
        out.append(F.SettingComparisons("MoP's paper: MoP 3% to 30% below prompt tuning, more so at higher pruning.",
                                        {setting_label(s): c for s, c in diffs.items()},
                                        {setting_label(s): d[3] for s, d in got.items()}))
        ladder = sorted((setting_target(s)[1], c.point) for s, c in diffs.items()
                        if s != "dense" and setting_target(s)[1] is not None)
        if len(ladder) >= 2:
            out.append(F.SparsityTrend(ladder))
    others = [s for s in diffs if rates_from(a, s) != s]
    if P.BUDGETS[a.budget].steps is None and others:
        out.append(F.ReusedRates(setting_label(sweep_on(a.settings)), [setting_label(s) for s in others]))
    out += gate_evidence(results, diffs)
    for s in results:
        base = _mean(results, s, "base")
        row = {m: _mean(results, s, m) for m in METHOD_ORDER if m != "base"}
        row = {m: v for m, v in row.items() if v is not None}
        if base and row:
            best = min(row, key=row.get)
            out.append(F.AgainstBase(setting_label(s), base, NAMES[best], row[best],
                                     [NAMES[m] for m, v in row.items() if v > base]))
    capped = sorted({f"{NAMES[m]} ({setting_label(s)})" for s, e in results.items() for rs in e["runs"].values()
                     for m, r in rs.items() for st in r.get("stopping") or [] if st["best_step"] == st["stopped_step"]})
    if capped and P.BUDGETS[a.budget].steps is None:
        out.append(F.AtCap(capped))
    return out


if __name__ == "__main__":
    main()
