"""Routers: small modules ``forward(hidden, mask, task_ids) -> Route`` (see ``routers.base``).

``build_router`` maps ``MixtureConfig.router`` to a class. ``gate`` (MoP) is installed by the prompt experts.
"""

from __future__ import annotations

from torch import nn

from mixroute.config import MixtureConfig
from mixroute.routers.base import Route, dense_route, index_route, masked_mean
from mixroute.routers.fixed import OracleRouter, SingleRouter, UniformRouter
from mixroute.routers.poly import PolyRouter
from mixroute.routers.rank import RankRouter
from mixroute.routers.task import TaskRouter
from mixroute.routers.token import TokenTopKRouter

LORA_ROUTERS: dict[str, type[nn.Module]] = {
    "single": SingleRouter,
    "uniform": UniformRouter,
    "oracle": OracleRouter,
    "task": TaskRouter,
    "token_topk": TokenTopKRouter,
    "rank": RankRouter,
    "poly": PolyRouter,
}


def build_router(cfg: MixtureConfig, hidden_size: int, num_experts: int, num_modules: int) -> nn.Module:
    """The router named by ``cfg.router`` for LoRA experts (``num_modules``: LoRA modules it serves, Poly)."""
    if cfg.router not in LORA_ROUTERS:
        raise ValueError(f"router {cfg.router!r} does not route LoRA experts; valid: {', '.join(LORA_ROUTERS)}")
    cls = LORA_ROUTERS[cfg.router]
    if cls is PolyRouter:
        return cls(cfg, hidden_size, num_experts, num_modules)
    return cls(cfg, hidden_size, num_experts)


__all__ = ["Route", "build_router", "dense_route", "index_route", "masked_mean", "LORA_ROUTERS"]
