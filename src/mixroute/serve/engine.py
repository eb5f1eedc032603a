"""The batching engine: one worker thread owns the model and decodes a running batch of mixed-expert rows.

Requests wait in a queue. When nothing runs, the worker takes what arrives within ``max_wait_ms`` (at most
``max_batch``) and prefills it as one left-padded batch, each row routed by the router or forced to the
expert its request named (``Mixture.force`` with NaN rows left to the router). It then decodes the batch with
the KV cache, one step at a time, stopping each row on its own (EOS, stop strings, ``max_tokens``). Between
two steps, requests that arrived meanwhile are prefilled as a group (their own routing decisions) and join:
ids, attention masks and KV caches are left-padded to one length and concatenated, and the kept per-row
routes (``RoutingContext.kept``) are concatenated the same way (continuous batching). Finished rows leave the
batch at once.

Greedy output does not depend on the batch: every row has its own left padding, attention mask and position
ids, and sampling draws from a per-request generator seeded by the request.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mixroute.devices import autocast, check_precision
from mixroute.routers.base import RouteWeights, expert_mass

TokenCallback = Callable[["Request", str, Optional[str]], None]  # (request, new text, finish reason or None)


@dataclass
class Request:
    """One generation: prompt token ids, sampling settings and how it is routed."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    forced: Optional[list[float]] = None      # weights over experts (one-hot = override); None = the router
    forced_names: Optional[list[str]] = None  # the expert names ``forced`` is ordered by (a library may change)
    cost_weight: Optional[float] = None       # lambda of cost-aware routing for this request (None = default)
    task_id: Optional[int] = None             # for routers that route by label (oracle, poly)
    ignore_eos: bool = False                  # vLLM's extension: go on past EOS (equal-length benchmarks)
    min_tokens: int = 0                       # vLLM's extension: EOS cannot end the answer before this many
    timeout: Optional[float] = None           # seconds from submit after which the request fails
    on_text: Optional[TokenCallback] = None   # streaming: called from the worker thread
    on_done: Optional[Callable[["Request"], None]] = None  # called from the worker thread when done or failed
    # filled by the engine
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    routing: dict[str, Any] = field(default_factory=dict)
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: Optional[float] = None
    batch_size: int = 0
    completion_tokens: Optional[int] = None   # when not len(tokens): a generated EOS counts (as in vLLM)
    cancelled: bool = False                   # set by ``cancel``: the client went away
    _sent: int = 0   # characters already handed to on_text
    _decoder: Any = None   # incremental detokeniser state

    def n_completion(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.tokens)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.t_submit > self.timeout


class Overloaded(RuntimeError):
    """The engine's queue is full: the request is refused at once (HTTP 429 with Retry-After)."""


class Unavailable(RuntimeError):
    """The engine cannot serve right now (shutting down, or its vLLM process died): HTTP 503."""


class RequestTimeout(TimeoutError):
    """A request ran past its ``timeout``."""


