"""Assemble the report from run directories and write it: ``OUT/report.html`` (self-contained), ``OUT/report.md``
and the PNGs beside it."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mixroute.report import tables
from mixroute.report.page import Figure, Note, Section, Table, render_html, render_markdown, write_pngs
from mixroute.report.runs import RunInfo, read_runs


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    runs: list[RunInfo]
    warnings: list[str]  # one line per run and problem: what is missing and how to get it


def _slug(i: int, name: str) -> str:
    return f"{i}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def _table_or_note(table: Optional[Table], why: str) -> list:
    return [table] if table is not None else [Note(why)]


def build_report(run_dirs: list[str | Path], layer: Optional[str | int] = None) -> Report:
    """Read the runs and build every section (figures rendered to PNG bytes). ``layer``: None = gates averaged
    over layers; N = layer N of per-layer routers; "all" = every layer, selectable in the HTML page."""
    from mixroute.report import plots

    runs = read_runs(run_dirs)
    trained = [r for r in runs if r.kind == "train"]
    pruned = [r for r in runs if r.kind == "pruned"]
    warnings = [f"{r.path}: {m}" for r in runs for m in r.missing]
    sections = [Section("Runs", "runs", _runs_blocks(runs))]

    if trained:
        blocks: list = [tables.config_table(trained), tables.data_table(trained)]
        seen: list[dict] = []
        for r in trained:
            per = (r.data_report or {}).get("per_category")
            if per and per not in seen:
                seen.append(per)
                blocks.append(tables.category_split_table(r))
        sections.append(Section("Configuration and data split", "config", blocks))

        evals = [r for r in trained if r.eval]
        no_eval = "No run has an eval.json yet: run `mixroute eval RUN_DIR`."
        sections.append(Section("Comparison", "comparison",
                                _table_or_note(tables.comparison(trained), no_eval)))
        blocks = _table_or_note(tables.accuracy_table(trained), "No evaluated run has a label-aligned router "
                                "(router accuracy applies to MoA, MoP and oracle-style routers).")
        for i, r in enumerate(evals):
            acc = r.eval.get("router_accuracy") or {}
            if acc.get("confusion"):
                blocks.append(Figure(f"confusion_{_slug(i, r.name)}", plots.confusion_matrix(r.name, acc),
                                     f"router confusion matrix of {r.name}",
                                     "Rows: true category; columns: expert chosen; a perfect router is diagonal."))
        sections.append(Section("Router accuracy", "accuracy", blocks))
        sections.append(Section("Trainable parameters", "params", _table_or_note(tables.params_table(trained),
                                                                                   no_eval)))
        sections.append(Section("Gate heatmaps", "gates", _gate_blocks(trained, layer, warnings)))
        sections.append(Section("Training curves", "curves", _curve_blocks(trained)))
        fed = [r for r in trained if r.rounds]
        if fed:
            blocks = []
            for i, r in enumerate(fed):
                blocks.append(Figure(f"rounds_{_slug(i, r.name)}", plots.round_curves(r),
                                     f"federated rounds of {r.name}", "From rounds.jsonl: validation perplexity "
                                     "per category and bytes exchanged per round."))
                if r.partition:
                    blocks.append(Figure(f"partition_{_slug(i, r.name)}", plots.partition_heatmap(r),
                                         f"partition of {r.name}", "From partition.json: train examples per "
                                         "client and category."))
                if r.client_gates and r.client_gates.get("clients"):
                    blocks.append(Figure(f"client_gates_{_slug(i, r.name)}", plots.client_gate_heatmaps(r),
                                         f"gates per client of {r.name}", "From gates_clients.json: each "
                                         "client's routing by category in its first and last round (the global "
                                         "gate before / during / after is under Gate heatmaps)."))
            sections.append(Section("Federated rounds", "rounds", blocks))
    libraries = [r for r in runs if r.kind == "library"]
    if libraries:
        sections.append(Section("Expert library", "library", _library_blocks(libraries)))
    if pruned:
        sections.append(Section("Pruning", "pruning", [
            tables.prune_table(pruned),
            Figure("prune_sparsity", plots.sparsity_curves(pruned), "perplexity against sparsity per method",
                   "Each line starts at the dense model (0%, perplexity before pruning).")]))

    names = ", ".join(r.name for r in runs) or "(no runs)"
    from mixroute import __version__

    subtitle = f"{len(runs)} director{'y' if len(runs) == 1 else 'ies'}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}" \
               f" by mixroute {__version__}"
    return Report(f"mixroute report: {names}", subtitle, sections, runs, warnings)


def _runs_blocks(runs: list[RunInfo]) -> list:
    rows = [[r.name, r.kind, r.method, str(r.path), _progress(r),
             ", ".join(m.split(" ", 1)[0].rstrip(":") for m in r.missing) or "complete"] for r in runs]
    blocks: list = [Table(["run", "kind", "method", "directory", "logged", "missing / problems"], rows)]
    for r in runs:
        if r.missing:
            blocks.append(Note(f"{r.name}: " + "; ".join(r.missing) + ". The report shows what exists.",
                               warning=True))
        outcome = (r.eval or {}).get("training") or {}
        if outcome.get("trained") is False and outcome.get("routers_pretrained"):
            blocks.append(Note(f"{r.name}: its last stage never beat its start on validation (step "
                               f"{outcome.get('start_step')}), so early stopping kept that start: the stage-1 experts "
                               "with the routers as router pre-training fitted them. Its numbers are those of stage 1 "
                               "plus pre-training, not of the joint stage.", warning=True))
        elif outcome.get("trained") is False:
            blocks.append(Note(f"{r.name}: not trained. Its best validation was the state before its first step "
                               f"(step {outcome.get('start_step')}), so early stopping kept that start; its numbers "
                               "are not a result of the method.", warning=True))
    if not any(r.rounds for r in runs):
        blocks.append(Note("Federated runs: none given (a run directory with rounds.jsonl adds per-round curves)."))
    return blocks


def _library_blocks(libs: list[RunInfo]) -> list:
    """Each library's experts and, when `mixroute library curve` has run, its quality-vs-cost curve."""
    from mixroute.report import plots

    blocks: list = []
    for i, r in enumerate(libs):
        experts = (r.library or {}).get("experts", [])
        blocks.append(Table(["expert", "kind", "rank", "cost", "example prompts", "description"],
                            [[e.get("name", "?"), e.get("kind", "?"), str(e.get("rank", "-")), f"{e.get('cost', 0):g}",
                              str(e.get("examples", 0)), e.get("description", "")] for e in experts],
                            caption=f"experts of {r.name}"))
        if r.cost_curve:
            blocks.append(Figure(f"cost_curve_{_slug(i, r.name)}", plots.cost_curve(r.cost_curve, r.name),
                                 f"quality against cost of {r.name}", "From cost_curve.json: routed perplexity "
                                 "and mean expert cost as lambda (route_cost_weight) varies."))
            blocks.append(Table(["lambda", "routed perplexity", "mean cost"],
                                [[f"{c['lambda']:g}", f"{c['ppl']:.3f}", f"{c['mean_cost']:.3f}"]
                                 for c in r.cost_curve], caption=f"cost-aware routing of {r.name}"))
    return blocks


