"""What every command shares: the output console and the one way a user error is reported.

A user error is something the user can fix (a bad flag, a missing file, an invalid config). It is printed as
one line, ``error: <message>``, on stderr, and the command exits with code 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
# soft_wrap: an error stays one line however long its paths are, so it can be grepped and tested
_errors = Console(stderr=True, soft_wrap=True, highlight=False)

# Exceptions that mean "the input is wrong", as (module, class). They are looked up in sys.modules rather than
# imported: their modules import torch, and if one of them was raised its module is loaded already.
USER_ERRORS = (
    ("mixroute.config", "ConfigError"),
    ("mixroute.data", "DataError"),
    ("mixroute.devices", "DeviceError"),
    ("mixroute.models", "ModelNotFoundError"),
    ("mixroute.prune", "PruneError"),
    ("mixroute.report", "ReportError"),
    ("mixroute.rundir", "RunDirError"),
    ("mixroute.train", "TrainingDiverged"),
)


def fail(message: str) -> NoReturn:
    """Report a user error found by the CLI itself and exit with code 2."""
    _errors.print(f"[red]error:[/red] {escape(' '.join(message.split()))}")
    raise typer.Exit(2)


def is_user_error(error: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    if isinstance(error, (FileNotFoundError, *extra)):
        return True
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(error, cls):
            return True
    return False


@contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn user errors raised inside into ``fail(message)``; works as ``with user_errors():`` or as a decorator.

    ``extra`` adds types for this command only: ValueError where the functions it calls signal bad input that
    way (elsewhere a ValueError is more likely a bug, and the traceback is what helps).
    """
    try:
        yield
    except Exception as e:
        if not is_user_error(e, extra):
            raise
        fail(str(e))


def device_option() -> typer.models.OptionInfo:
    return typer.Option("auto", "--device", help="Where the model runs: auto (CUDA when torch sees a GPU, else CPU), "
                                                 "cpu, cuda or cuda:N.")


def precision_option() -> typer.models.OptionInfo:
    return typer.Option("no", "--precision", help="Autocast compute precision: no (the model's dtype), bf16 or "
                                                  "fp16 (GPUs; bf16 also works on CPUs).")
