"""The one progress style of every long step (training, evaluation, pruning, library fitting): a rich bar with
the step's name, count, elapsed time and ETA, plus the columns a step adds (loss, tokens/s, units)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


def bar(*extra: Any, transient: bool = False) -> Any:
    """A ``rich.progress.Progress`` in the project's style; ``extra`` columns go between the count and the time
    (for instance ``TextColumn("loss {task.fields[loss]}")``). The caller starts and stops it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=transient)


@contextlib.contextmanager
def steps(label: str, total: int, enabled: bool = True, transient: bool = False) -> Iterator[Callable[..., None]]:
    """A bar of ``total`` steps; yields ``advance(n=1)``, a no-op when disabled."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    with bar(transient=transient) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)
