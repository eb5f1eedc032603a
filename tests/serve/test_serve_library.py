"""`mixroute serve LIB`: an expert library served by the real server (uvicorn subprocess on 127.0.0.1) and the
official `openai` client: experts added and removed while serving, in-flight requests finishing on the expert
they started with, per-request cost-aware routing, and the update endpoints off unless asked for."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve import KEY, ask, start_server, stop_server

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def library(tiny_run, tmp_path_factory):
    from mixroute.library import Library
    from peft_adapters import peft_adapter

    root = tmp_path_factory.mktemp("servelib")
    lib = Library.from_run(root / "lib", tiny_run)
    lib.mixture().detach()
    return {"lib": str(root / "lib"), "names": lib.man.names(), "extra": peft_adapter(root / "extra", seed=5)}


def test_updates_are_off_by_default(library):
    proc, base = start_server(library["lib"])
    try:
        h = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{base}/v1/experts", json={"name": "x", "adapter_dir": library["extra"]}, headers=h,
                       timeout=60)
        assert r.status_code == 403 and "--allow-library-updates" in r.json()["error"]["message"]
        r = httpx.delete(f"{base}/v1/experts/{library['names'][0]}", headers=h, timeout=60)
        assert r.status_code == 403
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        ids = [m.id for m in client.models.list().data]
        assert ids == ["lib"] + library["names"]
        r = ask(client, "lib", "Convert 5 km to metres.")
        assert r.model_extra["routing"]["experts"][0] in library["names"]
    finally:
        stop_server(proc)


def test_add_and_remove_while_serving(library):
    proc, base = start_server(library["lib"], "--allow-library-updates", "--max-tokens-limit", "256")
    h = {"Authorization": f"Bearer {KEY}"}
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    first = library["names"][0]
    try:
        # centroid (the library's router) needs a new expert's example prompts: without them the add is undone
        r = httpx.post(f"{base}/v1/experts", headers=h, timeout=120,
                       json={"name": "noexamples", "adapter_dir": library["extra"]})
        assert r.status_code == 400 and "example prompts" in r.json()["error"]["message"]
        listed = httpx.get(f"{base}/v1/experts", headers=h, timeout=60).json()["data"]
        assert [e["name"] for e in listed] == library["names"]
        assert not (Path(library["lib"]) / "experts" / "noexamples").exists()
        alone = ask(client, first, "Write a haiku about rain.", max_tokens=200).choices[0].message.content
        # a request in flight while an expert is added: it ends on the expert (and mixture) it started with
        chunks: list = []
        started = threading.Event()

        def stream():
            for c in ask(client, first, "Write a haiku about rain.", max_tokens=200, stream=True):
                chunks.append((time.perf_counter(), c))
                started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        sent = time.perf_counter()
        r = httpx.post(f"{base}/v1/experts", headers=h, timeout=120,
                       json={"name": "cheap", "adapter_dir": library["extra"], "cost": 0.0,
                             "examples": ["What is 2 + 2?", "Add 3 and 4."]})
        t.join(120)
        assert r.status_code == 200, r.text
        assert r.json()["experts"] == library["names"] + ["cheap"]
        assert chunks[-1][0] > sent, "the streamed request must still be running when the add is sent"
        assert "".join(c.choices[0].delta.content or "" for _, c in chunks if c.choices) == alone
        assert "cheap" in [m.id for m in client.models.list().data]
        assert ask(client, "cheap", "hi").model_extra["routing"]["experts"] == ["cheap"]
        # per-request lambda: every other expert costs its rank (8), the new one 0
        routed = ask(client, "lib", "Sort: 3 1 2", extra_body={"mixroute": {"route_cost_weight": 100.0}})
        assert routed.model_extra["routing"]["experts"] == ["cheap"]
        # bad updates are clear errors, and the library is unchanged by them
        assert httpx.post(f"{base}/v1/experts", headers=h, timeout=60,
                          json={"name": "cheap", "adapter_dir": library["extra"]}).status_code == 400
        assert httpx.post(f"{base}/v1/experts", headers=h, timeout=60,
                          json={"name": "y", "adapter_dir": "/no/such/dir"}).status_code == 400
        r = httpx.delete(f"{base}/v1/experts/nope", headers=h, timeout=60)
        assert r.status_code == 404 and "no expert 'nope'" in r.json()["error"]["message"]
        r = httpx.delete(f"{base}/v1/experts/cheap", headers=h, timeout=120)
        assert r.status_code == 200 and "cheap" not in r.json()["experts"]
        with pytest.raises(openai.NotFoundError):
            ask(client, "cheap", "hi")
        assert ask(client, first, "Write a haiku about rain.", max_tokens=200).choices[0].message.content == alone
    finally:
        out = stop_server(proc)
    assert "expert cheap added" in out and "expert cheap removed" in out

