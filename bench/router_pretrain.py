"""MoA's per-layer routers: what router pre-training's features should hold, measured -> docs/benchmarks.md.

Router pre-training (``train.gate``) fits each layer's router on cached features of that layer's input, with
the experts below it run as ``mixture.gate_pretrain_experts`` says: ``label`` (the example's own expert at every
layer), ``uniform`` (every expert averaged) or ``none`` (the frozen base). Under ``label`` the label reaches the
features of every layer above the first through the experts below, so those routers may learn which expert ran
instead of what the prompt is about. This script takes a finished MoA run (its stage-1 experts and data), runs
router pre-training once per setting from the same initial routers, and reports on one split:

* the accuracy pre-training itself reports (on its cached features): layer 0, and the other layers;
* the accuracy of the decisions the forward pass applies when the routers decide at every layer (what stage 2
  starts from and what evaluation reports): overall, layer 0, the other layers' range, the share of examples
  whose layers all agree;
* the category-average perplexity of that start.

Validation split by default: this chooses a setting, so it must not read the test split.

    python bench/router_pretrain.py --run runs/quality_dolly_groups_full/seed0/sweep/moa_router_scope=layer
    python bench/router_pretrain.py --run RUN --modes label none --no-write

Each measurement is recorded in bench/results/router_pretrain.json (keyed by run, setting and split) and a rerun
reuses it; ``--fresh`` measures again.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import ROOT, write_section  # noqa: E402

from mixroute.config import PRETRAIN_EXPERTS as MODES  # noqa: E402
RECORDS = ROOT / "bench" / "results" / "router_pretrain.json"


@dataclass
class Opened:
    """A MoA run opened once (base model, data, stage-1 adapters) for every setting measured on it."""

    cfg: Any
    model: Any
    data: Any
    mcfg: Any
    adapters: list[str]


def open_moa_run(run: Path) -> Opened:
    from mixroute import rundir

    cfg = rundir.read_config(run)
    if cfg.train.method != "moa":
        raise SystemExit(f"{run}: a MoA run is needed; this one trained {cfg.train.method!r}")
    if cfg.mixture.router_scope != "layer":
        raise SystemExit(f"{run}: router_scope is {cfg.mixture.router_scope!r}; the setting applies to per-layer "
                         f"routers")
    model, _tok, data, mcfg = rundir.open_run(cfg, "cpu")
    adapters = [str(a) for a in (cfg.train.stage1_adapters or [rundir.stage1_dir(run, c) for c in data.categories])]
    missing = [a for a in adapters if not (Path(a) / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"{run}: stage-1 adapters missing: {', '.join(missing)}")
    return Opened(cfg, model, data, mcfg, adapters)


def measure(opened: Opened, mode: str, split: str, progress: bool = True) -> dict:
    """Router pre-training with ``gate_pretrain_experts=mode`` on the run's stage-1 experts, from the same initial
    routers for every mode, then one free-running pass over ``split``."""
    from mixroute.devices import autocast
    from mixroute.evaluate import applied_router_accuracy, held_out_pass, perplexity
    from mixroute.train.centralized import build_mixture, seed_everything
    from mixroute.train.gate import label_aligned_keys, pretrain_router

    cfg, model, data = opened.cfg, opened.model, opened.data
    seed_everything(cfg.train.seed)
    mcfg = copy.deepcopy(opened.mcfg)
    mcfg.gate_pretrain_experts = mode
    mix = build_mixture(model, mcfg, opened.adapters, data)
    bs, every = cfg.eval.batch_size, len(data.examples["train"])
    train = list(data.batches("train", bs, max_per_category=every))
    held = list(data.batches(split, bs))
    t0 = time.perf_counter()
    with autocast(torch.device("cpu"), cfg.model.precision):
        res = pretrain_router(mix, train, mcfg.gate_pretrain_steps, mcfg.gate_pretrain_lr,
                              val_batches=list(data.batches("validation", bs)), seed=cfg.train.seed)
        fit_s = time.perf_counter() - t0
        out = held_out_pass(model, mix, held)
    keys = label_aligned_keys(mix)
    acc = applied_router_accuracy(out, data.categories, mcfg.num_experts, keys)
    per = acc.get("per_router", {})
    cached = res.val_accuracy_per_router
    upper = [v for k, v in cached.items() if k != keys[0]]
    applied_upper = [v for k, v in per.items() if k != keys[0]]
    ppl = perplexity(out.nll, out.tokens, out.task_ids, data.categories)
    row = {"mode": mode, "steps": res.steps, "best_epoch": res.best_epoch, "fit_s": round(fit_s, 1),
           "cached_first": cached.get(keys[0]), "cached_upper": [min(upper), max(upper)] if upper else None,
           "applied": acc["overall"], "interval": acc["interval"], "applied_first": per.get(keys[0]),
           "applied_upper": [min(applied_upper), max(applied_upper)] if applied_upper else None,
           "agreement": acc.get("agreement"), "ppl_average": ppl["average"], "n": len(out.task_ids)}
    if progress:
        print(f"{mode}: {row}", flush=True)
    mix.detach()
    return row


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _range(r) -> str:
    return "-" if r is None else f"{100 * r[0]:.1f}-{100 * r[1]:.1f}%"


def _shown(text: str) -> str:
    """Run paths as the bench lays runs out (runs/...), not the scratch folder they were measured in."""
    return re.sub(r"(?<![\w/])/\S*?/(runs/)", r"\1", text)


def findings(rows: list[dict]) -> list[str]:
    """What the table says, computed from it."""
    by = {r["mode"]: r for r in rows}
    out = []
    lab = by.get("label")
    if lab and lab["cached_upper"] and lab["applied_upper"]:
        c, ap = lab["cached_upper"], lab["applied_upper"]
        said = (f"- Under `label`, layers 1+ report {100 * c[0]:.1f}-{100 * c[1]:.1f}% on the cached features "
                f"and are right {100 * ap[0]:.1f}-{100 * ap[1]:.1f}% of the time when the routers decide (layer 0: "
                f"{_pct(lab['applied_first'])}; every layer agrees on {_pct(lab['agreement'])} of examples)")
        if c[0] > ap[1]:
            said += (": the cached accuracy overstates every layer's, since those routers read which expert ran "
                     "below them, and when the routers decide they follow the layers below.")
        else:
            said += ": here the cached accuracy does not overstate what they do."
        out.append(said)
    if len(rows) > 1:
        accs = [r["applied"] for r in rows]
        ppls = [r["ppl_average"] for r in rows]
        out.append(f"- Applied accuracy across the settings: {_pct(min(accs))}-{_pct(max(accs))}; start perplexity "
                   f"{min(ppls):.3f}-{max(ppls):.3f} ({100 * (max(ppls) / min(ppls) - 1):.1f}% apart).")
        ivs = [r["interval"] for r in rows if r["interval"]]
        if len(ivs) == len(rows) and max(lo for lo, _ in ivs) <= min(hi for _, hi in ivs):
            out.append("- Every applied-accuracy interval overlaps the others: the setting changes what "
                       "pre-training reports, not measurably what stage 2 starts from.")
    return out


def render(rows: list[dict], run: Path, split: str, command: str) -> str:
    lines = ["## MoA router pre-training: which experts run below a per-layer router", "",
             f"Run: `{_shown(str(run))}` (its stage-1 experts, data and config; router pre-training repeated from the same "
             f"initial routers for each setting). Split: {split} ({rows[0]['n']} examples). Command: `{command}`.",
             "Accuracy \"cached\" is what pre-training reports on its own cached features; \"applied\" is the share "
             "of (example, layer) decisions that sent the example to its label's expert when every layer's router "
             "decides (what stage 2 starts from and what evaluation reports).", "",
             "| experts below a router | cached: layer 0 | cached: layers 1+ | applied: all | applied: layer 0 "
             "| applied: layers 1+ | layers agree | PPL (category average) |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        iv = r["interval"]
        ci = f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else ""
        lines.append(f"| {r['mode']} | {_pct(r['cached_first'])} | {_range(r['cached_upper'])} | "
                     f"{_pct(r['applied'])}{ci} | {_pct(r['applied_first'])} | {_range(r['applied_upper'])} | "
                     f"{_pct(r['agreement'])} | {r['ppl_average']:.3f} |")
    lines += ["", *findings(rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path,
                    help="A finished MoA run (its stage-1 experts: train.stage1_adapters or its own stage1/).")
    ap.add_argument("--records", type=Path, default=RECORDS, help="Where measurements are recorded and reused.")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true", help="Print only; leave --docs alone.")
    ap.add_argument("--fresh", action="store_true", help="Measure again instead of reusing recorded rows.")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from mixroute.fileio import atomic_write_text

    records = json.loads(a.records.read_text()) if a.records.is_file() else {}
    rows, opened = [], None
    for m in a.modes:
        key = f"{_shown(str(a.run.resolve()))}|{m}|{a.split}"
        if a.fresh or key not in records:
            opened = opened or open_moa_run(a.run)
            records[key] = measure(opened, m, a.split)
            a.records.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(a.records, json.dumps(records, indent=1) + "\n")
        rows.append(records[key])
    command = _shown("python bench/router_pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv))
    text = render(rows, a.run, a.split, command)
    print(text)
    if not a.no_write:
        write_section(a.docs, text.splitlines()[0], text)


if __name__ == "__main__":
    main()
