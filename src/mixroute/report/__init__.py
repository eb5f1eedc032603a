"""Reports of run directories: ``write_report(run_dirs, out)`` writes a self-contained ``report.html`` and a
``report.md`` with PNGs (tables, gate heatmaps, confusion matrix, curves); ``watch`` regenerates it while a
training writes; ``compare`` builds the comparison table of ``mixroute compare``.

Importing this package is light: matplotlib is imported only when a report is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mixroute.report.runs import ReportError

__all__ = ["ReportError", "watch", "write_report"]


def write_report(run_dirs: list[str | Path], out: str | Path, layer: Optional[str | int] = None,
                 refresh_s: Optional[float] = None, warn: Optional[Callable[[str], None]] = None) -> Path:
    """Write ``out/report.html`` (self-contained), ``out/report.md`` and its PNGs; returns the HTML path.
    See ``mixroute.report.build.write_report``."""
    from mixroute.report.build import write_report as _write

    return _write(run_dirs, out, layer=layer, refresh_s=refresh_s, warn=warn)


def watch(run_dirs: list[str | Path], out: str | Path, layer: Optional[str | int] = None, interval: float = 2.0,
          max_updates: Optional[int] = None, on_update: Optional[Callable[[Path, int], None]] = None,
          warn: Optional[Callable[[str], None]] = None) -> int:
    """Write the report, then rewrite it whenever an input file changes; see ``mixroute.report.watch``."""
    from mixroute.report.watch import watch as _watch

    return _watch(run_dirs, out, layer=layer, interval=interval, max_updates=max_updates, on_update=on_update,
                  warn=warn)
