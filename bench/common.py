"""What the quality benchmarks share: paths, presets, number formatting and rewriting one section
of docs/benchmarks.md. Importing it puts ``src/`` on ``sys.path`` (the scripts run from a checkout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

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
