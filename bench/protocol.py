"""What the benchmarks share: paths and presets, budgets, learning-rate sweeps read on the validation split,
validation curves, the statistics of a table over seeds (mean, standard deviation, paired bootstrap), reuse of
finished runs, and rewriting one section of docs/benchmarks.md. Importing it puts ``src/`` on ``sys.path`` (the
scripts run from a checkout). What the sections conclude is ``findings.py``.

A budget says how much data each method sees and when it stops: ``smoke`` is a fixed few steps (minutes, CI);
``full`` trains every method in epochs of its own data (a single LoRA its category's train split, the others the
union) up to ``max_epochs``, validating once per epoch, and stops when validation perplexity has not improved for
``patience`` validations (``train.patience``: the best weights are kept). Hyperparameters are chosen by the
lowest validation perplexity a run reached; the test split is read only by the chosen runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DOLLY = str((ROOT / ".." / "shared" / "data" / "dolly-15k" / "databricks-dolly-15k.jsonl").resolve())


def preset(method: str) -> Path:
    """The Dolly preset of ``method`` (configs/<method>_dolly.yaml)."""
    return ROOT / "configs" / f"{method}_dolly.yaml"


def fmt(v: Optional[float], nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the ``heading`` section of ``path`` (up to the next '## ' heading), keeping the others."""
    from mixroute.fileio import atomic_write_text

    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    lines = old.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    atomic_write_text(path, new)


@dataclass(frozen=True)
class Budget:
    """How much each method trains and how much of the test split is read."""

    name: str
    per_category: int              # records sampled per category (data.max_per_category)
    max_length: int                # tokens per example
    val_fraction: float
    test_fraction: float
    seeds: tuple[int, ...]         # data sample + split + init + data order
    max_generate: int              # test prompts per category for BLEU / ROUGE-L
    max_new_tokens: int
    steps: Optional[int] = None    # smoke: fixed optimizer steps per method (stage 1: ``stage1_steps``)
    stage1_steps: Optional[int] = None
    max_epochs: Optional[int] = None   # full: the cap, in epochs of the method's own data
    patience: int = 0              # full: validations without improvement before stopping
    sweep: bool = False            # full: choose learning rates on the validation split first


# the MoA authors' advice on training examples per domain (../shared/docs/METHODS.md): quality drops below 2k,
# more than 5k works best; every full-budget table says how far below it its experts train
PAPER_PER_TASK = (2000, 5000)
BUDGETS = {
    "smoke": Budget("smoke", per_category=16, max_length=64, val_fraction=0.25, test_fraction=0.25, seeds=(0,),
                    max_generate=2, max_new_tokens=8, steps=4, stage1_steps=2),
    # 400 records per category: 80 test (perplexity; 20 of them generate for BLEU / ROUGE-L), 40 validation,
    # 280 train: above the 250 a category the routed methods need at least, still 7-18x below the MoA paper's
    # 2k-5k per domain. (Until 2026-12 this was 90 records, 29 train, on which four of eight stage-1 experts
    # kept their 3-update weights.) One epoch = 35 steps of batch 8 for a single LoRA, 280 for Dolly-8's
    # union. 96 tokens keep at least 24 response tokens of every example (docs/data.md, truncation) at ~80
    # tokens per example on average.
    "full": Budget("full", per_category=400, max_length=96, val_fraction=0.1, test_fraction=0.2,
                   seeds=(0, 1, 2), max_generate=20, max_new_tokens=32, max_epochs=5, patience=2, sweep=True),
}


