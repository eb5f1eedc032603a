"""`mixroute serve --engine vllm` against a real vLLM process (from `make vllm`'s .venv-vllm), talked to by the
official openai client: the router's decision and the greedy answer equal mixroute's own engine's for the same
prompt (one expert, and a soft mixture served as one stacked adapter), streaming, a killed vLLM process
(503 while it restarts, then answers again), and shutdown.

Runs on the real SmolLM2-135M-Instruct with eight random LoRA experts and a random global task router (a run
directory written here, no training), in float32 on both engines so greedy tokens can be compared."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
KEY = "test-key"

if not VLLM_PYTHON.is_file():
    if os.environ.get("MIXROUTE_REQUIRE_VLLM"):
        raise RuntimeError(f"MIXROUTE_REQUIRE_VLLM is set but {VLLM_PYTHON} is missing: run `make vllm`")
    pytest.skip(f"no vLLM virtualenv at {VLLM_PYTHON}: run `make vllm` to test --engine vllm",
                allow_module_level=True)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["Convert 5 km to metres.", "Sort these numbers: 9 2 7 4", "What is 12 + 30?",
           "Reformat the date 2024-03-09 as DD/MM/YYYY.", "Count the words: the cat sat down",
           "Give the acronym of portable network graphics.", "Extract the value of key b from a=1; b=2; c=3",
           "Uppercase this: hello world"]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """A MoA run directory with one global task router over 8 random LoRA experts on SmolLM2."""
    from mixroute.config import load_config
    from mixroute.data import RunData
    from mixroute.methods import mixture_config
    from mixroute.mixture import Mixture
    from mixroute.rundir import final_dir, load_model, write_config

    out = tmp_path_factory.mktemp("vllm") / "moa_global"
    cfg = load_config(str(ROOT / "configs" / "moa.yaml"), ["mixture.router_scope=global",
                                                          "data.synthetic_per_task=4", f"output_dir={out}"])
    out.mkdir(parents=True)
    write_config(out, cfg)
    model, tok = load_model(cfg.model)
    data = RunData.build(cfg, tok)
    mix = Mixture.attach(model, mixture_config(cfg, len(data.categories)))
    torch.manual_seed(0)
    for name, p in mix.experts.named_parameters():
        if name.endswith("B"):
            torch.nn.init.normal_(p, std=0.01)
    for p in mix.routers.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    mix.save(str(final_dir(out)))
    return str(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(base: str, proc: subprocess.Popen, timeout: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mixroute serve exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            r = httpx.get(base + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("mixroute serve --engine vllm did not come up")


@contextlib.contextmanager
def serving(target: str, *extra: str):
    """``mixroute serve TARGET --engine vllm`` as a process (float32, rank 32, this module's key): (url, proc)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixroute.cli", "serve", target, "--engine", "vllm",
                             "--vllm-dtype", "float32", "--vllm-max-lora-rank", "32", "--port", str(port),
                             "--api-key", KEY, "--vllm-python", str(VLLM_PYTHON), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc, 900)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(vllm_run):
    with serving(vllm_run) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def local(vllm_run):
    """mixroute's own engine on the same run, in float32: the reference."""
    from mixroute.serve import Engine, load_served

    served = load_served(vllm_run, device="cpu")
    eng = Engine(served.model, served.mix, served.tok, served.expert_names, max_batch=8).start()
    yield served, eng
    eng.stop()


def _local_answer(local, text: str, max_tokens: int, forced=None):
    from mixroute.serve import Request

    served, eng = local
    ids = [int(x) for x in served.tok(text, add_special_tokens=False)["input_ids"]]
    return eng.generate(Request(prompt_ids=ids, max_tokens=max_tokens, temperature=0, forced=forced), 300)


def _name(local):
    return local[0].name


def test_the_router_decides_as_mixroutes_own_engine_and_greedy_answers_match(client, local):
    """Every prompt: the same expert chosen, the same probabilities, the same greedy text (vLLM running that
    expert's exported adapter); the prompts reach more than one expert."""
    chosen = set()
    for p in PROMPTS:
        ref = _local_answer(local, p, 12)
        out = client.completions.create(model=_name(local), prompt=p, max_tokens=12, temperature=0)
        routing = out.model_extra["routing"]
        assert routing["experts"] == ref.routing["experts"], p
        for k, v in ref.routing["probabilities"].items():
            assert routing["probabilities"][k] == pytest.approx(v, abs=1e-4)
        assert out.choices[0].text == ref.text, p
        assert out.usage.completion_tokens == ref.n_completion()   # a generated EOS counts on both
        chosen.add(routing["experts"][0])
    assert len(chosen) > 1, "every prompt went to one expert: the routing comparison compared nothing"


def test_a_soft_mixture_is_served_exactly_as_one_stacked_adapter(client, local, server):
    import httpx

    served = local[0]
    w = [0.0] * len(served.expert_names)
    w[1], w[4], w[6] = 0.5, 0.3, 0.2
    for p in PROMPTS[:3]:
        ref = _local_answer(local, p, 12, forced=w)
        out = client.completions.create(model=_name(local), prompt=p, max_tokens=12, temperature=0,
                                        extra_body={"mixroute": {"weights": w}})
        assert out.model_extra["routing"]["mode"] == "override"
        assert out.choices[0].text == ref.text, p
    health = httpx.get(server[0] + "/health").json()
    assert health["engine"]["mixtures_loaded"] == 1, "the same mixture was built more than once"


def test_an_expert_named_as_model_and_streaming(client, local):
    served = local[0]
    name = served.expert_names[2]
    ref = _local_answer(local, PROMPTS[1], 16, forced=[1.0 if n == name else 0.0 for n in served.expert_names])
    resp = client.completions.with_raw_response.create(model=name, prompt=PROMPTS[1], max_tokens=16,
                                                       temperature=0)
    assert resp.headers["x-mixroute-expert"] == name
    assert resp.parse().choices[0].text == ref.text
    chunks = list(client.chat.completions.create(model=_name(local), max_tokens=16, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": PROMPTS[1]}]))
    assert chunks[0].model_extra["routing"]["experts"], "the first chunk carries the routing decision"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_ignore_eos_gives_answers_of_the_asked_length(client, local):
    out = client.completions.create(model=_name(local), prompt=PROMPTS[2], max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 20 and out.choices[0].finish_reason == "length"


def test_a_killed_vllm_process_answers_503_then_is_restarted(client, local, server):
    import httpx
    from openai import APIStatusError

    base, _ = server
    before = httpx.get(base + "/health").json()["engine"]
    os.kill(before["pid"], signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            out = client.completions.create(model=_name(local), prompt=PROMPTS[0], max_tokens=4, temperature=0)
            if statuses:   # answered again after failing: restarted
                break
        except APIStatusError as e:
            assert e.status_code == 503, e
            assert e.response.json()["error"]["type"] == "server_error"
            statuses.append(e.status_code)
        time.sleep(1)
    else:
        pytest.fail("the server did not answer again within 600 s of vLLM being killed")
    assert statuses, "no request saw the dead vLLM: the kill was not noticed"
    after = httpx.get(base + "/health").json()["engine"]
    assert after["restarts"] == before["restarts"] + 1 and after["pid"] != before["pid"]
    assert out.choices[0].text == _local_answer(local, PROMPTS[0], 4).text
