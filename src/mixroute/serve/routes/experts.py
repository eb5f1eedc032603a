"""``GET /v1/experts``, and for a served expert library with updates allowed ``POST /v1/experts`` and
``DELETE /v1/experts/{name}``: the engine applies a change between batches, so in-flight requests finish on
the mixture they started with and later ones wait for the swap."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends

from mixroute.serve.errors import APIError
from mixroute.serve.schema import AddExpertRequest
from mixroute.serve.served import ServeState, require_key, state

log = logging.getLogger("uvicorn.error")
router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/v1/experts")
async def list_experts(st: ServeState = Depends(state)) -> dict:
    lib = st.served.library
    if lib is None:
        return {"object": "list", "data": [{"name": n} for n in st.served.expert_names]}
    return {"object": "list", "data": lib.rows(), "notes": lib.notes()}


@router.post("/v1/experts")
async def add_expert(body: AddExpertRequest, st: ServeState = Depends(state)) -> dict:
    e = await _change(st, lambda lib: _add(st, lib, body))
    log.info("mixroute: expert %s added; experts now [%s]", e.name, ", ".join(st.served.expert_names))
    return {"object": "expert", "name": e.name, "rank": e.rank, "cost": e.cost, "examples": e.examples,
            "experts": st.served.expert_names}


@router.delete("/v1/experts/{name}")
async def remove_expert(name: str, st: ServeState = Depends(state)) -> dict:
    await _change(st, lambda lib: _remove(lib, name))
    log.info("mixroute: expert %s removed; experts now [%s]", name, ", ".join(st.served.expert_names))
    return {"object": "expert", "name": name, "deleted": True, "experts": st.served.expert_names}


def _library(st: ServeState) -> Any:
    served = st.served
    if served.library is None:
        raise APIError(404, f"{served.name} is a run directory, not an expert library: nothing to add to or "
                       "remove from (serve a library: mixroute serve LIB)", None, "not_found_error")
    if not st.allow_library_updates:
        raise APIError(403, "library updates are off; start the server with --allow-library-updates to add "
                       "or remove experts while serving", None, "permission_error", "library_updates_disabled")
    return served.library


async def _change(st: ServeState, change: Any) -> Any:
    """Run ``change(lib)`` on the engine between batches; the mixture is rebuilt and swapped in whether or
    not the change went through (building a mixture detaches the one before)."""
    lib = _library(st)
    served = st.served

    def apply() -> Any:
        try:
            return change(lib)
        finally:
            mix = lib.mixture(served.router, served.cost_weight, served.scope)
            st.engine.swap(mix, lib.man.names())
            served.mix, served.expert_names = mix, lib.man.names()

    from mixroute.library import LibraryError

    try:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: st.engine.between_batches(apply, 600))
    except LibraryError as e:
        raise APIError(404 if "no expert" in str(e) else 400, str(e), None, "invalid_request_error",
                       "library_error") from e


def _add(st: ServeState, lib: Any, body: AddExpertRequest) -> Any:
    """Add, then build the served mixture with the new expert; if the served router cannot route it (a
    fitted task router, centroid without examples) or the engine cannot serve it (vLLM: a DoRA expert, a rank
    above its --max-lora-rank) the add is undone and the error says why."""
    e = lib.add(body.name, body.adapter_dir, body.examples, body.cost, body.description)
    try:
        mix = lib.mixture(st.served.router, st.served.cost_weight, st.served.scope)
        st.engine.check_mixture(mix)
    except Exception:
        lib.remove(e.name)
        raise
    return e


def _remove(lib: Any, name: str) -> None:
    lib.man.get(name)   # an unknown name: 404 before anything changes
    if len(lib.man.experts) == 1:
        from mixroute.library import LibraryError

        raise LibraryError(f"{name!r} is the library's last expert; a served library needs at least one")
    lib.remove(name)
