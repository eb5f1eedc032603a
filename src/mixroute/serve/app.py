"""``create_app``: the OpenAI-compatible FastAPI app over a run's mixture, the router choosing the expert.

``model`` = the run's name lets the router decide; ``model`` = an expert's name forces that expert; the
``mixroute`` request object may fix weights over experts. Every answer says what was decided: the ``routing``
field and the ``X-Mixroute-Expert`` header (streamed answers: on the first chunk and the response headers).

An expert library (docs/library.md) is served the same way; with ``allow_library_updates`` ``POST /v1/experts``
and ``DELETE /v1/experts/{name}`` change it while serving.

The endpoints live in ``serve.routes`` (completions, experts, ops) and read one ``ServeState``; generation is
an engine's (``serve.engine.ServingEngine``): mixroute's own (``Engine``) or a vLLM server behind the router
(``serve.vllm.VLLMEngine``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI

from mixroute.serve.engine import Engine
from mixroute.serve.errors import LimitAndCount, install_handlers
from mixroute.serve.metrics import Metrics
from mixroute.serve.routes import completions, experts, ops
from mixroute.serve.served import Limits, Served, ServeState, load_served

log = logging.getLogger("uvicorn.error")


def create_app(run: Union[str, Path, Served], api_key: Optional[str] = None, max_batch: int = 16,
               max_wait_ms: float = 10.0, limits: Optional[Limits] = None,
               allow_library_updates: bool = False, precision: str = "no", engine: str = "local",
               vllm: Optional[Any] = None) -> FastAPI:
    """The app for a run directory or library (or an already loaded ``Served``); the engine starts with the
    app. ``allow_library_updates`` turns on ``POST /v1/experts`` and ``DELETE /v1/experts/{name}``.
    ``engine``: ``local`` (mixroute's own decoding loop) or ``vllm`` (the router here, generation on a vLLM
    server: ``vllm`` = ``serve.vllm.VLLMSettings``); a mixture vLLM cannot serve is refused here."""
    served = run if isinstance(run, Served) else load_served(run)
    limits = limits or Limits()
    metrics = Metrics(queued=lambda: eng.queued())
    on_batch = lambda b: metrics.batched(len(b))  # noqa: E731
    if engine == "vllm":
        from mixroute.serve.vllm import VLLMEngine

        eng: Any = VLLMEngine(served, vllm, max_batch=max_batch, max_wait_ms=max_wait_ms, on_batch=on_batch,
                              precision=precision, max_queue=limits.max_queue)
    elif engine == "local":
        eng = Engine(served.model, served.mix, served.tok, served.expert_names, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, on_batch=on_batch, precision=precision, max_queue=limits.max_queue)
    else:
        raise ValueError(f"engine={engine!r}; valid: local, vllm")

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # starting vLLM takes a while: off the event loop, before the server accepts requests
        await asyncio.get_running_loop().run_in_executor(None, eng.start)
        log.info("mixroute: serving %s with experts [%s]", served.name, ", ".join(served.expert_names))
        yield
        await asyncio.get_running_loop().run_in_executor(None, eng.stop)
        log.info("mixroute: engine stopped")

    app = FastAPI(title="mixroute", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API; the mixture's router picks the expert per request.")
    app.state.mixroute = ServeState(served, eng, metrics, limits, api_key, allow_library_updates)
    app.state.served, app.state.engine, app.state.metrics = served, eng, metrics
    install_handlers(app)
    app.add_middleware(LimitAndCount, max_request_bytes=limits.max_request_bytes, count=metrics.request)
    for group in (ops, completions, experts):
        app.include_router(group.router)
    return app
