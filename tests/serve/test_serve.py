"""`mixroute serve` end to end: the real server (uvicorn subprocess on a free 127.0.0.1 port, tiny MoA run)
driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

openai = pytest.importorskip("openai")

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: str, *extra: str, key: str | None = KEY) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, MIXROUTE_API_KEY=key or "")
    proc = subprocess.Popen([sys.executable, "-m", "mixroute.cli", "serve", run_dir, "--port", str(port),
                             "--max-tokens-limit", "32", "--max-wait-ms", "30", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):  # bounded: 60 s
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + proc.stdout.read())
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def stop_server(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def server(tiny_run):
    proc, base = start_server(tiny_run)
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def names(client):
    ids = [m.id for m in client.models.list().data]
    return ids[0], ids[1:]


def ask(client, model, text, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_models_lists_the_run_first_then_its_experts(names):
    run, experts = names
    assert run == "tiny_moa" and len(experts) == 8


def test_chat_completion_schema_routing_and_header(client, names):
    raw = client.chat.completions.with_raw_response.create(
        model=names[0], messages=[{"role": "user", "content": "Convert 5 km to metres."}], max_tokens=8,
        temperature=0, user="alice")
    r = raw.parse()
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == names[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    routing = r.model_extra["routing"]
    assert routing["mode"] == "auto" and len(routing["experts"]) == 1 and routing["experts"][0] in names[1]
    assert set(routing["probabilities"]) == set(names[1]) and routing["router_latency_ms"] >= 0
    assert raw.headers["x-mixroute-expert"] == routing["experts"][0]


def test_override_forces_the_named_expert(client, names):
    for expert in names[1][:3]:
        r = ask(client, expert, "Sort: 3 1 2")
        assert r.model_extra["routing"]["mode"] == "override"
        assert r.model_extra["routing"]["experts"] == [expert]
        assert r.model_extra["routing"]["probabilities"][expert] == 1.0


def test_fixed_weights_through_the_mixroute_object(client, names):
    w = {names[1][0]: 1.0, names[1][2]: 3.0}
    r = ask(client, names[0], "Sort: 3 1 2", extra_body={"mixroute": {"weights": w}})
    p = r.model_extra["routing"]["probabilities"]
    assert p[names[1][2]] == pytest.approx(0.75) and p[names[1][0]] == pytest.approx(0.25)


def test_streaming_equals_non_streaming_at_temperature_0(client, names):
    for model in (names[0], names[1][1]):
        full = ask(client, model, "Write a haiku about rain.", max_tokens=16)
        chunks = list(ask(client, model, "Write a haiku about rain.", max_tokens=16, stream=True,
                          stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content
        assert chunks[0].model_extra["routing"] == {**full.model_extra["routing"],
                                                    "router_latency_ms": chunks[0].model_extra["routing"][
                                                        "router_latency_ms"]}
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [full.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_extreme_sampling_values_are_served(client, names):
    for kw in ({"seed": 2**70, "temperature": 1.0}, {"seed": -5, "temperature": 1e-30}, {"top_p": 1e-9,
                                                                                        "temperature": 2.0}):
        r = ask(client, names[0], "hi", **kw)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_raw_sse_ends_with_done_and_completions_endpoint(server, names):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": names[0], "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    full = httpx.post(f"{server}/v1/completions", json=body, headers=h, timeout=60).json()
    assert full["object"] == "text_completion" and "text" in full["choices"][0]
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, headers=h,
                      timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-mixroute-expert"] == full["routing"]["experts"][0]
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "routing" in chunks[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_auth(server):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


BAD = [  # (body changes, status, param)
    ({"messages": None}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "system", "content": "only a system message"}]}, 400, "messages"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"max_tokens": "ten"}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"stop": 5}, 400, "stop"),
    ({"model": 3}, 400, "model"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"mixroute": {"weights": [1.0]}}, 400, "mixroute.weights"),
    ({"mixroute": {"weights": {"nobody": 1.0}}}, 400, "mixroute.weights"),
    ({"mixroute": {"category": "nope"}}, 400, "mixroute.category"),
    ({"mixroute": {"route_cost_weight": 1.0}}, 400, "mixroute.route_cost_weight"),   # a run, not a library
    ({"mixroute": {"route_cost_weight": -1}}, 400, "mixroute.route_cost_weight"),
    ({"messages": [{"role": "user", "content": "word " * 2100}]}, 400, "messages"),
]


@pytest.mark.parametrize("change,status,param", BAD)
def test_bad_input_gets_the_openai_error_naming_the_field(server, names, change, status, param):
    body = {"model": names[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    if body["model"] is None:
        body.pop("model")
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


def test_malformed_json_and_oversized_bodies(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=h, timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server}/v1/chat/completions", content=b"x" * (2 << 20), headers=h, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(f"{server}/v1/nothing", json={}, headers=h, timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_32_concurrent_clients_each_get_their_own_answer(client, names, server):
    prompts = [f"Item {i}: reverse the word {w}" for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 8)]
    solo = {p: ask(client, names[0], p).choices[0].message.content for p in prompts[:8]}

    def one(p):
        return p, ask(client, names[0], p)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, prompts))
    assert len(results) == 32
    for p, r in results:
        if p in solo:
            assert r.choices[0].message.content == solo[p]
    answers = {p: r.choices[0].message.content for p, r in results}
    for p, r in results:  # the same prompt answered alone later gives the same text
        assert ask(client, names[0], p).choices[0].message.content == answers[p]
        break
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    assert "mixroute_requests_total" in metrics and "mixroute_batch_size_bucket" in metrics
    count = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    assert count['mixroute_batch_size_bucket{le="1.0"}'] < count["mixroute_batch_size_count"], "nothing was batched"
    assert any(k.startswith("mixroute_expert_requests_total") for k in count)


def test_openapi_schema_fuzzed_with_schemathesis(server):
    """Every body schemathesis generates from /openapi.json gets a non-5xx answer, errors in the OpenAI shape."""
    import hypothesis
    import schemathesis
    import torch

    # some native library loaded in this process turns on flush-to-zero; hypothesis' float strategies refuse
    # to run without subnormals
    torch.set_flush_denormal(False)

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in ops)
    for op in ops:
        @hypothesis.settings(max_examples=15, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy())
        def check(case):
            resp = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            assert resp.status_code < 500, (case.body, resp.text)
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        check()
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200  # the worker survived


def test_graceful_shutdown_finishes_in_flight_requests(tiny_run):
    proc, base = start_server(tiny_run, key=None)
    body = {"model": "tiny_moa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
            "temperature": 0}
    result: dict = {"lines": []}
    streaming = threading.Event()

    def call():
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True,
                                                                      "ignore_eos": True}, timeout=60) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    result["lines"].append(line)
                    streaming.set()

    t = threading.Thread(target=call)
    t.start()
    assert streaming.wait(60), "the request never started"
    out = stop_server(proc)   # while the request is being decoded
    t.join(60)
    assert proc.returncode == 0, out
    assert result["status"] == 200 and result["lines"][-1] == "data: [DONE]", out
    assert sum('"content"' in ln for ln in result["lines"]) >= 32, "the in-flight request was cut short"
    assert "engine stopped" in out


def test_cli_reports_a_missing_run_as_a_user_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mixroute.cli", "serve", str(tmp_path / "nope"), "--port",
                          str(_free_port())], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