class Admission:
    """Counts the requests submitted and not yet taken by the engine; refuses one more than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.waiting = max(1, limit), 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.waiting >= self.limit:
                raise Overloaded(f"{self.waiting} requests are already waiting (max_queue={self.limit})")
            self.waiting += 1

    def leave(self, n: int) -> None:
        with self._lock:
            self.waiting -= n


def left_padded(reqs: list[Request], pad: int, device: Any) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) of the requests' prompts, left-padded to one length: each row's positions are
    its own (``attn.cumsum(-1) - 1``), so a row's output does not depend on the batch."""
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.full((len(reqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        attn[i, width - len(r.prompt_ids):] = 1
    return ids.to(device), attn.to(device)


class ServingEngine(Protocol):
    """What the app needs from an engine: the local one (``Engine``) and the vLLM client (``serve.vllm``)."""

    expert_names: list[str]

    def start(self) -> "ServingEngine": ...
    def stop(self, timeout: float = 30.0) -> None: ...
    def submit(self, req: Request) -> Request: ...
    def cancel(self, req: Request) -> None: ...
    def between_batches(self, change: Callable[[], Any], timeout: Optional[float] = None) -> Any: ...
    def check_mixture(self, mix: Any) -> None: ...
    def swap(self, mix: Any, expert_names: list[str]) -> None: ...
    def queued(self) -> int: ...
    def describe(self) -> dict[str, Any]: ...


class Engine:
    """Owns ``model`` (+ ``mix``) on one worker thread; ``submit`` is safe from any thread."""

    def __init__(self, model: Any, mix: Any, tok: Any, expert_names: list[str], max_batch: int = 16,
                 max_wait_ms: float = 10.0, on_batch: Optional[Callable[[list[Request]], None]] = None,
                 precision: str = "no", max_queue: int = 256) -> None:
        self.model, self.mix, self.tok = model, mix, tok
        self.precision = check_precision(precision)   # autocast of every forward (devices.autocast)
        self.expert_names = expert_names
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.on_batch = on_batch
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        self.device = next(model.parameters()).device
        self._queue: "queue.Queue[Optional[Request]]" = queue.Queue()
        self._admission = Admission(max_queue)   # requests waiting for a batch; more are refused (Overloaded)
        self._thread = threading.Thread(target=self._loop, name="mixroute-engine", daemon=True)
        self._stopping = False
        self._router_s = 0.0   # host time spent inside the routers during the current prefill
        self._hooks: list = []
        self._control: Optional[Control] = None   # a change waiting for the running batch to finish
        self._watch_routers()

    def _watch_routers(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.mix is not None:
            for router in self.mix.routers.values():
                self._hooks += [router.register_forward_pre_hook(self._router_start),
                                router.register_forward_hook(self._router_end)]

    def _router_start(self, *_: Any) -> None:
        self._t_router = time.perf_counter()

    def _router_end(self, *_: Any) -> None:
        self._router_s += time.perf_counter() - self._t_router

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the worker."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
        for h in self._hooks:
            h.remove()

    def submit(self, req: Request) -> Request:
        if self._stopping:
            raise Unavailable("the server is shutting down")
        self._admission.enter()
        self._queue.put(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop working on ``req`` (its client went away): it leaves the batch at the next step boundary."""
        req.cancelled = True

    def queued(self) -> int:
        """Requests submitted and not yet in a batch."""
        return self._admission.waiting

    def describe(self) -> dict[str, Any]:
        """What ``/health`` says about the engine."""
        return {"kind": "local", "max_batch": self.max_batch, "queued": self._admission.waiting}

    def between_batches(self, change: Callable[[], Any], timeout: Optional[float] = None) -> Any:
        """Run ``change()`` on the worker once the running batch has finished, and return its result. Requests
        that arrive meanwhile wait in the queue, so every in-flight request ends on the mixture it started
        with; ``change`` may swap the mixture (``swap``)."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        return Control.run_on(self._queue, change, timeout)

    def check_mixture(self, mix: Any) -> None:
        """Whether ``mix`` can be swapped in (raises ValueError if not): the local engine serves every mixture."""

    def swap(self, mix: Any, expert_names: list[str]) -> None:
        """Serve ``mix`` from now on (call from ``between_batches``: the worker is idle then)."""
        self.mix, self.expert_names = mix, list(expert_names)
        self._watch_routers()

    def generate(self, req: Request, timeout: Optional[float] = None) -> Request:
        """Submit and wait (for Python callers and tests)."""
        self.submit(req).done.wait(timeout)
        if req.error is not None:
            raise req.error
        return req

    # ------------------------------------------------------------------ worker
    def _collect(self, batch: list[Request], limit: int, wait: bool) -> tuple[list[Request], bool]:
        """Take up to ``limit`` more queued requests: waiting up to max_wait when nothing runs, else only what
        is already there (a running batch must not stall). Returns them and whether stop() was called."""
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < limit:
            try:
                nxt = (self._queue.get(timeout=max(0.0, deadline - time.perf_counter())) if wait
                       else self._queue.get_nowait())
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            if isinstance(nxt, Control):   # later requests wait until the change has run
                self._control = nxt
                break
            batch.append(nxt)
        return batch, False

    def _loop(self) -> None:
        run: Optional[_Running] = None
        stopping = False
        while True:
            if run is None and self._control is not None:
                self._control.run()
                self._control = None
            if run is None:
                if stopping:
                    return
                first = self._queue.get()
                if first is None:
                    return
                if isinstance(first, Control):
                    first.run()
                    continue
                new, stopping = self._collect([first], self.max_batch, wait=True)
            elif not stopping and self._control is None:
                new, stopping = self._collect([], self.max_batch - len(run.reqs), wait=False)
            else:
                new = []
            new = self._admit(new)
            if new:  # new requests prefill with their own routing and join at this step boundary
                try:
                    group = self._prefill(new)
                    run = group if run is None else _merge(run, group)
                    for r in run.reqs:
                        r.batch_size = max(r.batch_size, len(run.reqs))
                    if self.on_batch is not None:
                        self.on_batch(list(run.reqs))
                    run = self._compact(run)
                except Exception as e:  # a failing request fails alone: the worker and the running batch live
                    _fail(new, e)
                    if run is not None and any(r.done.is_set() for r in run.reqs):  # failed after the merge
                        _fail(run.reqs, e)
                        run = None
            if run is not None:
                try:
                    self._step(run)
                    run = self._compact(run)
                except Exception as e:
                    _fail(run.reqs, e)
                    run = None

    def _admit(self, reqs: list[Request]) -> list[Request]:
        """Re-order forced weights to the current experts (a library may have changed since the request was
        checked); a request whose forced experts are all gone fails alone with a LookupError."""
        ok = []
        self._admission.leave(len(reqs))
        now = time.perf_counter()
        for r in reqs:
            if r.cancelled or r.expired(now):
                finish(r, ended_error(r))
                continue
            if r.forced is not None and r.forced_names is not None and r.forced_names != self.expert_names:
                w = dict(zip(r.forced_names, r.forced))
                r.forced = [float(w.get(n, 0.0)) for n in self.expert_names]
                r.forced_names = list(self.expert_names)
                if sum(r.forced) <= 0:
                    _fail([r], LookupError("the expert(s) this request named were removed from the library; "
                                           f"available: {', '.join(self.expert_names)}"))
                    continue
            ok.append(r)
        return ok

    def _prefill(self, reqs: list[Request]) -> "_Running":
        """One left-padded forward over new requests; samples their first token."""
        n = len(reqs)
        ids, attn = left_padded(reqs, self.pad, self.device)
        self._router_s = 0.0
        with torch.no_grad(), autocast(self.device, self.precision), self._routing(reqs):
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp_min(0),
                             use_cache=True)
            self._record_routing(reqs, self._router_s, attn)
        kept = dict(self.mix.context.kept) if self.mix is not None else {}
        group = _Running(reqs, [_generator(r.seed) for r in reqs], ids, attn, out.past_key_values, kept, [True] * n)
        self._sample(group, out.logits[:, -1].float())
        return group

    def _step(self, run: "_Running") -> None:
        """One decode step of the running batch: each row reuses the routing its prefill decided."""
        if self.mix is not None:
            self.mix.context.kept = run.kept
        pos = (run.attn.cumsum(-1) - 1)[:, -1:]
        with torch.no_grad(), autocast(self.device, self.precision):
            out = self.model(input_ids=run.ids[:, -1:], attention_mask=run.attn, position_ids=pos,
                             past_key_values=run.cache, use_cache=True)
        run.cache = out.past_key_values
        self._sample(run, out.logits[:, -1].float())

    def _sample(self, run: "_Running", logits: Tensor) -> None:
        nxt = torch.full((len(run.reqs),), self.pad, dtype=torch.long)
        early = [i for i, r in enumerate(run.reqs) if len(r.tokens) < r.min_tokens]
        if early and self.eos is not None:   # as vLLM: EOS cannot be sampled before min_tokens
            logits[early, self.eos] = float("-inf")
        greedy = logits.argmax(-1).tolist()   # one device sync for every greedy row
        now = time.perf_counter()
        for i, r in enumerate(run.reqs):
            if run.live[i] and (r.cancelled or r.expired(now)):
                r.error, run.live[i] = ended_error(r), False
            if run.live[i]:
                nxt[i] = greedy[i] if r.temperature <= 0 else _pick(logits[i], r.temperature, r.top_p, run.gens[i])
                run.live[i] = self._advance(r, int(nxt[i]))
        run.ids = torch.cat([run.ids, nxt[:, None].to(self.device)], dim=-1)
        run.attn = torch.cat([run.attn, torch.ones_like(run.attn[:, :1])], dim=-1)

    def _compact(self, run: "_Running") -> Optional["_Running"]:
        """Finish the rows that stopped and drop them (and columns no row attends any more) from the batch."""
        for r, live in zip(run.reqs, run.live):
            if not live:
                finish(r)
        keep = [i for i, live in enumerate(run.live) if live]
        if not keep:
            return None
        if len(keep) < len(run.reqs):
            idx = torch.tensor(keep, device=self.device)
            run.ids, run.attn = run.ids[idx], run.attn[idx]
            run.cache.batch_select_indices(idx)
            run.kept = {k: v.select(idx) for k, v in run.kept.items()}
            run.reqs, run.gens = [run.reqs[i] for i in keep], [run.gens[i] for i in keep]
            run.live = [True] * len(keep)
        lead = int(run.attn.any(0).long().argmax())   # leading columns that are padding in every row
        if lead > 0:
            run.ids, run.attn = run.ids[:, lead:], run.attn[:, lead:]
            for layer in run.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        return run

    def _advance(self, r: Request, token: int) -> bool:
        """Add ``token`` to ``r``; returns whether it goes on."""
        if r.t_first is None:
            r.t_first = time.perf_counter()
        if token == self.eos and not r.ignore_eos:
            r.finish_reason, r.completion_tokens = "stop", len(r.tokens) + 1
            self._emit(r, final=True)
            return False
        r.tokens.append(token)
        before = len(r.text)
        r.text += self._detokenise(r, token)
        for s in r.stop:   # only where the new text can complete a stop string
            if (at := r.text.find(s, max(0, before - len(s) + 1))) >= 0:
                r.text, r.finish_reason = r.text[:at], "stop"
                self._emit(r, final=True)
                return False
        if len(r.tokens) >= r.max_tokens:
            r.finish_reason = "length"
            self._emit(r, final=True)
            return False
        self._emit(r, final=False)
        return True

    def _detokenise(self, r: Request, token: int) -> str:
        """The text ``token`` adds to ``r``: tokenizers' incremental decoder, so a long answer costs linear time
        (it holds back a split multi-byte character until it is complete); re-decoding all tokens otherwise."""
        fast = getattr(self.tok, "_tokenizer", None)
        if fast is None:
            text = self.tok.decode(r.tokens, skip_special_tokens=True)
            return text[len(r.text):]
        if r._decoder is None:
            from tokenizers.decoders import DecodeStream

            r._decoder = DecodeStream(skip_special_tokens=True)
        return r._decoder.step(fast, token) or ""

    def _emit(self, r: Request, final: bool) -> None:
        """Hand new text to a streaming request; hold back what may still become a stop string or a split
        multi-byte character, so the streamed pieces always add up to the final text."""
        if r.on_text is None:
            return
        end = len(r.text)
        if not final:
            hold = max((len(s) - 1 for s in r.stop), default=0)
            end = max(r._sent, end - hold)
            while end > r._sent and r.text[end - 1] == "\ufffd":
                end -= 1
        piece, r._sent = r.text[r._sent:end], max(r._sent, end)
        if piece or final:
            r.on_text(r, piece, r.finish_reason if final else None)

    # ------------------------------------------------------------------ routing
    def _routing(self, batch: list[Request]) -> Any:
        return routing_inputs(self.mix, self.expert_names, batch, self.device)

    def _record_routing(self, batch: list[Request], seconds: float, attn: Tensor) -> None:
        record_routing(self.mix, self.expert_names, batch, seconds, attn)


@contextlib.contextmanager
def routing_inputs(mix: Any, expert_names: list[str], batch: list[Request], device: Any) -> Iterator[None]:
    """For one prefill of ``batch``: force the rows whose request fixed its weights (NaN rows are left to the
    router), give cost-aware routers each row's lambda and the routers the task ids of label-routed requests.
    Every engine routes through this, so a prompt gets the same decision whichever engine serves it."""
    if mix is None:
        yield
        return
    nan_row = [float("nan")] * len(expert_names)
    any_forced = any(r.forced is not None for r in batch)
    labels = [r.task_id for r in batch]
    task_ids = None if all(t is None for t in labels) else torch.tensor([t or 0 for t in labels], device=device)
    if any_forced:
        mix.force(torch.tensor([r.forced if r.forced is not None else nan_row for r in batch]))
    lam = torch.tensor([float("nan") if r.cost_weight is None else r.cost_weight for r in batch])
    cost_aware = [r for r in mix.routers.values() if hasattr(r, "row_cost_weight")]
    for router in cost_aware:
        router.row_cost_weight = lam
    try:
        with mix.context.inputs(task_ids, None):
            yield
    finally:
        if any_forced:
            mix.force(None)
        for router in cost_aware:
            router.row_cost_weight = None


def record_routing(mix: Any, expert_names: list[str], batch: list[Request], seconds: float, attn: Tensor) -> None:
    """Each request's ``routing`` as the prefill decided it (mean gate per expert for token-level routers)."""
    if mix is None:
        for r in batch:
            r.routing = {"mode": "none", "experts": [], "probabilities": {}, "router_latency_ms": 0.0}
        return
    probs = expert_mass(mix.context.routing, len(expert_names), attn.bool())
    ms = round(1000 * seconds, 3)   # the routers run once for the whole batch
    for i, r in enumerate(batch):
        p = probs[i] if probs is not None else None
        pd = {} if p is None else {name: round(float(p[j]), 6) for j, name in enumerate(expert_names)}
        if r.forced is not None:
            chosen = [expert_names[j] for j, w in enumerate(r.forced) if w > 0]
        elif p is not None:
            chosen = [expert_names[int(p.argmax())]]
        else:
            chosen = []
        r.routing = {"mode": "override" if r.forced is not None else "auto", "experts": chosen,
                     "probabilities": pd, "router_latency_ms": ms}


@dataclass
class _Running:
    """The batch being decoded: rows in request order; the KV cache holds every column of ``ids`` but the last
    (the token sampled last, fed at the next step)."""

    reqs: list[Request]
    gens: list[torch.Generator]
    ids: Tensor
    attn: Tensor
    cache: Any
    kept: dict[str, RouteWeights]   # router key -> the prefill's decision per row, reused by decode steps
    live: list[bool]


def _merge(a: _Running, b: _Running) -> _Running:
    """Rows of ``b`` appended to ``a``: the shorter side is left-padded (ids, mask, KV cache) to one length."""
    la, lb = a.ids.shape[1], b.ids.shape[1]
    width = max(la, lb)

    def pad(run: _Running, extra: int) -> None:
        if extra == 0:
            return
        run.ids = F.pad(run.ids, (extra, 0), value=0)
        run.attn = F.pad(run.attn, (extra, 0), value=0)
        for layer in run.cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))

    pad(a, width - la)
    pad(b, width - lb)
    for la_, lb_ in zip(a.cache.layers, b.cache.layers):
        la_.keys, la_.values = torch.cat([la_.keys, lb_.keys]), torch.cat([la_.values, lb_.values])
    kept = {}
    for key, ra in a.kept.items():
        rb = b.kept[key]
        both = lambda x, y: None if x is None or y is None else torch.cat([x, y.to(x.dtype)])  # noqa: E731
        kept[key] = RouteWeights(weights=torch.cat([ra.weights, rb.weights.to(ra.weights.dtype)]), level=ra.level,
                                 index=both(ra.index, rb.index), logits=both(ra.logits, rb.logits))
    return _Running(a.reqs + b.reqs, a.gens + b.gens, torch.cat([a.ids, b.ids]), torch.cat([a.attn, b.attn]),
                    a.cache, kept, a.live + b.live)


class Control:
    """A change to run on the worker between batches (``Engine.between_batches``)."""

    def __init__(self, change: Callable[[], Any]) -> None:
        self.change, self.result, self.error = change, None, None
        self.done = threading.Event()

    @classmethod
    def run_on(cls, q: "queue.Queue[Any]", change: Callable[[], Any], timeout: Optional[float]) -> Any:
        """Queue ``change`` for a worker reading ``q``; wait for it and return its result (or raise its error)."""
        ctl = cls(change)
        q.put(ctl)
        if not ctl.done.wait(timeout):
            raise TimeoutError("the change did not run in time")
        if ctl.error is not None:
            raise ctl.error
        return ctl.result

    def run(self) -> None:
        try:
            self.result = self.change()
        except Exception as e:  # handed to the caller; the worker keeps serving
            self.error = e
        self.done.set()


def ended_error(r: Request) -> BaseException:
    """Why a request the engine stopped early ended: its client went away, or its timeout passed."""
    if r.cancelled:
        return Unavailable("the request was cancelled: its client disconnected")
    return RequestTimeout(f"the request ran past its timeout of {r.timeout:g} s")


def finish(r: Request, error: Optional[BaseException] = None) -> None:
    """End ``r`` once (with ``error`` unless it already has one) and tell its caller."""
    if r.done.is_set():
        return
    if error is not None and r.error is None:
        r.error = error
    r.done.set()
    if r.on_done is not None:
        r.on_done(r)


def _fail(reqs: list[Request], error: BaseException) -> None:
    for r in reqs:
        finish(r, error)


def _generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed % 2**63 if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))  # any int
    return g


def _pick(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling with the request's own generator."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / max(temperature, 1e-4), dim=-1)   # a tiny temperature stays finite
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
