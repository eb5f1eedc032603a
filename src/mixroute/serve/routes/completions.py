"""``POST /v1/chat/completions`` and ``POST /v1/completions``: validate, decide how the request is routed
(the router, an expert named as ``model``, or ``mixroute`` weights / category), hand it to the engine, and
answer in one body or as server-sent events. A client that goes away has its request cancelled."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, Request as HTTPRequest
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event

from mixroute.serve.engine import Overloaded, Request, Unavailable
from mixroute.serve.errors import APIError, engine_error, error_body
from mixroute.serve.schema import ChatCompletionRequest, CompletionRequest, MixrouteOptions
from mixroute.serve.served import Served, ServeState, require_key, state

log = logging.getLogger("uvicorn.error")
router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, http: HTTPRequest, st: ServeState = Depends(state)) -> Any:
    prompt = _chat_prompt(st.served, body)
    max_tokens = body.max_completion_tokens or body.max_tokens or st.limits.default_max_tokens
    return await _complete(st, body, prompt, max_tokens, "messages", True, http)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: HTTPRequest, st: ServeState = Depends(state)) -> Any:
    text = body.prompt
    if isinstance(text, list):
        if len(text) != 1:
            raise APIError(400, "prompt: exactly one prompt per request is supported", "prompt")
        text = text[0]
    prompt = [int(x) for x in st.served.tok(text, add_special_tokens=False)["input_ids"]]
    return await _complete(st, body, prompt, body.max_tokens or 16, "prompt", False, http)


async def _complete(st: ServeState, body: Any, prompt: list[int], max_tokens: int, prompt_param: str, chat: bool,
                    http: HTTPRequest) -> Any:
    served, limits = st.served, st.limits
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
                  forced_names=list(served.expert_names) if forced is not None else None,
                  ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens),
                  timeout=limits.request_timeout)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    loop = asyncio.get_running_loop()
    if body.stream:
        return await _stream(st, req, rid, created, body, chat, loop)
    done: asyncio.Future = loop.create_future()
    req.on_done = lambda r: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(r))
    _submit(st, req)
    while not done.done():   # a client that goes away cancels its request
        await asyncio.wait([done], timeout=0.25)
        if not done.done() and await http.is_disconnected():
            st.engine.cancel(req)
            st.metrics.cancelled.inc()
            await done
    if req.error is not None:
        raise engine_error(req.error)
    _finished(st, req, body.user)
    choice: dict[str, Any] = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": req.text, "refusal": None}
    else:
        choice["text"] = req.text
    payload = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": body.model, "choices": [choice], "usage": _usage(req), "routing": req.routing}
    return JSONResponse(payload, headers=_route_header(req))


async def _stream(st: ServeState, req: Request, rid: str, created: int, body: Any, chat: bool,
                  loop: asyncio.AbstractEventLoop) -> EventSourceResponse:
    pieces: asyncio.Queue = asyncio.Queue()
    req.on_text = lambda r, text, finish: loop.call_soon_threadsafe(pieces.put_nowait, (text, finish))
    req.on_done = lambda r: loop.call_soon_threadsafe(pieces.put_nowait, None)
    _submit(st, req)
    # the first piece comes after the prefill: then the routing is known and can go in the headers
    head = await pieces.get()
    if head is None and req.error is not None:
        raise engine_error(req.error)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(data: dict) -> bytes:
        return format_sse_event(data_str=json.dumps(data))

    def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        c: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]}
        if first:
            c["routing"] = req.routing
        return event(c)

    async def events() -> AsyncIterator[bytes]:
        item, first = head, True
        try:
            while item is not None:
                text, finish = item
                if first and chat:  # the role chunk carries the routing decision
                    yield chunk(None, None, first=True)
                yield chunk(text, finish, first=first and not chat)
                first = False
                item = await pieces.get()
        finally:   # the client went away mid-stream (the generator is closed): stop generating for it
            if not req.done.is_set():
                st.engine.cancel(req)
                st.metrics.cancelled.inc()
        if req.error is not None:
            yield event(error_body(str(req.error), "server_error"))
        else:
            _finished(st, req, body.user)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield event({"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                             "usage": _usage(req)})
        yield format_sse_event(data_str="[DONE]")

    return EventSourceResponse(events(), headers=_route_header(req))


def _submit(st: ServeState, req: Request) -> None:
    try:
        st.engine.submit(req)
    except Overloaded as e:
        raise APIError(429, f"the server is overloaded: {e}; retry after a second", None,
                       "rate_limit_error", "overloaded", headers={"Retry-After": "1"}) from e
    except Unavailable as e:
        raise APIError(503, str(e), None, "server_error", "unavailable", headers={"Retry-After": "5"}) from e


def _finished(st: ServeState, req: Request, user: Optional[str]) -> None:
    now = time.perf_counter()
    ttft = (req.t_first or now) - req.t_submit
    st.metrics.finished(len(req.prompt_ids), req.n_completion(), now - req.t_submit, ttft,
                        req.routing.get("experts", []), req.routing.get("router_latency_ms", 0.0) / 1000)
    log.info("mixroute: %s tokens in=%d out=%d batch=%d %.0f ms%s", req.routing.get("mode"),
             len(req.prompt_ids), req.n_completion(), req.batch_size, 1000 * (now - req.t_submit),
             f" expert={','.join(req.routing.get('experts', [])) or '-'}" + (f" user={user}" if user else ""))


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": req.n_completion(),
            "total_tokens": len(req.prompt_ids) + req.n_completion()}


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
