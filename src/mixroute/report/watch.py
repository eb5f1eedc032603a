"""``mixroute report --watch``: poll the run directories' report inputs (mtime and size of metrics.jsonl,
gates.json, eval.json, ...) and rewrite the report when one changes. Ctrl-C stops (KeyboardInterrupt reaches
the caller)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from mixroute.report.build import write_report
from mixroute.report.runs import expand, watch_signature


def watch(run_dirs: list[str | Path], out: str | Path, layer: Optional[str | int] = None, interval: float = 2.0,
          max_updates: Optional[int] = None, on_update: Optional[Callable[[Path, int], None]] = None,
          warn: Optional[Callable[[str], None]] = None) -> int:
    """Write the report, then poll every ``interval`` seconds and rewrite it after a change; returns the number
    of rewrites. Stops after ``max_updates`` rewrites (None = until interrupted). ``on_update(html_path, n)``
    is called after every write (n = 0 for the first). The page reloads itself every ``interval`` seconds."""
    if interval <= 0:
        raise ValueError(f"interval {interval}: need a positive number of seconds")
    dirs = expand(run_dirs)
    refresh = max(1.0, interval)
    sig = watch_signature(dirs)
    path = write_report(run_dirs, out, layer=layer, refresh_s=refresh, warn=warn)
    if on_update:
        on_update(path, 0)
    updates = 0
    while max_updates is None or updates < max_updates:
        time.sleep(interval)
        now = watch_signature(dirs)
        if now == sig:
            continue
        sig = now
        path = write_report(run_dirs, out, layer=layer, refresh_s=refresh, warn=warn)
        updates += 1
        if on_update:
            on_update(path, updates)
    return updates
