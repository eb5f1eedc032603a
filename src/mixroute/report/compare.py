"""The comparison table of ``mixroute compare`` and the report: rows = categories + average, column groups =
runs, metrics PPL / BLEU / ROUGE-L, read from eval.json dicts; as markdown or CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Optional

METRICS = (("PPL", "perplexity"), ("BLEU", "bleu"), ("ROUGE-L", "rougeL"))


@dataclass
class ComparisonTable:
    """Column groups (runs) x ``metrics``; ``rows``: (row label, values) with None for a missing value, values
    ordered group by group."""

    groups: list[str]
    metrics: list[str]
    rows: list[tuple[str, list[Optional[float]]]]


def comparison_table(evals: list[dict[str, Any]]) -> ComparisonTable:
    """Build the table from eval.json dicts (categories: union in first-seen order; average last)."""
    cats: list[str] = []
    for e in evals:
        cats += [c for c in e.get("categories", []) if c not in cats]
    rows = []
    for cat in cats + ["average"]:
        values: list[Optional[float]] = []
        for e in evals:
            for _, key in METRICS:
                block = e.get(key) or {}
                if cat == "average":
                    values.append(block.get("average"))
                else:
                    values.append((block.get("per_category") or {}).get(cat))
        rows.append((cat, values))
    return ComparisonTable(_group_names(evals), [m for m, _ in METRICS], rows)


NOT_TRAINED = " (not trained: kept its start)"
# a start whose routers router pre-training fitted is the stage-1 experts with those routers: a result of
# stage 1 and pre-training, not of the joint stage that followed
KEPT_PRETRAINED = " (stage 2 kept its start: the stage-1 experts with the pre-trained routers)"


def _group_names(evals: list[dict[str, Any]]) -> list[str]:
    """Run names; a run whose training kept the weights it started from (eval.json ``training.trained`` is
    false) is marked, so its numbers are never read as the method's result."""
    names = [e.get("run") or e.get("method") or f"run{i}" for i, e in enumerate(evals)]
    names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
    return [n + _start_note(e.get("training") or {}) for n, e in zip(names, evals)]


def _start_note(outcome: dict[str, Any]) -> str:
    if outcome.get("trained") is not False:
        return ""
    return KEPT_PRETRAINED if outcome.get("routers_pretrained") else NOT_TRAINED


def format_metric(v: Optional[float], metric: str) -> str:
    """PPL with 3 decimals, BLEU / ROUGE-L (0-100) with 2, "-" for a missing value."""
    if v is None:
        return "-"
    return f"{v:.3f}" if metric == "PPL" else f"{v:.2f}"


def column_names(table: ComparisonTable) -> list[str]:
    return ["category"] + [f"{g} {m}" for g in table.groups for m in table.metrics]


def to_markdown(table: ComparisonTable) -> str:
    head = column_names(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values in table.rows:
        cells = [format_metric(v, table.metrics[i % len(table.metrics)]) for i, v in enumerate(values)]
        lines.append("| " + " | ".join([f"**{label}**" if label == "average" else label] + cells) + " |")
    return "\n".join(lines)


def to_csv(table: ComparisonTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(column_names(table))
    for label, values in table.rows:
        w.writerow([label] + ["" if v is None else f"{v:.6g}" for v in values])
    return buf.getvalue()
