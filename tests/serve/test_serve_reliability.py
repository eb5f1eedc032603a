"""The local engine under pressure, through a real HTTP server on 127.0.0.1: a full queue answers 429 with
Retry-After, a request past its timeout ends with 504, a client that disconnects (streaming or not) has its
request cancelled, and ``ignore_eos`` / ``min_tokens`` give answers of the asked length. The worker is held
busy by a change run between batches (``Engine.between_batches``), so the tests wait on states, not sleeps."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest

from mixroute.serve import Limits, create_app, load_served

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

KEY = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def wait_until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tiny_run):
    return load_served(tiny_run)


def body(served, **kw):
    return {"model": served.name, "prompt": "Sort: 3 1 2", "max_tokens": 4, "temperature": 0, **kw}


@contextlib.contextmanager
def worker_held(app):
    """Hold the engine's worker inside a change until the block exits."""
    release, entered = threading.Event(), threading.Event()

    def hold():
        entered.set()
        release.wait(120)

    t = threading.Thread(target=lambda: app.state.engine.between_batches(hold, 180), daemon=True)
    t.start()
    entered.wait(60)
    try:
        yield
    finally:
        release.set()
        t.join(60)


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_request_still_finishes(served):
    app = create_app(served, limits=Limits(max_queue=1))
    with running(app) as base:
        results = {}
        with worker_held(app):
            t = threading.Thread(target=lambda: results.update(first=httpx.post(base + "/v1/completions",
                                                                                 json=body(served), timeout=120)))
            t.start()
            wait_until(lambda: app.state.engine.queued() == 1, 60)
            r = httpx.post(base + "/v1/completions", json=body(served), timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "overloaded" and "max_queue=1" in err["message"]
        t.join(120)
        assert results["first"].status_code == 200


def test_a_request_past_its_timeout_ends_with_504(served):
    app = create_app(served, limits=Limits(request_timeout=0.3))
    with running(app) as base:
        out = {}
        with worker_held(app):
            t = threading.Thread(target=lambda: out.update(r=httpx.post(base + "/v1/completions", json=body(served),
                                                                        timeout=120)))
            t.start()
            wait_until(lambda: app.state.engine.queued() == 1, 60)
            time.sleep(0.5)   # the request's own timeout must pass while it waits
        t.join(120)
        r = out["r"]
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and "0.3 s" in r.json()["error"]["message"]
        ok = httpx.post(base + "/v1/completions", json=body(served), timeout=120)   # the engine lives on
        assert ok.status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_has_its_request_cancelled(served, stream):
    app = create_app(served, limits=Limits(max_tokens=4000))
    with running(app) as base:
        n = served.context_length - 32   # as long as the context allows: seconds of decoding
        long = body(served, max_tokens=n, ignore_eos=True, stream=stream)
        with httpx.Client(timeout=httpx.Timeout(120, read=1.0 if not stream else 120)) as c:
            if stream:
                with c.stream("POST", base + "/v1/completions", json=long) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())   # the first chunk arrived: generation runs; then the client leaves
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post(base + "/v1/completions", json=long)
        wait_until(lambda: metric(base, "mixroute_cancelled_requests_total") == 1, 60)
        # the cancelled row left the batch: a new request runs alone, long before the cancelled one could have ended
        r = httpx.post(base + "/v1/completions", json=body(served), timeout=120).json()
        assert r["usage"]["completion_tokens"] <= 4
        assert metric(base, "mixroute_completion_tokens_total") <= 4, "the cancelled request ran to its end"


def test_ignore_eos_and_min_tokens_give_answers_of_the_asked_length(served):
    app = create_app(served)
    with running(app) as base:
        r = httpx.post(base + "/v1/completions", json=body(served, max_tokens=24, ignore_eos=True), timeout=120)
        assert r.json()["usage"]["completion_tokens"] == 24 and r.json()["choices"][0]["finish_reason"] == "length"
        r = httpx.post(base + "/v1/completions", json=body(served, max_tokens=24, min_tokens=10), timeout=120)
        assert r.json()["usage"]["completion_tokens"] >= 10
        bad = httpx.post(base + "/v1/completions", json=body(served, min_tokens=-1), timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"
