"""Federated training on Flower 1.42 (Message API): a ``ServerApp`` and a ``ClientApp`` that train a routed
mixture across clients holding skewed task mixtures; only adapter tensors (experts + routers) travel.

    from mixroute.config import load_config
    from mixroute.federated import run, resume
    run_dir = run(load_config("configs/fed_mop_skew.yaml"))

Files: ``payload.py`` (what travels, byte size), ``aggregate.py`` (fedavg / usage rules on state dicts),
``local.py`` (setup and one client's local training), ``client.py`` (ClientApp), ``server.py`` (ServerApp:
rounds, failures, checkpoints, rounds.jsonl), ``runner.py`` (``run`` / ``resume`` in the simulation runtime).
Imported lazily: ``import mixroute.federated`` does not import flwr or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"run": "mixroute.federated.runner", "resume": "mixroute.federated.runner"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixroute.federated' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
