"""What a server serves and how: ``Served`` (a loaded run or expert library), ``Limits``, and ``ServeState``,
the one object the endpoint groups (``serve.routes``) read from ``app.state``; the bearer-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import Depends, Request as HTTPRequest
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mixroute.library.manifest import MANIFEST
from mixroute.serve.errors import APIError


@dataclass
class Limits:
    max_tokens: int = 512            # largest max_tokens a request may ask for
    default_max_tokens: int = 64     # when a chat request gives none
    max_request_bytes: int = 1 << 20
    max_queue: int = 256             # requests waiting for the engine; more are answered 429
    request_timeout: Optional[float] = 600.0   # seconds a request may take in all (None: no limit)


@dataclass
class Served:
    """What the app serves: a loaded run and its names."""

    name: str
    model: Any
    tok: Any
    mix: Any
    template: str
    categories: list[str]
    expert_names: list[str]
    context_length: int
    can_force: bool          # sequence-level routing: an expert can be forced per request
    needs_category: bool     # the router routes by label (oracle, poly)
    library: Any = None      # the served expert library (None: a run directory)
    router: Optional[str] = None    # the library's router as served (None: its default)
    cost_weight: float = 0.0        # the library's default lambda of cost-aware routing
    scope: str = "layer"            # the library's routing: per layer, or global (one decision per request)
    model_path: Optional[str] = None   # the base model as ``model.name`` gives it (None: the embedded model)


def load_served(run_dir: Union[str, Path], device: str = "auto") -> Served:
    """Load a run directory, or an expert library (a directory with manifest.json), for serving on ``device``
    (auto: CUDA when available, else CPU)."""
    from mixroute.routers import router_class
    from mixroute.rundir import load_run

    if (Path(run_dir) / MANIFEST).is_file():
        return load_library(run_dir, device=device)

    run = load_run(run_dir, device)
    mix, cats = run.mix, list(run.data.categories)
    routers = list(mix.routers.values()) if mix is not None else []
    n = router_class(mix.cfg.router).experts_for(mix.cfg) if mix is not None else 0
    aligned = any(r.label_aligned for r in routers)
    names = [cats[i] if aligned and i < len(cats) else f"expert-{i}" for i in range(n)]
    return Served(name=Path(run_dir).resolve().name, model=run.model, tok=run.tok, mix=mix,
                  template=run.cfg.data.template, categories=cats, expert_names=names,
                  context_length=int(getattr(run.model.config, "max_position_embeddings", 2048)),
                  can_force=bool(routers) and all(r.level == "sequence" for r in routers),
                  needs_category=any(r.needs_task_ids for r in routers), model_path=run.cfg.model.name)


def load_library(lib_dir: Union[str, Path], device: str = "auto", router: Optional[str] = None,
                 cost_weight: float = 0.0, scope: str = "layer") -> Served:
    """Load an expert library for serving, routed by ``router`` (default: the library's own) per layer or, with
    ``scope='global'``, once per request from the frozen base (``Library.mixture``)."""
    from mixroute.devices import resolve_device
    from mixroute.library import Library

    dev = resolve_device(device)
    lib = Library(lib_dir)
    if dev.type != "cpu":
        lib.model.to(dev)
    mix = lib.mixture(router, cost_weight, scope)
    return Served(name=Path(lib_dir).resolve().name, model=lib.model, tok=lib.tok, mix=mix,
                  template=lib.man.template, categories=[], expert_names=lib.man.names(),
                  context_length=int(getattr(lib.model.config, "max_position_embeddings", 2048)),
                  can_force=all(r.level == "sequence" for r in mix.routers.values()), needs_category=False,
                  library=lib, router=router, cost_weight=cost_weight, scope=scope,
                  model_path=lib.man.base.get("model"))


@dataclass
class ServeState:
    """Everything an endpoint needs, kept on ``app.state.mixroute`` by ``create_app``."""

    served: Served
    engine: Any          # a serve.engine.ServingEngine: the local Engine or the vLLM client
    metrics: Any         # serve.metrics.Metrics
    limits: Limits
    api_key: Optional[str] = None
    allow_library_updates: bool = False


def state(request: HTTPRequest) -> ServeState:
    return request.app.state.mixroute


_bearer = HTTPBearer(auto_error=False)   # a missing header is our 401 in the OpenAI shape, not FastAPI's 403


def require_key(creds: Optional[HTTPAuthorizationCredentials] = Depends(_bearer),
                st: ServeState = Depends(state)) -> None:
    """``Authorization: Bearer KEY`` when the server has a key (compared in constant time)."""
    if st.api_key is None:
        return
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), st.api_key.encode()):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                       "invalid_request_error", "invalid_api_key")
