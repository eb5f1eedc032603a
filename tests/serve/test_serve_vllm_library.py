"""`mixroute serve LIB --engine vllm --allow-library-updates` against a real vLLM process, talked to by the official
openai client: an expert library routed globally (one centroid decision per request from the frozen base) answers
as mixroute's own engine does on the same library; an expert added with POST /v1/experts is loaded into vLLM at
run time and answers as the local engine forcing it; DELETE unloads it and its name is then unknown."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

import test_serve_vllm
from test_serve_vllm import KEY, PROMPTS, serving

vllm_run = test_serve_vllm.vllm_run   # the same run directory fixture (8 random LoRA experts, a global router)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def lib_dir(vllm_run, tmp_path_factory):
    from mixroute.library import Library

    path = tmp_path_factory.mktemp("vllm_lib") / "lib"
    Library.from_run(path, vllm_run, examples_per_expert=4).mixture().detach()
    return str(path)


@pytest.fixture(scope="module")
def server(lib_dir):
    with serving(lib_dir, "--allow-library-updates") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _local(lib_dir):
    """mixroute's own engine on the library as it is on disk now, routed globally, in float32."""
    from mixroute.serve import Engine, load_library

    served = load_library(lib_dir, device="cpu", scope="global")
    return served, Engine(served.model, served.mix, served.tok, served.expert_names, max_batch=8).start()


def _answer(served, eng, text: str, max_tokens: int, forced=None):
    from mixroute.serve import Request

    ids = [int(x) for x in served.tok(text, add_special_tokens=False)["input_ids"]]
    return eng.generate(Request(prompt_ids=ids, max_tokens=max_tokens, temperature=0, forced=forced), 300)


def test_a_library_on_vllm_routes_and_answers_as_the_local_engine_and_takes_updates(client, server, lib_dir,
                                                                                      tmp_path):
    import httpx
    from openai import NotFoundError

    from mixroute.library import Library

    served, eng = _local(lib_dir)
    name = served.name
    try:
        chosen = set()
        for p in PROMPTS:
            ref = _answer(served, eng, p, 12)
            out = client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0)
            routing = out.model_extra["routing"]
            assert routing["experts"] == ref.routing["experts"], p
            assert out.choices[0].text == ref.text, p
            chosen.add(routing["experts"][0])
        assert len(chosen) > 1, "every prompt went to one expert: the routing comparison compared nothing"
        # a new expert: another expert's adapter with its update negated and scaled, so its answers differ
        src = Library(lib_dir).export(served.expert_names[0], tmp_path / "src")
        new = tmp_path / "flipped"
        new.mkdir()
        (new / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        t = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: -5 * v if "lora_B" in k else v for k, v in t.items()}, str(new / "adapter_model.safetensors"))
    finally:
        eng.stop()
        served.mix.detach()
    hdr = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server[0] + "/v1/experts", headers=hdr, timeout=600,
                   json={"name": "flipped", "adapter_dir": str(new), "examples": PROMPTS[:2]})
    assert r.status_code == 200, r.text
    assert "flipped" in httpx.get(server[0] + "/health").json()["engine"]["experts_loaded"]
    served, eng = _local(lib_dir)
    try:
        forced = [1.0 if n == "flipped" else 0.0 for n in served.expert_names]
        ref = _answer(served, eng, PROMPTS[3], 12, forced=forced)
        plain = _answer(served, eng, PROMPTS[3], 12, forced=[1.0 if n == served.expert_names[0] else 0.0
                                                            for n in served.expert_names])
    finally:
        eng.stop()
        served.mix.detach()
    resp = client.completions.with_raw_response.create(model="flipped", prompt=PROMPTS[3], max_tokens=12,
                                                       temperature=0)
    assert resp.headers["x-mixroute-expert"] == "flipped"
    assert resp.parse().choices[0].text == ref.text
    assert ref.text != plain.text, "the added expert answers as the one it was made from: the check checks nothing"
    r = httpx.delete(server[0] + "/v1/experts/flipped", headers=hdr, timeout=600)
    assert r.status_code == 200, r.text
    assert "flipped" not in httpx.get(server[0] + "/health").json()["engine"]["experts_loaded"]
    with pytest.raises(NotFoundError):
        client.completions.create(model="flipped", prompt=PROMPTS[3], max_tokens=4, temperature=0)
    out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert out.choices[0].text
