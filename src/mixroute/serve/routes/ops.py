"""``GET /health`` (the engine's state too), ``GET /metrics`` (Prometheus) and ``GET /v1/models``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from mixroute.serve.served import ServeState, require_key, state

router = APIRouter()


@router.get("/health")
async def health(st: ServeState = Depends(state)) -> dict:
    return {"status": "ok", "model": st.served.name, "experts": st.served.expert_names,
            "engine": st.engine.describe()}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(st: ServeState = Depends(state)) -> str:
    return st.metrics.render()


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(st: ServeState = Depends(state)) -> dict:
    served, now = st.served, int(time.time())
    ids = [served.name] + (served.expert_names if served.can_force else [])
    return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "mixroute"}
                                       for i in ids]}
