"""mixroute: routed mixtures of parameter-efficient experts for one frozen LLM.

Public API (re-exports only). Heavy modules are imported lazily so `mixroute --help` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_base_model": "mixroute.models",
    "tiny_model": "mixroute.models",
    "model_info": "mixroute.models",
    "RunConfig": "mixroute.config",
    "MixtureConfig": "mixroute.config",
    "DataConfig": "mixroute.config",
    "TrainConfig": "mixroute.config",
    "EvalConfig": "mixroute.config",
    "load_config": "mixroute.config",
    "ConfigError": "mixroute.config",
    "Mixture": "mixroute.mixture",
    "load_records": "mixroute.data",
    "synthetic_suite": "mixroute.data",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixroute' has no attribute {name!r}")


__all__ = sorted(_EXPORTS) + ["__version__"]