def schedule(budget: Budget, n_train: int, n_per_category: int, batch_size: int) -> dict[str, int]:
    """Steps, validation interval and caps of ``budget`` for a split with ``n_train`` train examples in all and
    at most ``n_per_category`` in one category."""
    if budget.steps is not None:
        return {"max_steps": budget.steps, "stage1_steps": budget.stage1_steps or budget.steps,
                "eval_every": 0, "stage1_eval_every": 0, "patience": 0}
    epoch, epoch1 = -(-n_train // batch_size), -(-n_per_category // batch_size)
    # a checkpoint every epoch: a full run outlasts a session here, and a killed one resumes (train_once)
    return {"max_steps": budget.max_epochs * epoch, "stage1_steps": budget.max_epochs * epoch1,
            "eval_every": epoch, "stage1_eval_every": epoch1, "patience": budget.patience, "save_every": epoch}


@functools.lru_cache(maxsize=None)
def split_sizes(overrides: tuple[str, ...]) -> tuple[int, int]:
    """(train examples in all, most train examples of one category) of the split that the base preset with
    ``overrides`` makes (cached: every run of a seed asks, and loading the records parses the whole file)."""
    from mixroute.config import load_config
    from mixroute.data.bundle import load_config_records
    from mixroute.data.split import split_records

    root = Path(__file__).resolve().parents[1]
    data = load_config(root / "configs" / "base_dolly.yaml", list(overrides)).data
    train = split_records(load_config_records(data).records, data.val_fraction, data.test_fraction,
                          data.seed)["train"]
    per: dict[str, int] = {}
    for r in train:
        per[r.category] = per.get(r.category, 0) + 1
    return len(train), max(per.values())


def missing_note(missing: list[str]) -> list[str]:
    """The paragraph that lists the runs a table rendered with ``--only-finished`` still lacks."""
    if not missing:
        return []
    return [f"**Not finished yet** ({len(missing)} of the table's runs; rendered with `--only-finished` while the "
            "experiment runs, so the tables below hold only the finished seeds): " + ", ".join(missing) + ".", ""]


def schedule_overrides(s: dict[str, int]) -> list[str]:
    return [f"train.{k}={v}" for k, v in s.items()]


# ------------------------------------------------------------------ validation curves
def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, category-average validation perplexity) of the mixture (stage 2 / the only stage), in order;
    the final re-validation of the restored best weights is left out."""
    rows = [r for r in metrics_rows(run_dir) if r.get("ppl_average") is not None and r.get("stage") != "stage1"]
    seen: dict[int, float] = {}
    for r in rows:
        seen.setdefault(r["step"], r["ppl_average"])
    return sorted(seen.items())


def stage1_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per category, (step within that LoRA's training, its validation perplexity on its own category)."""
    out: dict[str, list[tuple[int, float]]] = {}
    rows = [r for r in metrics_rows(run_dir) if r.get("stage") == "stage1" and r.get("ppl_average") is not None]
    for r in rows:
        out.setdefault(r["category"], []).append((r["step"], r["ppl_average"]))
    # steps are global (category c owns c * stage1_steps + 1 ..): count from each LoRA's own start
    return {c: [(s - pts[0][0], v) for s, v in pts] for c, pts in out.items()}


def stopping(run_dir: Path) -> list[dict[str, Any]]:
    """The early-stopping rows of a run (best step, best perplexity, step it stopped at), stage 1 first."""
    return [r for r in metrics_rows(run_dir) if r.get("stage") == "early_stopping"]


def best_validation(run_dir: Path) -> Optional[float]:
    """The lowest category-average validation perplexity the run reached (what a sweep compares)."""
    curve = validation_curve(run_dir)
    return min(v for _, v in curve) if curve else None


def curves_figure(curves: dict[str, list[tuple[int, float]]], title: str, path: Path,
                  stage1: Optional[dict[str, list[tuple[int, float]]]] = None) -> Path:
    """A PNG of validation perplexity against optimizer step, one line per method (and, when given, one
    dotted line per stage-1 LoRA on its own category in a second panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if stage1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity (category average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if stage1:
        ax1 = axes[0][1]
        for name, pts in stage1.items():
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=":", marker=".", label=name)
        ax1.set_title("stage 1: each single LoRA on its own category")
        ax1.set_xlabel("optimizer step of that LoRA")
        ax1.set_ylabel("validation perplexity")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ statistics
def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """Mean, sample standard deviation (None for one value) and count of the values that are not None."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


def fmt_ms(values: Sequence[Optional[float]], nd: int = 2, scale: float = 1.0) -> str:
    m, s, n = mean_std([None if x is None else x * scale for x in values])
    if m is None:
        return "-"
    return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s is not None else "")


@dataclass
class Paired:
    """Per-example summed NLL and response tokens of two methods on the same test examples."""

    nll_a: list[float] = field(default_factory=list)
    nll_b: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)

    def add(self, a: dict[str, Any], b: dict[str, Any], tag: int = 0) -> None:
        """Append the examples of two eval.json dicts (same split; ``tag`` keeps categories of different seeds
        apart)."""
        pa, pb = a["per_example"], b["per_example"]
        if pa["tokens"] != pb["tokens"] or pa["task_ids"] != pb["task_ids"]:
            raise ValueError("the two runs were not evaluated on the same test examples")
        self.nll_a += pa["nll"]
        self.nll_b += pb["nll"]
        self.tokens += pa["tokens"]
        self.task_ids += [tag * 1000 + t for t in pa["task_ids"]]


