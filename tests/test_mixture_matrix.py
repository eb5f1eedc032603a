"""Every meaningful (expert kind, router) pair on the tiny model through the one routing pipeline: forward,
backward, gradients only on adapter parameters, save/load round trip, loss falls on a tiny repeated task,
generate() with and without a KV cache (same tokens, the prefill's decision kept at every step), and the pairs
that make no sense rejected with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from marks import FAST_CASES, fast_only

from mixroute.config import ConfigError, MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import tiny_model
from mixroute.routers import ROUTERS

# each case: the shared MixtureConfig fields, ``routers`` (its router's settings), ``lora`` (LoRA / DoRA settings
# over rank 4, alpha 8) and, for prompt experts, ``experts``
PROMPT = dict(expert="prompt", experts={"prompt": dict(num_virtual_tokens=4, inject_layer=1, gate_layer=1)},
              routers={"gate": dict(gate_hidden=16)})
CASES = {
    "lora-single": dict(router="single"),
    "lora-uniform": dict(router="uniform", num_experts=3),
    "lora-oracle": dict(router="oracle", num_experts=3, num_tasks=3),
    "lora-task": dict(router="task", num_experts=3, num_tasks=3),
    "lora-task_label_global": dict(router="task", num_experts=3, num_tasks=3,
                                   routers={"task": dict(route_train="label")}, router_scope="global"),
    "lora-gate": dict(router="gate", num_experts=3, num_tasks=3, routers={"gate": dict(gate_hidden=16)}),
    "lora-token_topk": dict(router="token_topk", num_experts=3, routers={"token_topk": dict(top_k=2)},
                            lora=dict(mlp_only=True)),
    "lora-poly": dict(router="poly", num_experts=3, num_tasks=3, routers={"poly": dict(n_splits=2)}),
    "lora-rank": dict(router="rank", num_experts=3, routers={"rank": dict(rank_top_k=4)}),
    "lora-centroid": dict(router="centroid", num_experts=3),
    "lora-arrow": dict(router="arrow", num_experts=3, routers={"arrow": dict(arrow_top_k=2)}),
    "dora-single": dict(expert="dora", router="single"),
    "dora-task_label_global": dict(expert="dora", router="task", num_experts=3, num_tasks=3,
                                   routers={"task": dict(route_train="label")}, router_scope="global"),
    "dora-task": dict(expert="dora", router="task", num_experts=3, num_tasks=3),
    "dora-token_topk": dict(expert="dora", router="token_topk", num_experts=3, routers={"token_topk": dict(top_k=2)},
                            lora=dict(mlp_only=True)),
    "dora-arrow": dict(expert="dora", router="arrow", num_experts=3, routers={"arrow": dict(arrow_top_k=2)}),
    "prompt-single": dict(PROMPT, router="single"),
    "prompt-uniform": dict(PROMPT, router="uniform", num_experts=3),
    "prompt-oracle": dict(PROMPT, router="oracle", num_experts=3, num_tasks=3),
    "prompt-task": dict(PROMPT, router="task", num_experts=3, num_tasks=3),
    "prompt-gate": dict(PROMPT, router="gate", num_experts=3, num_tasks=3),
    "prompt-centroid": dict(PROMPT, router="centroid", num_experts=3),
}
PER_TOKEN = {"lora-token_topk", "lora-rank", "lora-arrow", "dora-token_topk", "dora-arrow"}


def case_config(case: str) -> MixtureConfig:
    spec = copy.deepcopy(CASES[case])
    experts = {"lora": {"rank": 4, "alpha": 8.0, **spec.pop("lora", {})}, **spec.pop("experts", {})}
    return MixtureConfig(seed=0, experts=experts, **spec)


def make(case: str) -> Mixture:
    return Mixture.attach(tiny_model()[0], case_config(case))


def data(bsz: int = 3, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 3000, (bsz, seq), generator=g)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    labels[am == 0] = -100
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, : seq // 2] = True
    return dict(input_ids=ids, attention_mask=am, labels=labels, prompt_mask=pm,
                task_ids=torch.arange(bsz) % 3)


def randomise(mix: Mixture, std: float) -> Mixture:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(mix.experts.parameters()) + list(mix.routers.parameters()):
            p.add_(torch.randn_like(p) * std)
    return mix


def test_every_registered_router_and_expert_kind_is_in_the_matrix():
    from mixroute.experts import EXPERT_KINDS

    assert {c.split("-")[1].replace("_label_global", "") for c in CASES} == set(ROUTERS)
    assert {c.split("-")[0] for c in CASES} == set(EXPERT_KINDS)


@pytest.mark.parametrize("case", fast_only(CASES, FAST_CASES))
def test_forward_backward_save_load(case, tmp_path):
    mix = make(case)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in mix.experts.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mix.train()
    out = mix(**data())
    assert out.loss is not None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values(), torch.tensor(0.0)))
    assert out.routing, "routing must be observable"
    out.loss.backward()
    assert all(p.grad is None for p in mix.model.parameters()), "base weights must stay frozen"
    named = {n: p for n, p in mix.named_parameters() if p.requires_grad}
    assert named and all(n.startswith(("experts.", "routers.")) for n in named)
    grads = [p.grad for p in named.values()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    mix.eval()
    batch = data()
    with torch.no_grad():
        before = mix(**batch).logits
    mix.save(str(tmp_path / "m"))
    loaded = Mixture.load(tiny_model()[0], str(tmp_path / "m")).eval()
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", fast_only(CASES, FAST_CASES))
def test_loss_falls(case):
    mix = make(case)
    batch = data(bsz=3, seq=10)
    prompt = case.startswith("prompt")
    opt = torch.optim.AdamW(mix.adapter_parameters(), lr=3e-2 if prompt else 1e-2)
    mix.train()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = mix(**batch, logits_for="labels")
        out.loss.backward()
        opt.step()
        mix.update_balancing()
        losses.append(out.lm_loss.item())
    # the tiny random Llama's logits are nearly uniform and move little under a soft prompt (PEFT prompt tuning
    # gains about as much); a broken gradient path leaves the loss flat
    assert losses[-1] < losses[0] - (0.05 if prompt else 0.5), losses


@pytest.mark.parametrize("case", fast_only(CASES, FAST_CASES))
@torch.no_grad()
def test_generate_keeps_the_prefill_decision_with_and_without_cache(case):
    mix = randomise(make(case).eval(), 0.2)
    batch = data()
    runs = {}
    for use_cache in (True, False):
        seen: list[dict] = []
        handle = mix.model.get_decoder().register_forward_hook(
            lambda m, a, o: seen.append({k: v.clone() for k, v in mix.context.routing.items()}))
        runs[use_cache] = mix.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                       task_ids=batch["task_ids"], max_new_tokens=6, do_sample=False,
                                       use_cache=use_cache, pad_token_id=0)
        handle.remove()
        assert runs[use_cache].shape == (3, 18)
        assert len(seen) == 6 and seen[0]
        for i, step in enumerate(seen[1:], 1):
            assert step.keys() == seen[0].keys()
            for key, w in step.items():
                if case in PER_TOKEN:  # one decision per token: the new one (cache) or all of them again
                    assert w.shape[1] == (1 if use_cache else 12 + i)
                else:
                    torch.testing.assert_close(w, seen[0][key])  # decided at the prefill, kept
    if case not in PER_TOKEN:
        assert torch.equal(runs[True], runs[False])


@pytest.mark.parametrize("case", ["lora-oracle", "prompt-oracle", "lora-poly"])
# top_k=1 sampling is greedy decoding that HF lets return several sequences
@pytest.mark.parametrize("widen", [dict(do_sample=True, top_k=1, num_return_sequences=2),
                                   dict(do_sample=False, num_beams=2, num_return_sequences=2)])
@torch.no_grad()
def test_widened_mixed_batch_routes_each_row_by_its_own_label(case, widen):
    """generate() repeats each row of a mixed batch in place for beams / num_return_sequences: every widened
    row must keep its own sequence's label, so the batch equals each prompt generated alone."""
    mix = randomise(make(case).eval(), 0.5)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 3000, (2, 7), generator=g)
    task_ids = torch.tensor([0, 2])
    kw = dict(max_new_tokens=5, pad_token_id=0, **widen)
    together = mix.generate(ids, attention_mask=torch.ones_like(ids), task_ids=task_ids, **kw)
    assert together.shape[0] == 4
    for key, route in mix.context.kept.items():   # rows 0, 1 from prompt 0 (label 0); rows 2, 3 label 2
        w = route.weights
        assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3]) and not torch.equal(w[0], w[2]), key
    if case.endswith("oracle"):
        assert mix.chosen_experts() == [0, 0, 2, 2]
    for b in range(2):
        alone = mix.generate(ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]),
                             task_ids=task_ids[b:b + 1], **kw)
        assert torch.equal(together[2 * b:2 * b + 2], alone), b