def _progress(r: RunInfo) -> str:
    """How far metrics.jsonl goes: last train step and last validation step (``--watch`` shows it move)."""
    if r.kind in ("pruned", "library"):
        return "-"
    last = max((x["step"] for x in r.train_rows if isinstance(x.get("step"), int)), default=None)
    val = max((x["step"] for x in r.eval_rows if isinstance(x.get("step"), int)), default=None)
    if last is None and val is None:
        return "nothing yet"
    return f"step {last if last is not None else '-'}, validation at step {val if val is not None else '-'}"


def _gate_blocks(runs: list[RunInfo], layer: Optional[str | int], warnings: list[str]) -> list:
    from mixroute.report import plots

    blocks: list = []
    for i, r in enumerate(runs):
        if not r.gates or not plots.pick_snapshots(r.gates):
            continue
        layers = plots.gate_layers(r.gates)
        slug = _slug(i, r.name)
        caption = ("Average routing weight per (category, expert); one colour scale across the stages"
                   + (f"; {r.name} has a single expert, so every weight is 1." if r.gates.get("num_experts") == 1
                      else "."))
        if layer is None or (str(layer) == "all" and not layers):
            blocks.append(Figure(f"gates_{slug}", plots.gate_heatmap(r.name, r.gates), f"gate heatmap of {r.name}",
                                 caption))
        elif str(layer) == "all":
            group = f"gates_{slug}"
            blocks.append(Figure(group + "_avg", plots.gate_heatmap(r.name, r.gates), f"gate heatmap of {r.name}",
                                 caption, group=group, label="average"))
            for key in layers:
                blocks.append(Figure(f"{group}_layer{key}", plots.gate_heatmap(r.name, r.gates, key),
                                     f"gate heatmap of {r.name}, layer {key}", caption, group=group,
                                     label=f"layer {key}"))
        elif str(layer) in layers:
            blocks.append(Figure(f"gates_{slug}_layer{layer}", plots.gate_heatmap(r.name, r.gates, str(layer)),
                                 f"gate heatmap of {r.name}, layer {layer}", caption))
        else:
            have = ", ".join(layers) or "none, one router for all layers"
            msg = f"{r.name}: no per-layer gates for layer {layer} (available: {have}); showing the average over layers"
            warnings.append(f"{r.path}: {msg}")
            blocks += [Note(msg, warning=True), Figure(f"gates_{slug}", plots.gate_heatmap(r.name, r.gates),
                                                       f"gate heatmap of {r.name}", caption)]
    return blocks or [Note("No run has gates.json snapshots yet (written at each validation during training).")]