def relative_ppl_diff(p: Paired, idx: Sequence[int]) -> float:
    """(PPL_a - PPL_b) / PPL_b in percent, PPL = the category average of token-weighted perplexities over the
    examples ``idx`` (the tables' ``average``, as ``mixroute.evaluate.perplexity`` computes it)."""
    import torch

    from mixroute.evaluate import perplexity

    pick = torch.as_tensor(list(idx), dtype=torch.long)
    groups, task_ids = torch.unique(torch.tensor(p.task_ids, dtype=torch.long), return_inverse=True)
    tokens = torch.tensor(p.tokens, dtype=torch.long)[pick]

    def avg(nll: list[float]) -> float:
        picked = torch.tensor(nll, dtype=torch.float64)[pick]
        return perplexity(picked, tokens, task_ids[pick], groups.tolist())["average"]
    ref = avg(p.nll_b)
    return 100.0 * (avg(p.nll_a) - ref) / ref


def paired_bootstrap(p: Paired, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and 95% percentile interval of the relative average-perplexity difference a vs b,
    resampling test examples with replacement within each category (the same examples for both methods).
    Written here because ``scipy.stats.bootstrap`` resamples pairs but has no strata: resampling across
    categories would let a draw hold more of one category than the test split does. All draws at once
    (numpy): one category's resamples are one index matrix."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nll_a, nll_b = np.asarray(p.nll_a, dtype=np.float64), np.asarray(p.nll_b, dtype=np.float64)
    tokens, task = np.asarray(p.tokens, dtype=np.float64), np.asarray(p.task_ids)
    per_a, per_b = [], []   # (categories, resamples) perplexities; nan where a draw has no response token
    for g in np.unique(task):
        members = np.flatnonzero(task == g)
        pick = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        n = tokens[pick].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_a.append(np.where(n > 0, np.exp(nll_a[pick].sum(axis=1) / n), np.nan))
            per_b.append(np.where(n > 0, np.exp(nll_b[pick].sum(axis=1) / n), np.nan))
    avg_a, avg_b = np.nanmean(np.stack(per_a), axis=0), np.nanmean(np.stack(per_b), axis=0)
    draws = np.sort(100.0 * (avg_a - avg_b) / avg_b)
    point = relative_ppl_diff(p, range(len(p.tokens)))
    return point, float(draws[int(0.025 * resamples)]), float(draws[int(0.975 * resamples) - 1])


def accuracy_interval(correct: int, n: int) -> tuple[Optional[float], Optional[float]]:
    """Wilson 95% interval of an accuracy (in [0, 1]): ``evaluate.proportion_interval``, the one owner."""
    from mixroute.evaluate import proportion_interval

    ci = proportion_interval(correct, n)
    return (None, None) if ci is None else (ci[0], ci[1])


def verdict(lo: float, hi: float, a: str, b: str) -> str:
    """What a 95% interval of (a - b) / b says, in words."""
    if hi < 0:
        return f"{a} below {b}"
    if lo > 0:
        return f"{a} above {b}"
    return "within noise (the interval contains 0)"


# ------------------------------------------------------------------ runs
def write_json(path: Path, obj: Any) -> None:
    from mixroute.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


class NotFinished(Exception):
    """A run the table needs has not finished (``--only-finished`` renders what has)."""


# A finished run's small files (config, validation curve, test evaluation, timing) are committed under
# bench/results/, keyed by the run's path under runs/: the full tables take longer than one session on a
# 2-core CPU and a fresh checkout starts without runs/, so a rerun restores them instead of training again.
# Adapter weights are not kept (hundreds of MB); a run that needs another run's weights retrains that one.
ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
ARCHIVE = Path(__file__).resolve().parent / "results"
ARCHIVED = ("config.yaml", "metrics.jsonl", "eval.json", "bench_timing.json", "data_report.json", "gates.json",
            "prune_report.json")


def archive_path(run_dir: Path) -> Optional[Path]:
    """Where ``run_dir``'s record lives in the archive (None for run directories outside runs/)."""
    try:
        return ARCHIVE / Path(run_dir).resolve().relative_to(RUNS)
    except ValueError:
        return None


def _portable(cfg_dict: dict[str, Any], root: Optional[Path] = None) -> str:
    """A config as text with the absolute paths of the checkout it ran in (``root``, default this one)
    replaced, so records compare across checkouts."""
    root = ROOT if root is None else root
    # how often a run checkpoints changes no result (a resumed run is bit-identical to an uninterrupted one)
    cfg_dict = {**cfg_dict, "train": {k: v for k, v in cfg_dict.get("train", {}).items() if k != "save_every"}}
    text = json.dumps(cfg_dict, sort_keys=True, default=str)
    return text.replace(str(root), "$ROOT").replace(str(root.parent), "$ROOT/..")


def _trained_in(cfg_dict: dict[str, Any], run_dir: Path) -> Path:
    """The checkout an archived run was trained in: its ``output_dir`` less ``runs/<the run's key>`` (long runs
    train in a snapshot of the code, elsewhere than the checkout that later restores them)."""
    key = ("runs", *Path(run_dir).resolve().relative_to(RUNS).parts)
    out = Path(str(cfg_dict.get("output_dir") or ""))
    if len(out.parts) > len(key) and out.parts[-len(key):] == key:
        return Path(*out.parts[:-len(key)])
    return ROOT


def archive_run(run_dir: Path, names: Sequence[str] = ARCHIVED) -> None:
    """Copy the run's small files (``names``) into the archive (atomically, file by file)."""
    from mixroute.fileio import atomic_write_text

    dest = archive_path(run_dir)
    if dest is None:
        return
    for name in names:
        src = Path(run_dir) / name
        if src.is_file():
            atomic_write_text(dest / name, src.read_text())


def _archived_config(run_dir: Path) -> Optional[dict[str, Any]]:
    import warnings

    from mixroute.config import ConfigError, MovedKeyWarning, RetiredKeyWarning, to_dict
    from mixroute.rundir import read_config, recorded_config

    src = archive_path(run_dir)
    if src is None or not (src / "config.yaml").is_file():
        return None
    try:
        # records written under an older schema are only compared, never trained from: their keys' deprecation
        # notes would drown the benchmark's own output
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (MovedKeyWarning, RetiredKeyWarning))
            return to_dict(recorded_config(read_config(src), True))
    except (ConfigError, FileNotFoundError):
        return None