@pytest.mark.parametrize("router", ["token_topk", "rank", "poly"])
def test_prompt_experts_refuse_routers_that_do_not_decide_per_sequence(router):
    with pytest.raises(ConfigError) as err:
        Mixture.attach(tiny_model()[0], MixtureConfig(router=router, num_tasks=3, num_experts=3, **PROMPT))
    assert f"router={router!r}" in str(err.value) and "single, uniform, oracle, task, gate" in str(err.value)


def test_unknown_router_lists_the_registry():
    with pytest.raises(ConfigError) as err:
        Mixture.attach(tiny_model()[0], MixtureConfig(router="nope"))
    assert "'nope'" in str(err.value) and ", ".join(ROUTERS) in str(err.value)


@pytest.mark.parametrize("router", ["token_topk", "rank", "poly"])
def test_global_scope_only_where_meaningful(router):
    with pytest.raises(ConfigError, match="router_scope='global'"):
        Mixture.attach(tiny_model()[0], MixtureConfig(router=router, num_experts=3, num_tasks=3,
                                                      router_scope="global"))


@pytest.mark.parametrize("case", fast_only(CASES, FAST_CASES))
def test_every_expert_tensor_declares_how_it_stacks_the_experts(case):
    """What federated training slices per expert comes from the bank (``expert_axes``): every expert tensor
    has an axis, and along it the experts fill the dimension in equal blocks."""
    mix = make(case)
    n = next(iter(mix.experts.values())).num_experts
    for key, t in mix.adapter_state_dict().items():
        if key.startswith("routers."):
            assert mix.expert_axis(key) is None
            continue
        dim, block = mix.expert_axis(key)
        assert t.shape[dim] == n * block, (key, tuple(t.shape), dim, block)
