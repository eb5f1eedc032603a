"""The serving engine without HTTP: greedy output alone equals output inside a mixed-expert batch, per-row
overrides, sampling by seed, stop strings and streamed pieces; and Mixture.force's per-row (NaN) rows."""

from __future__ import annotations

import pytest
import torch

from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture
from mixroute.serve import Engine, Request, load_served


@pytest.fixture(scope="module")
def served(tiny_run):
    return load_served(tiny_run)


@pytest.fixture(scope="module")
def engine(served):
    eng = Engine(served.model, served.mix, served.tok, served.expert_names, max_batch=16, max_wait_ms=200).start()
    yield eng
    eng.stop()


PROMPTS = ["Convert 5 km to metres.", "Write a haiku about rain.", "Sort: 3 1 2", "Count the words: a b c",
           "What is 2 + 2?", "Reformat 2024-01-02 as 02/01/2024."]


def _ids(served, text):
    from mixroute.data.format import prompt_ids

    return prompt_ids({"instruction": text, "response": "", "category": "x"}, served.tok, template=served.template)


def one_hot(served, e):
    return [1.0 if i == e else 0.0 for i in range(len(served.expert_names))]


def test_greedy_alone_equals_inside_a_mixed_expert_batch(served, engine):
    """Each request's greedy text is the same alone and inside one batch whose rows run different experts
    (forced rows to several experts plus router-decided rows)."""
    n = len(served.expert_names)
    routes = [None, one_hot(served, 1 % n), None, one_hot(served, 3 % n), one_hot(served, 0), None]
    alone = [engine.generate(Request(prompt_ids=_ids(served, p), max_tokens=12, temperature=0, forced=f))
             for p, f in zip(PROMPTS, routes)]
    assert all(r.batch_size == 1 for r in alone)
    batch = [engine.submit(Request(prompt_ids=_ids(served, p), max_tokens=12, temperature=0, forced=f))
             for p, f in zip(PROMPTS, routes)]
    for r in batch:
        assert r.done.wait(120) and r.error is None
    assert max(r.batch_size for r in batch) > 1, "the requests were not batched"
    assert len({tuple(r.routing["experts"]) for r in batch}) > 1, "the batch did not mix experts"
    for a, b in zip(alone, batch):
        assert a.tokens == b.tokens and a.text == b.text
        assert a.routing["experts"] == b.routing["experts"]
    assert batch[1].routing["mode"] == "override" and batch[1].routing["experts"] == [served.expert_names[1 % n]]
    assert batch[0].routing["mode"] == "auto"
    assert sum(batch[0].routing["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_sampling_with_a_seed_does_not_depend_on_the_batch(served, engine):
    alone = engine.generate(Request(prompt_ids=_ids(served, PROMPTS[0]), max_tokens=10, temperature=1.0,
                                    top_p=0.9, seed=7))
    batch = [engine.submit(Request(prompt_ids=_ids(served, p), max_tokens=10, temperature=1.0, top_p=0.9, seed=7))
             for p in PROMPTS[:3]]
    for r in batch:
        r.done.wait(120)
    assert batch[0].tokens == alone.tokens


def test_stop_strings_and_streamed_pieces_add_up(served, engine):
    full = engine.generate(Request(prompt_ids=_ids(served, PROMPTS[1]), max_tokens=16, temperature=0))
    assert full.finish_reason in ("length", "stop") and len(full.tokens) <= 16
    pieces: list[str] = []
    finishes: list = []
    streamed = engine.generate(Request(prompt_ids=_ids(served, PROMPTS[1]), max_tokens=16, temperature=0,
                                       on_text=lambda r, t, f: (pieces.append(t), finishes.append(f))))
    assert "".join(pieces) == streamed.text == full.text
    assert finishes[-1] == streamed.finish_reason and all(f is None for f in finishes[:-1])
    if len(full.text) > 3:
        stop = full.text[2:4]
        cut = engine.generate(Request(prompt_ids=_ids(served, PROMPTS[1]), max_tokens=16, temperature=0,
                                      stop=[stop]))
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]


def test_a_failing_batch_reports_the_error_and_the_worker_lives(served, engine):
    bad = Request(prompt_ids=_ids(served, PROMPTS[0]), max_tokens=4, temperature=0, forced=[1.0])  # wrong length
    with pytest.raises(ValueError):
        engine.generate(bad, timeout=60)
    ok = engine.generate(Request(prompt_ids=_ids(served, PROMPTS[0]), max_tokens=4, temperature=0))
    assert ok.error is None and ok.finish_reason is not None


def test_force_with_nan_rows_leaves_those_rows_to_the_router(fresh_tiny):
    model, tok = fresh_tiny
    cfg = MixtureConfig(expert="lora", router="gate", num_experts=4, num_tasks=4, experts={"lora": {"rank": 2}})
    mix = Mixture.attach(model, cfg).eval()
    ids = torch.randint(5, 500, (3, 7))
    with torch.no_grad():
        free = {k: v.clone() for k, v in mix(ids).routing.items()}
        mix.force(torch.tensor([[float("nan")] * 4, [0, 0, 1.0, 0], [float("nan")] * 4]))
        mixed = mix(ids).routing
        mix.force(None)
    for key, w in mixed.items():
        assert torch.allclose(w[[0, 2]], free[key][[0, 2]])
        assert w[1].tolist() == [0, 0, 1.0, 0]
    with pytest.raises(ValueError):
        mix.force(torch.tensor([[float("nan"), 1.0, 0, 0]]))  # a row must be all NaN or all numbers


def test_requests_join_a_running_batch_and_match_their_alone_output(served, engine):
    """Continuous batching: requests submitted while a long one decodes join it at a step boundary (with
    different prompt lengths and experts) and still give exactly their alone output."""
    n = len(served.expert_names)
    long_ids = _ids(served, "Write a long story about a dragon who learns to count " * 3)
    specs = [(long_ids, 30, None), (_ids(served, PROMPTS[0]), 10, one_hot(served, 2 % n)),
             (_ids(served, PROMPTS[2]), 12, None), (_ids(served, PROMPTS[4]), 6, one_hot(served, 5 % n))]
    alone = [engine.generate(Request(prompt_ids=i, max_tokens=m, temperature=0, forced=f)) for i, m, f in specs]
    started = __import__("threading").Event()
    first = Request(prompt_ids=specs[0][0], max_tokens=30, temperature=0, on_text=lambda r, t, f: started.set())
    engine.submit(first)
    assert started.wait(60)
    late = [engine.submit(Request(prompt_ids=i, max_tokens=m, temperature=0, forced=f)) for i, m, f in specs[1:]]
    for r in [first, *late]:
        assert r.done.wait(120) and r.error is None
    assert first.batch_size > 1, "no request joined the running batch"
    for a, b in zip(alone, [first, *late]):
        assert a.tokens == b.tokens and a.routing["experts"] == b.routing["experts"]


def test_token_level_router_reports_the_mean_gate_and_batches_exactly(fresh_tiny):
    """MoE-LoRA (top-k per token): routing reports the mean gate per expert over the prompt's tokens, and
    greedy output alone equals output in a batch (tokens route again at every step)."""
    model, tok = fresh_tiny
    mix = Mixture.attach(model, MixtureConfig(expert="lora", router="token_topk", num_experts=4,
                                              experts={"lora": {"rank": 2}},
                                              routers={"token_topk": {"top_k": 2}})).eval()
    names = [f"expert-{i}" for i in range(4)]
    eng = Engine(model, mix, tok, names, max_batch=8, max_wait_ms=200).start()
    try:
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:4]]
        alone = [eng.generate(Request(prompt_ids=i, max_tokens=6, temperature=0)) for i in ids]
        batch = [eng.submit(Request(prompt_ids=i, max_tokens=6, temperature=0)) for i in ids]
        for r in batch:
            assert r.done.wait(120) and r.error is None
        assert max(r.batch_size for r in batch) > 1
        for a, b in zip(alone, batch):
            assert a.tokens == b.tokens
            p = b.routing["probabilities"]
            assert sum(p.values()) == pytest.approx(1.0, abs=1e-4) and b.routing["mode"] == "auto"
            assert p == pytest.approx(a.routing["probabilities"], abs=1e-5)
    finally:
        eng.stop()
