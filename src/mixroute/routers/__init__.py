"""Routers: small modules ``forward(hidden, mask, task_ids) -> RouteWeights`` (see ``routers.base``).

``ROUTERS`` is the registry: adding a router is one file here (its class, with its ``Config`` settings) plus
one line below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mixroute.config import ConfigError, MixtureConfig
from mixroute.routers.arrow import ArrowRouter
from mixroute.routers.base import Router, RouterDims, RouteWeights, masked_mean
from mixroute.routers.centroid import CentroidRouter
from mixroute.routers.fixed import OracleRouter, SingleRouter, UniformRouter
from mixroute.routers.gate import GateRouter
from mixroute.routers.poly import PolyRouter
from mixroute.routers.rank import RankRouter
from mixroute.routers.task import TaskRouter
from mixroute.routers.token import TokenTopKRouter

ROUTERS: dict[str, type[Router]] = {cls.name: cls for cls in (
    SingleRouter,
    UniformRouter,
    OracleRouter,
    TaskRouter,
    TokenTopKRouter,
    PolyRouter,
    RankRouter,
    GateRouter,
    CentroidRouter,
    ArrowRouter,
)}


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; an unknown name lists the valid ones."""
    if name not in ROUTERS:
        raise ConfigError(f"mixture.router: {name!r} is not valid; expected one of {', '.join(ROUTERS)}")
    return ROUTERS[name]


def router_settings(cfg: MixtureConfig) -> Any:
    """The settings of ``cfg``'s router (``mixture.routers.<name>``, typed as its ``Config``, defaults filled)."""
    return router_class(cfg.router).settings(cfg)


def update_router_settings(cfg: MixtureConfig, **changes: Any) -> None:
    """Set ``changes`` in ``cfg``'s router's settings (in place; the other routers' entries are kept)."""
    cls = router_class(cfg.router)
    cfg.routers = {**(cfg.routers or {}), cls.name: dataclasses.replace(cls.settings(cfg), **changes)}


def build_router(cfg: MixtureConfig, dims: RouterDims) -> Router:
    """The router ``cfg.router`` names, built for ``dims`` (validate the config first)."""
    return router_class(cfg.router)(cfg, dims)


__all__ = ["ROUTERS", "Router", "RouterDims", "RouteWeights", "build_router", "masked_mean", "router_class",
           "router_settings", "update_router_settings"]