def _curve_blocks(runs: list[RunInfo]) -> list:
    from mixroute.report import plots

    with_rows = [r for r in runs if r.train_rows or r.eval_rows]
    if not with_rows:
        return [Note("No run has metrics.jsonl lines yet.")]
    blocks: list = [Figure("curves", plots.training_curves(with_rows), "training loss, validation perplexity and "
                           "tokens per second against step",
                           "Dotted: stage 1 (MoA trains one LoRA per category before the mixture).")]
    for i, r in enumerate(with_rows):
        if any(x.get("ppl_per_category") for x in r.eval_rows):
            blocks.append(Figure(f"ppl_per_category_{_slug(i, r.name)}", plots.category_curves(r),
                                 f"validation perplexity per category of {r.name}"))
    return blocks


def write_report(run_dirs: list[str | Path], out: str | Path, layer: Optional[str | int] = None,
                 refresh_s: Optional[float] = None,
                 warn: Optional[Callable[[str], None]] = None) -> Path:
    """Write ``out/report.html`` (self-contained), ``out/report.md`` and its PNGs; returns the HTML path.

    Problems (missing files, a missing layer) go to ``warn`` (default: stderr) and onto the page.
    ``refresh_s`` makes the page reload itself (``--watch``). Raises ``ReportError`` for a path that does not
    exist."""
    from mixroute.fileio import atomic_write_text

    report = build_report(run_dirs, layer)
    for w in report.warnings:
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(w)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_pngs(report.sections, out)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, render_markdown(report.title, report.subtitle, report.sections))
    atomic_write_text(html_path, render_html(report.title, report.subtitle, report.sections, refresh_s))
    for p in (md_path, html_path):
        p.chmod(0o644)  # atomic_write_text's temporary file is private; a report is meant to be shared
    return html_path