def restore_run(run_dir: Path, cfg: Any) -> bool:
    """Restore ``run_dir``'s archived record when it was made by exactly ``cfg``; True when restored."""
    from mixroute.config import to_dict
    from mixroute.rundir import recorded_config, write_config

    src = archive_path(run_dir)
    archived = _archived_config(run_dir)
    if src is None or archived is None or _portable(archived, _trained_in(archived, run_dir)) != _portable(
            to_dict(recorded_config(cfg, True))):
        return False
    if not ((src / "metrics.jsonl").is_file() and (src / "bench_timing.json").is_file()):
        return False
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or other-config run: nothing in it belongs to the record
    run_dir.mkdir(parents=True)
    for name in ARCHIVED:
        if (src / name).is_file():
            (run_dir / name).write_text((src / name).read_text())
    write_config(run_dir, cfg)  # with this checkout's paths, so a later comparison sees them
    return True


def archive_note(out: Path) -> str:
    """The sentence that says where a table's runs are kept (empty for an --out outside runs/)."""
    where = archive_path(Path(out))
    if where is None:
        return ""
    shown = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    return (f" Every run's config, validation curve and test evaluation: `{shown}/` (a rerun "
            "of the command restores them instead of training again, and resumes a run stopped after one of "
            "its per-epoch checkpoints or stage-1 LoRAs).")


def load_note(results: Sequence[dict[str, Any]], rendered: float) -> str:
    """What the header says about machine load. The load when a section is rendered says nothing about its runs
    (they may have trained in earlier sessions), so each run records the 1-minute load average at the end of its
    training: about the run's own thread count when nothing else ran, more when something did."""
    loads = [r["train_load"] for r in results if r.get("train_load") is not None]
    known = (f"1-minute load average at the end of each run's training {min(loads):.2f} to {max(loads):.2f}"
             + (f" ({len(loads)} of {len(results)} runs; the others trained before it was recorded)"
                if len(loads) < len(results) else "")
             if loads else "runs' load not recorded (trained before it was)")
    return f"{known}; {rendered:.2f} when this section was rendered"


