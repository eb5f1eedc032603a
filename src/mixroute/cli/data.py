"""``mixroute data inspect`` and ``mixroute data synthetic``: look at a data set, write the synthetic suite."""

from __future__ import annotations

import json
from typing import Optional

import typer

from mixroute.cli.common import fail, user_errors

HELP = "Inspect data sets and write the built-in synthetic suite."


def parse_columns(text: Optional[str]) -> dict[str, str]:
    """``instruction=prompt,response=completion`` -> {"instruction": "prompt", "response": "completion"}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(f"--columns: expected FIELD=COLUMN pairs separated by commas (e.g. "
                             f"instruction=prompt,response=completion), got {part.strip()!r}")
        out[ours.strip()] = theirs.strip()
    return out


def length_stats(values: list[int]) -> dict[str, float]:
    """mean, median, p95 and max of token lengths."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


@user_errors(ValueError, OSError)  # bad --columns, an unreadable file
def inspect_cmd(
    path: str = typer.Argument(..., help="JSONL/JSON/CSV/Parquet file (Dolly schema, or map columns)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer for the length statistics: "
                                                                     "omit (or 'tiny') for the embedded SmolLM2 "
                                                                     "tokenizer, or a local dir / cached HF id."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Column mapping FIELD=COLUMN,... e.g. "
                                                                 "instruction=prompt,response=completion,"
                                                                 "category=task"),
    template: str = typer.Option("chat", "--template", help="chat (the tokenizer's chat template) or plain."),
    max_length: int = typer.Option(256, "--max-length", help="Truncation length used to count truncated and "
                                                             "dropped examples."),
) -> None:
    """Records, per-category counts, token lengths (prompt / response / total) and what would be truncated."""
    from rich.console import Console
    from rich.table import Table

    from mixroute.data import load_records, tokenize_records
    from mixroute.models import load_tokenizer

    if template not in ("chat", "plain"):
        fail(f"--template must be 'chat' or 'plain', got {template!r}")
    if max_length < 2:
        fail(f"--max-length must be >= 2, got {max_length}")
    rs = load_records(path, columns=parse_columns(columns))
    tok = load_tokenizer(tokenizer)
    toks = tokenize_records(rs.records, tok, rs.categories, template, max_length)  # type: ignore[arg-type]
    # soft_wrap: the summary lines carry long paths; keep them whole
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{rs.source}: {len(rs):,} records ({rs.loaded:,} loaded, {rs.skipped:,} skipped for a blank "
                  f"instruction or response{': e.g. ' + ', '.join(rs.skipped_where) if rs.skipped_where else ''})")
    cats = Table(title=f"{len(rs.categories)} categories")
    cats.add_column("category")
    cats.add_column("records", justify="right")
    for c, n in rs.counts().items():
        cats.add_row(c, f"{n:,}")
    console.print(cats)
    prompt = [p for p, _ in toks.raw_lengths]
    resp = [r for _, r in toks.raw_lengths]
    lengths = Table(title=f"tokens per example ({template} template, before truncation)")
    for col in ("", "mean", "median", "p95", "max"):
        lengths.add_column(col, justify="right" if col else "left")
    for name, vals in (("prompt", prompt), ("response", resp), ("total", [p + r for p, r in toks.raw_lengths])):
        s = length_stats(vals)
        lengths.add_row(name, f"{s['mean']:.1f}", f"{s['median']:.0f}", f"{s['p95']:.0f}", f"{s['max']:.0f}")
    console.print(lengths)
    console.print(f"at max_length {max_length}: {toks.truncated:,} truncated ({toks.response_truncated:,} lose "
                  f"response tokens), {toks.dropped:,} dropped (no room for a response token)")


@user_errors()
def synthetic_cmd(
    out: str = typer.Option(..., "--out", help="Output JSONL file (written atomically)."),
    per_task: int = typer.Option(200, "--per-task", help="Records per task family."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (same seed -> same file)."),
    suite: str = typer.Option("formats", "--suite", help="formats (eight different input/output formats), "
                                                         "conventions (one input distribution, six conflicting "
                                                         "output conventions) or ciphers (one input distribution, "
                                                         "four conflicting digit substitutions; the demo's "
                                                         "suite)."),
) -> None:
    """Write a built-in synthetic multi-task suite as JSONL (Dolly schema, category = task family)."""
    from mixroute.fileio import atomic_write_text
    from mixroute.data import SUITES, synthetic_suite

    if not out.endswith(".jsonl"):
        fail(f"--out must be a .jsonl file, got {out!r}")
    if suite not in SUITES:
        fail(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    recs = synthetic_suite(per_task=per_task, seed=seed, suite=suite)
    atomic_write_text(out, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in recs))
    typer.echo(f"wrote {len(recs):,} records ({len(SUITES[suite])} task families x {per_task}) to {out}")


@user_errors(ValueError)
def partition_cmd(
    config: str = typer.Argument(..., help="YAML config with a federated: section (configs/fed_*.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. federated.clients=10 "
                                                              "federated.partition=dirichlet"),
    out: Optional[str] = typer.Option(None, "--out", help="Also write the table as JSON (partition.json format)."),
) -> None:
    """Print the clients x categories counts of the train split a federated config partitions."""
    from mixroute.config import load_config
    from mixroute.data import RunData, format_table, partition_train
    from mixroute.fileio import atomic_write_text
    from mixroute.models import load_tokenizer

    cfg = load_config(config, overrides or [])
    fed = cfg.federated
    tok = load_tokenizer(cfg.model.name)
    data = RunData.build(cfg, tok)
    part = partition_train(fed, [e["task_id"] for e in data.examples["train"]], len(data.categories))
    table = part.table(data.categories)
    extra = f", alpha {fed.dirichlet_alpha}" if fed.partition == "dirichlet" else (
        f", {fed.partition_total or 'all'} drawn, {fed.skew_factor:g}x" if fed.partition == "mop_skew" else "")
    typer.echo(f"{fed.partition} partition of the train split ({len(data.examples['train'])} examples) over "
               f"{fed.clients} clients, seed {fed.partition_seed}{extra}")
    typer.echo(format_table(table))
    if out:
        atomic_write_text(out, json.dumps(table, indent=2))
        typer.echo(f"wrote {out}")

