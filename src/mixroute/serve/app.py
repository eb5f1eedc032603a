"""``create_app``: the OpenAI-compatible FastAPI app over a run's mixture, the router choosing the expert.

``model`` = the run's name lets the router decide; ``model`` = an expert's name forces that expert; the
``mixroute`` request object may fix weights over experts. Every answer says what was decided: the ``routing``
field and the ``X-Mixroute-Expert`` header (streamed answers: on the first chunk and the response headers).

An expert library (docs/library.md) is served the same way; with ``allow_library_updates`` ``POST /v1/experts``
and ``DELETE /v1/experts/{name}`` change it while serving: the engine applies the change between batches, so
in-flight requests finish on the mixture they started with and later ones wait for the swap.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixroute.serve.engine import Engine, Request
from mixroute.serve.metrics import Metrics
from mixroute.serve.schema import AddExpertRequest, ChatCompletionRequest, CompletionRequest, MixrouteOptions

log = logging.getLogger("uvicorn.error")
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Limits:
    max_tokens: int = 512            # largest max_tokens a request may ask for
    default_max_tokens: int = 64     # when a chat request gives none
    max_request_bytes: int = 1 << 20


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


def load_served(run_dir: Union[str, Path], device: str = "auto") -> Served:
    """Load a run directory, or an expert library (a directory with manifest.json), for serving on ``device``
    (auto: CUDA when available, else CPU)."""
    from mixroute.routers import router_class
    from mixroute.rundir import load_run

    if (Path(run_dir) / "manifest.json").is_file():
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
                  needs_category=any(r.needs_task_ids for r in routers))


def load_library(lib_dir: Union[str, Path], device: str = "auto", router: Optional[str] = None,
                 cost_weight: float = 0.0) -> Served:
    """Load an expert library for serving, routed by ``router`` (default: the library's own)."""
    from mixroute.devices import resolve_device
    from mixroute.library import Library

    dev = resolve_device(device)
    lib = Library(lib_dir)
    if dev.type != "cpu":
        lib.model.to(dev)
    mix = lib.mixture(router, cost_weight)
    return Served(name=Path(lib_dir).resolve().name, model=lib.model, tok=lib.tok, mix=mix,
                  template=lib.man.template, categories=[], expert_names=lib.man.names(),
                  context_length=int(getattr(lib.model.config, "max_position_embeddings", 2048)),
                  can_force=all(r.level == "sequence" for r in mix.routers.values()), needs_category=False,
                  library=lib, router=router, cost_weight=cost_weight)


def create_app(run: Union[str, Path, Served], api_key: Optional[str] = None, max_batch: int = 16,
               max_wait_ms: float = 10.0, limits: Optional[Limits] = None,
               allow_library_updates: bool = False, precision: str = "no") -> FastAPI:
    """The app for a run directory or library (or an already loaded ``Served``); the engine starts with the
    app. ``allow_library_updates`` turns on ``POST /v1/experts`` and ``DELETE /v1/experts/{name}``."""
    served = run if isinstance(run, Served) else load_served(run)
    limits = limits or Limits()
    metrics = Metrics()
    engine = Engine(served.model, served.mix, served.tok, served.expert_names, max_batch=max_batch,
                    max_wait_ms=max_wait_ms, on_batch=lambda b: metrics.batched(len(b)), precision=precision)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        log.info("mixroute: serving %s with experts [%s]", served.name, ", ".join(served.expert_names))
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        log.info("mixroute: engine stopped")

    app = FastAPI(title="mixroute", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API; the mixture's router picks the expert per request.")
    app.state.served, app.state.engine, app.state.metrics = served, engine, metrics

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        # pydantic puts union members' type tags ('str', 'list[str]') in the location: not field names
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and str(x) not in _TYPE_TAGS
               and "[" not in str(x) and "-" not in str(x)]
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg', 'invalid')}" if param else str(err.get("msg", "invalid request body"))
        return JSONResponse(error_body(msg, "invalid_request_error", param, err.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("mixroute: internal error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _limit_and_log(request: HTTPRequest, call_next: Any) -> Any:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_request_bytes):
            return JSONResponse(error_body(f"request body larger than {limits.max_request_bytes} bytes",
                                           "invalid_request_error", None, "request_too_large"), status_code=413)
        response = await call_next(request)
        metrics.request(request.url.path, response.status_code)
        return response

    def auth(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                           "invalid_request_error", "invalid_api_key")

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "experts": served.expert_names}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render()

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict:
        now = int(time.time())
        ids = [served.name] + (served.expert_names if served.can_force else [])
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "mixroute"}
                                           for i in ids]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatCompletionRequest) -> Any:
        prompt = _chat_prompt(served, body)
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        return await _complete(body, prompt, max_tokens, "messages", chat=True)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest) -> Any:
        text = body.prompt
        if isinstance(text, list):
            if len(text) != 1:
                raise APIError(400, "prompt: exactly one prompt per request is supported", "prompt")
            text = text[0]
        prompt = [int(x) for x in served.tok(text, add_special_tokens=False)["input_ids"]]
        return await _complete(body, prompt, body.max_tokens or 16, "prompt", chat=False)

    async def _complete(body: Any, prompt: list[int], max_tokens: int, prompt_param: str, chat: bool) -> Any:
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens must be <= {limits.max_tokens}, got {max_tokens}", "max_tokens")
        if not prompt:
            raise APIError(400, f"{prompt_param}: the prompt is empty", prompt_param)
        if len(prompt) + max_tokens > served.context_length:
            raise APIError(400, f"{prompt_param}: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the "
                           f"model's context of {served.context_length} tokens", prompt_param,
                           code="context_length_exceeded")
        forced, task_id = _routing_request(served, body.model, body.mixroute)
        lam = body.mixroute.route_cost_weight if body.mixroute is not None else None
        if lam is not None and (served.mix is None
                                or not any(hasattr(r, "row_cost_weight") for r in served.mix.routers.values())):
            raise APIError(400, "mixroute.route_cost_weight: cost-aware routing needs an expert library served with "
                           "a sequence-level router (centroid or task)", "mixroute.route_cost_weight")
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
        req = Request(prompt_ids=prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                      stop=stop, seed=body.seed, forced=forced, task_id=task_id, cost_weight=lam,
                      forced_names=list(served.expert_names) if forced is not None else None)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        loop = asyncio.get_running_loop()
        if body.stream:
            return await _stream(req, rid, created, body, chat, loop)
        done: asyncio.Future = loop.create_future()
        req.on_done = lambda r: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(r))
        _submit(req)
        await done
        if req.error is not None:
            raise _api_error(req.error)
        _finished(req, body.user)
        choice: dict[str, Any] = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": req.text, "refusal": None}
        else:
            choice["text"] = req.text
        payload = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": body.model, "choices": [choice], "usage": _usage(req), "routing": req.routing}
        return JSONResponse(payload, headers=_route_header(req))

    async def _stream(req: Request, rid: str, created: int, body: Any, chat: bool,
                      loop: asyncio.AbstractEventLoop) -> StreamingResponse:
        pieces: asyncio.Queue = asyncio.Queue()
        req.on_text = lambda r, text, finish: loop.call_soon_threadsafe(pieces.put_nowait, (text, finish))
        req.on_done = lambda r: loop.call_soon_threadsafe(pieces.put_nowait, None)
        _submit(req)
        # the first piece comes after the prefill: then the routing is known and can go in the headers
        head = await pieces.get()
        if head is None and req.error is not None:
            raise _api_error(req.error)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            c: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": body.model,
                                 "choices": [choice]}
            if first:
                c["routing"] = req.routing
            return f"data: {json.dumps(c)}\n\n"

        async def events() -> AsyncIterator[str]:
            item, first = head, True
            while item is not None:
                text, finish = item
                if first and chat:  # the role chunk carries the routing decision
                    yield chunk(None, None, first=True)
                yield chunk(text, finish, first=first and not chat)
                first = False
                item = await pieces.get()
            if req.error is not None:
                yield f"data: {json.dumps(error_body(str(req.error), 'server_error'))}\n\n"
            else:
                _finished(req, body.user)
                if body.stream_options is not None and body.stream_options.include_usage:
                    usage = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                             "usage": _usage(req)}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=_route_header(req))

    # ------------------------------------------------------------------ library updates
    def _library() -> Any:
        if served.library is None:
            raise APIError(404, f"{served.name} is a run directory, not an expert library: nothing to add to or "
                           "remove from (serve a library: mixroute serve LIB)", None, "not_found_error")
        if not allow_library_updates:
            raise APIError(403, "library updates are off; start the server with --allow-library-updates to add "
                           "or remove experts while serving", None, "permission_error", "library_updates_disabled")
        return served.library

    async def _change(change: Any) -> Any:
        """Run ``change(lib)`` on the engine between batches; the mixture is rebuilt and swapped in whether or
        not the change went through (building a mixture detaches the one before)."""
        lib = _library()

        def apply() -> Any:
            try:
                return change(lib)
            finally:
                mix = lib.mixture(served.router, served.cost_weight)
                engine.swap(mix, lib.man.names())
                served.mix, served.expert_names = mix, lib.man.names()

        from mixroute.library import LibraryError

        try:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: engine.between_batches(apply, 600))
        except LibraryError as e:
            raise APIError(404 if "no expert" in str(e) else 400, str(e), None, "invalid_request_error",
                           "library_error") from e

    def _add(lib: Any, body: AddExpertRequest) -> Any:
        """Add, then build the served mixture with the new expert; if the served router cannot route it (a
        fitted task router, centroid without examples) the add is undone and the error says why."""
        e = lib.add(body.name, body.adapter_dir, body.examples, body.cost, body.description)
        try:
            lib.mixture(served.router, served.cost_weight)
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

    @app.get("/v1/experts", dependencies=[Depends(auth)])
    async def list_experts() -> dict:
        lib = served.library
        if lib is None:
            return {"object": "list", "data": [{"name": n} for n in served.expert_names]}
        return {"object": "list", "data": lib.rows(), "notes": lib.notes()}

    @app.post("/v1/experts", dependencies=[Depends(auth)])
    async def add_expert(body: AddExpertRequest) -> dict:
        e = await _change(lambda lib: _add(lib, body))
        log.info("mixroute: expert %s added; experts now [%s]", e.name, ", ".join(served.expert_names))
        return {"object": "expert", "name": e.name, "rank": e.rank, "cost": e.cost, "examples": e.examples,
                "experts": served.expert_names}

    @app.delete("/v1/experts/{name}", dependencies=[Depends(auth)])
    async def remove_expert(name: str) -> dict:
        await _change(lambda lib: _remove(lib, name))
        log.info("mixroute: expert %s removed; experts now [%s]", name, ", ".join(served.expert_names))
        return {"object": "expert", "name": name, "deleted": True, "experts": served.expert_names}

    def _submit(req: Request) -> None:
        try:
            engine.submit(req)
        except RuntimeError as e:
            raise APIError(503, str(e), None, "server_error", "shutting_down") from e

    def _finished(req: Request, user: Optional[str]) -> None:
        now = time.perf_counter()
        ttft = (req.t_first or now) - req.t_submit
        metrics.finished(len(req.prompt_ids), len(req.tokens), now - req.t_submit, ttft,
                         req.routing.get("experts", []))
        log.info("mixroute: %s tokens in=%d out=%d batch=%d %.0f ms%s", req.routing.get("mode"),
                 len(req.prompt_ids), len(req.tokens), req.batch_size, 1000 * (now - req.t_submit),
                 f" expert={','.join(req.routing.get('experts', [])) or '-'}" + (f" user={user}" if user else ""))

    return app