def has_weights(run_dir: Path) -> bool:
    from mixroute import rundir

    return rundir.final_dir(run_dir).is_dir()


def ensure_weights(run_dir: Path, label: str = "") -> None:
    """Retrain a restored run (same config) whose adapters another run needs; its test evaluation stays."""
    import sys

    from mixroute import rundir
    from mixroute.train import train

    if has_weights(run_dir):
        return
    cfg = rundir.read_config(run_dir)
    kept = {n: (Path(run_dir) / n).read_text() for n in ("eval.json", "bench_timing.json")
            if (Path(run_dir) / n).is_file()}
    print(f"retrain {label or run_dir} (its weights are needed; the archive keeps none)", flush=True)
    train(cfg, overwrite=True, progress=sys.stdout.isatty())
    for n, text in kept.items():
        write_json(Path(run_dir) / n, json.loads(text))


def train_once(cfg: Any, label: str = "", only_finished: bool = False,
               before_train: Optional[Callable[[], Any]] = None) -> Path:
    """Train ``cfg`` unless its run directory already holds a finished training of exactly this config (or the
    archive holds its record, which is restored); returns the run directory (training time in
    bench_timing.json). ``only_finished``: raise NotFinished instead of training. ``before_train`` runs only
    when training does (e.g. pruning the base model the run needs)."""
    import sys
    import time

    from mixroute import rundir
    from mixroute.config import ConfigError, to_dict
    from mixroute.train import resume, train

    run_dir = Path(cfg.output_dir)
    done = rundir.final_dir(run_dir).is_dir() or (cfg.train.method == "base" and (run_dir / "metrics.jsonl").is_file())
    try:
        same = (_portable(to_dict(rundir.recorded_config(rundir.read_config(run_dir), True)))
                == _portable(to_dict(rundir.recorded_config(cfg, True))))
    except (ConfigError, FileNotFoundError):
        same = False
    if done and same:
        archive_run(run_dir)  # runs trained before the archive existed
        return run_dir
    if restore_run(run_dir, cfg):
        return run_dir
    if only_finished:
        raise NotFinished(label or str(run_dir))
    if before_train is not None:
        before_train()
    t0 = time.time()
    earlier = 0.0
    if same and (saved := _saved_progress(run_dir)):   # killed after a checkpoint or a stage-1 LoRA: go on
        earlier = _seconds_spent(run_dir)
        print(f"resume {label or run_dir} ({saved} of this config is there)", flush=True)
        resume(run_dir, progress=sys.stdout.isatty())
    else:
        print(f"train {label or run_dir}", flush=True)
        train(cfg, overwrite=True, progress=sys.stdout.isatty())
    write_json(run_dir / "bench_timing.json", {"train_seconds": round(time.time() - t0 + earlier),
                                                "train_load": round(os.getloadavg()[0], 2)})
    archive_run(run_dir)
    return run_dir


def _saved_progress(run_dir: Path) -> str:
    """What a killed run left that ``resume`` continues from ('' when nothing): a per-epoch checkpoint, or the
    stage-1 LoRAs finished so far (stage 1 writes no checkpoints; each finished LoRA is kept and reused)."""
    from mixroute import rundir
    from mixroute.train.state import latest_checkpoint

    if latest_checkpoint(run_dir) is not None:
        return "a checkpoint"
    done = rundir.finished_stage1(run_dir)
    return f"{len(done)} finished stage-1 LoRA{'s' * (len(done) != 1)}" if done else ""


