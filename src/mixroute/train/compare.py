"""The ``compare`` table: rows = categories + average, column groups = runs (methods), metrics PPL / BLEU /
ROUGE-L, from eval.json dicts. Uses ``mixroute.report`` when it provides the same helpers; this module is the
fallback so ``compare`` works on its own."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Optional

METRICS = (("PPL", "perplexity"), ("BLEU", "bleu"), ("ROUGE-L", "rougeL"))


@dataclass
class Table:
    """``header`` (group, metric) pairs; ``rows``: (row label, values) with None for a missing value."""

    groups: list[str]
    metrics: list[str]
    rows: list[tuple[str, list[Optional[float]]]]


def comparison_table(evals: list[dict[str, Any]]) -> Table:
    """Build the table from eval.json dicts (categories: union in first-seen order; average last)."""
    cats: list[str] = []
    for e in evals:
        cats += [c for c in e.get("categories", []) if c not in cats]
    groups = _group_names(evals)
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
    return Table(groups, [m for m, _ in METRICS], rows)


def _group_names(evals: list[dict[str, Any]]) -> list[str]:
    names = [e.get("run") or e.get("method") or f"run{i}" for i, e in enumerate(evals)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _fmt(v: Optional[float], metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if metric == "PPL" else f"{v:.2f}"


def to_markdown(table: Table) -> str:
    head = ["category"] + [f"{g} {m}" for g in table.groups for m in table.metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values in table.rows:
        cells = [_fmt(v, table.metrics[i % len(table.metrics)]) for i, v in enumerate(values)]
        lines.append("| " + " | ".join([f"**{label}**" if label == "average" else label] + cells) + " |")
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category"] + [f"{g} {m}" for g in table.groups for m in table.metrics])
    for label, values in table.rows:
        w.writerow([label] + ["" if v is None else f"{v:.6g}" for v in values])
    return buf.getvalue()
