"""``mixroute report``: one HTML / Markdown page of runs and pruned models, optionally kept up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mixroute.cli.common import console, fail, user_errors

HELP = (
    "Write a self-contained HTML page (report.html: images embedded, no network needed) and report.md with its "
    "PNGs: config summary and data split, the comparison table (best per row highlighted), router vs classifier "
    "accuracy, trainable parameters, gate heatmaps before / during / after training, the router confusion "
    "matrix, training curves, and perplexity against sparsity for pruned models (directories with "
    "prune_report.json). Missing files are listed per run; the report shows what exists."
)

# typer/rich keeps blank-line separated paragraphs of an epilog; one example per paragraph reads best
EXAMPLES = """Examples:

mixroute report runs/moa   (writes runs/moa/report/report.html and report.md)

mixroute report runs/moa runs/lora_mixed --out reports/moa_vs_lora   (side by side)

mixroute report runs/moe_lora --layer 3   (gate heatmaps of layer 3; --layer all: every layer, selectable in the page)

mixroute report runs/moa --watch   (rewrite while training writes metrics; the page reloads itself; Ctrl-C stops)

mixroute report models/smol-w50 models/smol-w75 models/smol-m50   (pruned models: perplexity against sparsity)

Docs: docs/report.md."""


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


@user_errors()
def report_cmd(
    run_dirs: list[str] = typer.Argument(..., help="Run directories (mixroute train / eval) and pruned model "
                                                   "directories (mixroute prune --out), or a folder of pruned "
                                                   "models."),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/report for one "
                                                          "run, ./report for several)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Gate heatmaps of this layer for per-layer routers "
                                                              "(a number, or 'all' for every layer with a "
                                                              "selector); default: the average over layers."),
    watch: bool = typer.Option(False, "--watch", help="Keep running: rewrite the report when metrics.jsonl, "
                                                      "gates.json or eval.json change. Ctrl-C stops."),
    interval: float = typer.Option(2.0, "--interval", help="--watch: seconds between checks (and the page's "
                                                           "reload period)."),
    max_updates: Optional[int] = typer.Option(None, "--max-updates", help="--watch: stop after this many "
                                                                          "rewrites (default: never)."),
) -> None:
    from mixroute.report import watch as watch_report
    from mixroute.report import write_report

    if layer is not None and layer != "all" and not layer.isdigit():
        fail(f"--layer {layer!r}: give a layer number (0, 1, ...) or 'all'")
    if interval <= 0:
        fail(f"--interval {interval}: need a positive number of seconds")
    if max_updates is not None and max_updates < 0:
        fail(f"--max-updates {max_updates}: need >= 0")
    out_dir = Path(out) if out else (Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report"))

    if not watch:
        path = write_report(run_dirs, out_dir, layer=layer, warn=_warn)
        console.print(f"wrote [bold]{path}[/bold] and {path.with_suffix('.md')}", highlight=False)
        return

    seen: set[str] = set()

    def once(message: str) -> None:  # the same missing file is not repeated at every rewrite
        if message not in seen:
            seen.add(message)
            _warn(message)

    def updated(path: Path, n: int) -> None:
        console.print(f"{'wrote' if n == 0 else f'update {n}: rewrote'} [bold]{path}[/bold]"
                      + (f"; watching every {interval:g} s (Ctrl-C stops)" if n == 0 else ""), highlight=False)

    try:
        watch_report(run_dirs, out_dir, layer=layer, interval=interval, max_updates=max_updates,
                     on_update=updated, warn=once)
    except KeyboardInterrupt:
        console.print("stopped watching")