def _seconds_spent(run_dir: Path, longest_gap: float = 600.0) -> float:
    """Training time an interrupted run already spent: the gaps between its config's writing and its metrics
    lines (steps after its checkpoint included: computed, then lost), leaving out gaps over ``longest_gap``
    seconds, which are a dead process between sessions rather than a step or a validation."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    times = [(run_dir / "config.yaml").stat().st_mtime, *sorted(float(r["time"]) for r in rows if "time" in r)]
    return sum(d for d in (b - a for a, b in zip(times, times[1:])) if 0 < d <= longest_gap)


def test_once(run_dir: Path, label: str = "", only_finished: bool = False,
              before_eval: Optional[Callable[[], Any]] = None, **eval_kwargs: Any) -> dict[str, Any]:
    """The run's test evaluation (eval.json), computed once: reused when the bench already evaluated it
    (``only_finished``: raise NotFinished instead of evaluating). A run restored from the archive before its
    evaluation is retrained first (its weights are not archived); ``before_eval`` runs when evaluation does."""
    import sys
    import time

    from mixroute import rundir
    from mixroute.evaluate import evaluate_run

    timing_path = run_dir / "bench_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    if (run_dir / rundir.EVAL).is_file() and "eval_seconds" in timing:
        res = rundir.read_eval(run_dir)
        archive_run(run_dir)
    elif only_finished:
        raise NotFinished(label or str(run_dir))
    else:
        if before_eval is not None:
            before_eval()
        if rundir.read_config(run_dir).train.method != "base":
            ensure_weights(run_dir, label)
        t0 = time.time()
        res = evaluate_run(run_dir, progress=sys.stdout.isatty(), **eval_kwargs)
        timing["eval_seconds"] = round(time.time() - t0)
        write_json(timing_path, timing)
        archive_run(run_dir)
        print(f"test {label or run_dir}: PPL {res['perplexity']['average']:.3f}", flush=True)
    res.update(timing)
    return res


def sweep_start(stages: list[tuple[str, list[float]]]) -> dict[str, float]:
    """Every swept key at its first listed value: what the first stage's trials hold the later keys at. Not the
    preset's values, so writing the chosen values into the presets changes no trial (finished runs stay
    reusable)."""
    return {k: values[0] for k, values in stages}


def sweep(stages: list[tuple[str, list[float]]], start: dict[str, Any],
          train_with: Callable[[dict[str, Any]], Path], label: str = "") -> tuple[dict[str, Any], list[dict]]:
    """Coordinate-wise learning-rate sweep on the validation split: each stage tries its values with the best of
    the earlier stages (``start``: see ``sweep_start``); the lowest validation perplexity a run reached
    wins. ``train_with(params)`` trains (or reuses) one run and returns its directory. Returns the chosen
    parameters and every run tried; none of them is evaluated on the test split here."""
    best = dict(start)
    tried: list[dict[str, Any]] = []
    for key, values in stages:
        scores: dict[float, Optional[float]] = {}
        for v in values:
            trial = {**best, key: v}
            try:
                run_dir = train_with(trial)
            except NotFinished as e:
                e.tried = tried  # the part of the sweep that has finished
                raise
            scores[v] = best_validation(run_dir)
            tried.append({"params": trial, "validation_ppl": scores[v], "dir": str(run_dir),
                          "stopping": stopping(run_dir)})
            print(f"sweep {label} {key}={fmt_value(v)}: best validation PPL "
                  f"{'-' if scores[v] is None else f'{scores[v]:.3f}'}", flush=True)
        ok = [v for v in values if scores[v] is not None]
        if ok:
            best[key] = min(ok, key=lambda v: scores[v])
    return best, tried


def run_name(method: str, params: dict[str, Any]) -> str:
    """A run directory name that tells the swept values apart."""
    return method + "".join(f"_{k.split('.')[-1]}={fmt_value(v)}" for k, v in sorted(params.items()))


def fmt_value(v: Any) -> str:
    """A swept value as it appears in run names and logs (numbers compactly, choices as they are)."""
    return v if isinstance(v, str) else f"{v:g}"


def sweep_table(sweeps: dict[str, list[dict]], note: str = "",
                chosen: Optional[dict[str, dict[str, Any]]] = None) -> list[str]:
    """Markdown rows of every sweep: method, setting, best validation perplexity (bold = the chosen setting;
    a sweep that has not finished says so)."""
    out = ["**Learning-rate sweeps** (validation split only; the lowest validation perplexity each run reached; "
           f"**bold** = chosen){note}", "", "| method | setting | validation PPL |", "|---|---|---:|"]
    from mixroute.report.compare import KEPT_PRETRAINED

    chosen = chosen or {}
    for m, tried in sweeps.items():
        seen = set()
        pick = chosen.get(m)
        for t in tried:
            key = json.dumps(t["params"], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            setting = ", ".join(f"{k.split('.')[-1]} {fmt_value(v)}" for k, v in t["params"].items())
            v = "-" if t["validation_ppl"] is None else f"{t['validation_ppl']:.3f}"
            is_pick = pick is not None and all(t["params"].get(k) == val for k, val in pick.items())
            stops = [st for st in t.get("stopping") or [] if "category" not in st]
            # a run that ended on the weights it was validated with before its first step is no setting's
            # result: its number is the start's, the same for every setting, so none is shown
            if stops and kept_start(stops[-1]):
                if pretrained_start(Path(t["dir"])):  # a start with fitted routers is stage 1 + pre-training
                    setting += KEPT_PRETRAINED
                else:
                    setting, v = setting + " (kept its start)", "not trained"
            out.append(f"| {m} | {setting} | {f'**{v}**' if is_pick else v} |")
        if pick is None:
            out.append(f"| {m} | (sweep not finished) | - |")
    return out + [""]


def pretrained_start(run_dir: Path) -> bool:
    """Whether the start a run kept already held routers fitted by router pre-training."""
    from mixroute.evaluate import routers_pretrained

    return routers_pretrained(metrics_rows(run_dir))


def kept_start(stop: dict[str, Any]) -> bool:
    """Whether an early-stopping record kept the weights validated before the first step of its stage (records
    written before ``trained`` existed: best step = start step, 0 when the stage had no offset)."""
    if stop.get("trained") is not None:
        return not stop["trained"]
    return stop.get("best_step") == stop.get("start_step", 0)


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------ command line
def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every quality benchmark takes (the script adds its own): budget, model, seeds, sizes,
    threads and where the section goes."""
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(doc.split("\n\n")[1:]))
    p.add_argument("--budget", choices=list(BUDGETS), default="smoke",
                   help="smoke: fixed few steps; full: early stopping on validation, lr sweeps, 3 seeds.")
    p.add_argument("--model", default=None, help="Base model as in load_base_model (default: the embedded "
                                                 "SmolLM2-135M-Instruct; 'tiny' = the random test model).")
    p.add_argument("--out", default=None, help="Run directories (default: under runs/, named after the budget).")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="Seeds (default: the budget's).")
    p.add_argument("--per-category", type=int, default=None, help="Records per category (default: the budget's).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-sweep", action="store_true", help="Use the presets' learning rates (no sweep).")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (1 when other jobs share the cores: two threads synchronising on a "
                        "descheduled core run several times slower).")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no",
                   help="model.precision of every run and of its evaluation (bf16: autocast, ~2x faster training "
                        "on CPUs with avx512_bf16; weights stay float32).")
    p.add_argument("--docs", default=str(root / "docs" / "benchmarks.md"), help="Where the section is written.")
    p.add_argument("--img-dir", default=None, help="Where the PNGs go (default: docs/img, or OUT/img with "
                                                   "--no-write so a trial run leaves the committed figures alone).")
    p.add_argument("--no-write", action="store_true", help="Print only; leave --docs alone.")
    p.add_argument("--only-finished", action="store_true",
                   help="Train and evaluate nothing: render the runs that have finished and list the missing ones "
                        "(a long experiment's table while it is still running).")
    return p


def finish_args(a: Any, argv: Optional[list[str]], out_name: str) -> Any:
    """Fill the budget's defaults into parsed arguments; ``out_name`` names the default run directory."""
    import sys

    root = Path(__file__).resolve().parents[1]
    b = BUDGETS[a.budget]
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.seeds = a.seeds or list(b.seeds)
    a.per_category = a.per_category or b.per_category
    a.sweep = b.sweep and not a.no_sweep
    a.out = str(Path(a.out or root / "runs" / out_name).resolve())  # run configs compare absolute paths
    a.img_dir = a.img_dir or (str(Path(a.out) / "img") if a.no_write else str(root / "docs" / "img"))
    return a


def command(script: str, argv: list[str]) -> str:
    """The command that produces a table: ``argv`` without the flags that only render it."""
    import shlex

    where = ("--docs", "--img-dir")   # where the section goes, not what it measures
    kept, args = [], iter(argv)
    for x in args:
        if x in where:
            next(args, None)   # and its value
        elif x not in ("--only-finished", "--no-write") and x.split("=", 1)[0] not in where:
            kept.append(x)
    return f"python {script}" + (" " + shlex.join(kept) if kept else "")