def _api_error(error: BaseException) -> BaseException:
    """An engine failure as the API answers it: an expert removed while the request waited is a 404."""
    if isinstance(error, LookupError):
        return APIError(404, str(error), "model", "invalid_request_error", "model_not_found")
    return error


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.prompt_ids) + len(req.tokens)}


def _route_header(req: Request) -> dict:
    return {"X-Mixroute-Expert": ",".join(req.routing.get("experts", [])) or "none"}


def _content(content: Union[str, list]) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")


def _chat_prompt(served: Served, body: ChatCompletionRequest) -> list[int]:
    """The run's own prompt template around the last user message; earlier messages become its context."""
    from mixroute.data.format import prompt_ids

    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise APIError(400, "messages: at least one message with role 'user' is required", "messages")
    last = users[-1]
    context = "\n".join(f"{m.role}: {_content(m.content)}" if m.role != "system" else _content(m.content)
                        for m in body.messages[:last])
    record = {"instruction": _content(body.messages[last].content), "context": context, "response": "",
              "category": served.categories[0] if served.categories else ""}
    return prompt_ids(record, served.tok, template=served.template)


def _routing_request(served: Served, model: str, opts: Optional[MixrouteOptions]) -> tuple[Optional[list[float]],
                                                                                           Optional[int]]:
    """(forced weights or None, task id or None) for a request's ``model`` and ``mixroute`` fields."""
    n = len(served.expert_names)
    forced: Optional[list[float]] = None
    if model != served.name:
        if model not in served.expert_names or not served.can_force:
            have = [served.name] + (served.expert_names if served.can_force else [])
            raise APIError(404, f"model {model!r} does not exist; available: {', '.join(have)}", "model",
                           "invalid_request_error", "model_not_found")
        forced = [1.0 if name == model else 0.0 for name in served.expert_names]
    if opts is not None and opts.weights is not None:
        if forced is not None:
            raise APIError(400, "mixroute.weights cannot be combined with an expert name as model", "mixroute.weights")
        if not served.can_force:
            raise APIError(400, "mixroute.weights: this mixture does not route per sequence, so weights cannot be "
                           "fixed", "mixroute.weights")
        w = opts.weights
        if isinstance(w, dict):
            unknown = [k for k in w if k not in served.expert_names]
            if unknown:
                raise APIError(400, f"mixroute.weights: unknown expert(s) {', '.join(unknown)}", "mixroute.weights")
            w = [float(w.get(name, 0.0)) for name in served.expert_names]
        if len(w) != n or any(not x >= 0 or x == float("inf") for x in w) or sum(w) <= 0:
            raise APIError(400, f"mixroute.weights: {n} finite weights >= 0, not all zero, are required",
                           "mixroute.weights")
        forced = [float(x) for x in w]
    task_id = None
    category = opts.category if opts is not None else None
    if category is not None:
        if category not in served.categories:
            raise APIError(400, f"mixroute.category {category!r} is not one of {', '.join(served.categories)}",
                           "mixroute.category")
        task_id = served.categories.index(category)
    if served.needs_category and task_id is None:
        if forced is None:
            raise APIError(400, "this mixture's router routes by label: pass mixroute.category (one of "
                           f"{', '.join(served.categories)})", "mixroute.category")
        task_id = 0  # the router still runs on forced rows; its decision there is replaced
    return forced, task_id
