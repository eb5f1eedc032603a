"""TensorBoard event files from a training run (optional: needs ``pip install 'mixroute[tensorboard]'``).

``MetricsLogger`` (train/tracking.py) mirrors train / validation scalars through a ``TensorBoardLogger`` into
``RUN_DIR/tb``: ``tensorboard --logdir runs`` then shows every run. Uses tensorboard's own event writer (not
torch.utils.tensorboard, which imports far more).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from mixroute.rundir import TENSORBOARD

INSTALL_HINT = "TensorBoard event files need the tensorboard package: pip install 'mixroute[tensorboard]'"


class TensorBoardLogger:
    """Scalars to ``run_dir/tb/events.out.tfevents.*``; the file is created at the first ``log``.

    Raises ImportError (with the install command) when tensorboard is not installed."""

    def __init__(self, run_dir: str | Path, subdir: str = TENSORBOARD) -> None:
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        self._event, self._summary, self._writer_cls = Event, Summary, EventFileWriter
        self.log_dir = Path(run_dir) / subdir
        self._writer: Any = None

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """One event with every finite numeric value of ``scalars`` (others, e.g. None or text, are skipped)."""
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if not values:
            return
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._writer_cls(str(self.log_dir))
        self._writer.add_event(self._event(wall_time=time.time(), step=int(step),
                                           summary=self._summary(value=values)))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
