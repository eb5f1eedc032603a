"""Training: the centralized recipe (``train``, ``resume``), one step (``loop``), checkpoints (``state``),
metrics and progress (``tracking``, ``tb``). Imported lazily."""

from __future__ import annotations

import importlib

_EXPORTS = {"train": "mixroute.train.centralized", "resume": "mixroute.train.centralized",
            "TrainingDiverged": "mixroute.train.loop"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixroute.train' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
