"""Where a run reports: metrics.jsonl, gates.json, TensorBoard (when available) and a rich progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from mixroute.config import atomic_write_text


class MetricsLogger:
    """Appends train / eval lines to ``metrics.jsonl``, keeps ``gates.json`` and mirrors scalars to
    TensorBoard through ``mixroute.report.tb.TensorBoardLogger`` when that module and tensorboard exist."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb: Any = None
        if enabled:
            try:
                from mixroute.report.tb import TensorBoardLogger

                self.tb = TensorBoardLogger(self.run_dir)
            except Exception:  # report/ not there yet, or tensorboard missing: metrics.jsonl is enough
                self.tb = None

    def _append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(_finite(row)) + "\n")

    def train(self, row: dict[str, Any]) -> None:
        self._append(row)
        if self.tb is not None:
            self.tb.log(row["step"], {f"train/{k}": v for k, v in row.items()
                                      if k in ("loss", "lm_loss", "aux_loss", "lr", "tokens_per_s")})

    def eval(self, row: dict[str, Any]) -> None:
        self._append(row)
        if self.tb is not None and row.get("ppl") is not None:
            scalars = {"validation/ppl": row["ppl"]}
            scalars.update({f"validation/ppl_{c}": v for c, v in row.get("ppl_per_category", {}).items()})
            self.tb.log(row["step"], scalars)

    def gates(self, categories: list[str], num_experts: int, level: str, snapshot: dict[str, Any]) -> None:
        """Add a snapshot to gates.json (rewritten atomically)."""
        if not self.enabled:
            return
        path = self.run_dir / "gates.json"
        doc = json.loads(path.read_text()) if path.is_file() else {}
        if doc.get("num_experts") != num_experts:
            doc = {}
        doc.update(categories=list(categories), num_experts=num_experts, level=level)
        doc.setdefault("snapshots", []).append(snapshot)
        atomic_write_text(path, json.dumps(doc))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines and gate snapshots past the checkpoint's step (they will be redone)."""
        if self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        gates = self.run_dir / "gates.json"
        if gates.is_file():
            doc = json.loads(gates.read_text())
            doc["snapshots"] = [s for s in doc.get("snapshots", []) if s.get("step", 0) <= step]
            atomic_write_text(gates, json.dumps(doc))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class ProgressBar:
    """A rich progress bar with loss, tokens/s and ETA (silent when disabled)."""

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True) -> None:
        self.progress: Optional[Any] = None
        if not enabled or total <= 0:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, completed=done, loss="-", tps="-")

    def update(self, done: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
