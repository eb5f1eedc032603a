"""Where a run reports while it trains: metrics.jsonl and gates.json (through ``mixroute.rundir``), TensorBoard
when it is installed, and a rich progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mixroute import rundir
from mixroute.train.tb import TensorBoardLogger


class MetricsLogger:
    """Appends train / eval lines to metrics.jsonl, adds gates.json snapshots and mirrors scalars to TensorBoard.
    A disabled logger (not the main process) writes nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tb: Optional[TensorBoardLogger] = None
        if enabled:
            try:
                self.tb = TensorBoardLogger(self.run_dir)
            except ImportError:  # tensorboard is an optional extra; metrics.jsonl holds the same scalars
                self.tb = None

    def train(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rundir.append_metrics(self.run_dir, row)
        if self.tb is not None:
            self.tb.log(row["step"], {f"train/{k}": v for k, v in row.items()
                                      if k in ("loss", "lm_loss", "aux_loss", "lr", "tokens_per_s")})

    def eval(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rundir.append_metrics(self.run_dir, row)
        if self.tb is not None and row.get("ppl") is not None:
            scalars = {"validation/ppl": row["ppl"]}
            scalars.update({f"validation/ppl_{c}": v for c, v in row.get("ppl_per_category", {}).items()})
            self.tb.log(row["step"], scalars)

    def gates(self, categories: list[str], num_experts: int, level: str, snapshot: dict[str, Any]) -> None:
        if self.enabled:
            rundir.add_gate_snapshot(self.run_dir, categories, num_experts, level, snapshot)

    def validation(self, row: dict[str, Any], snapshot: Optional[dict[str, Any]], categories: list[str]) -> None:
        """One validation of ``evaluate.validation_snapshot``: its eval line, and its gate snapshot when it has
        one (central training and the federated server log a validation through here)."""
        self.eval(row)
        if snapshot is not None:
            snapshot = dict(snapshot)
            level = snapshot.pop("level")
            self.gates(categories, len(snapshot["weights"][0]), level, snapshot)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines and gate snapshots past the checkpoint's step (they will be redone)."""
        if self.enabled:
            rundir.truncate_after(self.run_dir, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class ProgressBar:
    """A rich progress bar with loss, tokens/s and ETA (silent when disabled)."""

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True) -> None:
        self.progress: Optional[Any] = None
        if not enabled or total <= 0:
            return
        from rich.progress import TextColumn

        from mixroute.progress import bar

        self.progress = bar(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"))
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, completed=done, loss="-", tps="-")

    def update(self, done: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def note(self, text: str) -> None:
        """A line above the bar (e.g. why training stopped before the cap)."""
        if self.progress is not None:
            self.progress.console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
