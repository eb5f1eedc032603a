"""DoRA experts (``mixture.expert: dora``) pinned to PEFT's ``use_dora``: the magnitudes matter, a mixed batch equals
each row under its own PEFT adapter, soft routing equals the weighted sum of the experts' own DoRA outputs, a
fresh mixture is the base and its magnitudes train, routers that mix inside an expert are refused, magnitudes
travel in federated training like LoRA tensors. (Alone, routed top-1 and the export/import round trip against
PEFT: tests/test_peft_equivalence.py, parametrised over LoRA and DoRA.)"""

from __future__ import annotations

import pytest
import torch
from test_peft_equivalence import ATOL, batch, peft_adapters, peft_model_with

from mixroute.config import ConfigError, MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import tiny_model
from mixroute.routers.base import RouteWeights

@torch.no_grad()
def test_the_magnitudes_matter(tmp_path):
    """(PEFT equivalence alone and routed: tests/test_peft_equivalence.py, parametrised over LoRA and DoRA.)"""
    dirs = peft_adapters(tmp_path, 1, dora=True)
    ids, am = batch()
    ref = peft_model_with(dirs)(input_ids=ids, attention_mask=am).logits
    lora = Mixture.from_peft(tiny_model()[0], dirs, MixtureConfig(router="single")).eval()
    torch.testing.assert_close(lora(ids, attention_mask=am).logits, ref, atol=ATOL, rtol=0)
    for bank in lora.experts.values():   # the same A and B as plain LoRA give other logits
        bank.match_plain_lora(0)
    assert (lora(ids, attention_mask=am).logits - ref).abs().max() > 1e-3


@torch.no_grad()
def test_a_mixed_batch_equals_each_row_under_its_own_peft_adapter(tmp_path):
    dirs = peft_adapters(tmp_path, 3, dora=True)
    ids, am = batch()
    pm = peft_model_with(dirs)
    mix = Mixture.from_peft(tiny_model()[0], dirs, MixtureConfig(router="oracle", num_tasks=3)).eval()
    tids = torch.tensor([2, 0, 1, 2])
    per_row = []
    for i, t in enumerate(tids.tolist()):   # PEFT's mixed batches refuse DoRA: each row under its own adapter
        pm.set_adapter(f"a{t}")
        per_row.append(pm(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1]).logits)
    torch.testing.assert_close(mix(ids, attention_mask=am, task_ids=tids).logits, torch.cat(per_row),
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_cached_norms_follow_an_optimizer_style_in_place_update():
    from mixroute.experts import DoraBank

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    bank = DoraBank.for_module(lin, num_experts=2, rank=2, alpha=4.0)
    bank.B.add_(torch.randn_like(bank.B))
    first = bank.norms(torch.float32).clone()
    bank.B.add_(torch.randn_like(bank.B))          # what AdamW's step does: in place, under no_grad
    a, b = bank.expert(1)
    torch.testing.assert_close(bank.norms(torch.float32)[1], (lin.weight + bank.scaling * b @ a).norm(dim=1))
    assert not torch.allclose(bank.norms(torch.float32), first)


@torch.no_grad()
@pytest.mark.parametrize("update_scale", [1e-3, 1.0, 30.0])
def test_the_expanded_norms_equal_the_norms_of_the_formed_weights(update_scale):
    """The bank never forms W + s B_e A_e; from a small update (cancellation-free) to one that dwarfs W."""
    from mixroute.experts import DoraBank

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    bank = DoraBank.for_module(lin, num_experts=4, rank=4, alpha=8.0)
    bank.B.copy_(update_scale * torch.randn_like(bank.B))
    formed = torch.stack([(lin.weight + bank.scaling * b @ a).norm(dim=1)
                          for a, b in (bank.expert(e) for e in range(4))])
    torch.testing.assert_close(bank.norms(torch.float32), formed, rtol=1e-5, atol=0)


@torch.no_grad()
def test_soft_routing_is_the_weighted_sum_of_the_experts_dora_outputs():
    from mixroute.experts import DoraBank

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    bank = DoraBank.for_module(lin, num_experts=3, rank=2, alpha=4.0)
    for p in (bank.A, bank.B, bank.m):
        p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 4, 6)
    w = torch.softmax(torch.randn(2, 4, 3), -1)                       # token-level weights

    def expert_out(e):   # PEFT's DoRA formula for expert e alone
        a, b = bank.expert(e)
        full = lin.weight + bank.scaling * b @ a
        g = bank.m[e] / full.norm(dim=1)
        return lin(x) + (g - 1) * (x @ lin.weight.T) + g * bank.scaling * (x @ a.T @ b.T)

    want = sum(w[..., e:e + 1] * expert_out(e) for e in range(3))
    got = bank.add_into(lin(x), x, RouteWeights(weights=w, level="token"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_fresh_dora_mixture_is_the_base_and_its_magnitudes_train():
    ids, am = batch()
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(expert="dora", router="task", num_experts=2, num_tasks=2,
                                                        experts={"lora": {"rank": 4}},
                                                        routers={"task": {"route_train": "label"}}))
    with torch.no_grad():
        base = tiny_model()[0](input_ids=ids, attention_mask=am).logits
        torch.testing.assert_close(mix(ids, attention_mask=am, task_ids=torch.zeros(4, dtype=torch.long)).logits,
                                   base, atol=ATOL, rtol=0)
    out = mix(ids, attention_mask=am, task_ids=torch.tensor([0, 1, 0, 1]), labels=ids)
    out.loss.backward()
    banks = list(mix.experts.values())
    assert all(b.m.grad is not None and b.m.grad.abs().sum() > 0 for b in banks)
    assert all(b.A.grad is not None for b in banks)


@pytest.mark.parametrize("router", ["rank", "poly"])
def test_routers_that_mix_inside_an_expert_are_refused(router):
    with pytest.raises(ConfigError, match=f"mixture.router='{router}' cannot route dora experts .* valid with "
                                          "expert='dora': .*task"):
        Mixture.attach(tiny_model()[0], MixtureConfig(expert="dora", router=router))


def test_magnitudes_are_per_expert_slices_in_federated_aggregation():
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(expert="dora", router="task", num_experts=3, num_tasks=3,
                                                        experts={"lora": {"rank": 4}}))
    state = mix.adapter_state_dict()
    mags = [k for k in state if k.endswith(".m")]
    assert mags and all(state[k].shape[0] == 3 for k in mags)
    assert all(mix.expert_axis(k) == (0, 1) for k in mags)
    assert {mix.expert_axis(k) for k in state if k.endswith((".A", ".B"))} == {(0, 4), (1, 4)}


@pytest.mark.slow   # a client's set-up: data, tokenizer, model
def test_a_federated_client_round_trains_dora_magnitudes_and_sends_them():
    from mixroute.config import load_config
    from mixroute.federated.local import setup, train_round

    cfg = load_config(None, ["model.name=tiny", "data.path=null", "data.synthetic_per_task=8", "data.max_length=48",
                             "data.template=plain", "train.method=mixture", "mixture.expert=dora",
                             "mixture.router=task", "mixture.num_experts=8", "mixture.num_tasks=8",
                             "mixture.routers.task.route_train=label", "mixture.experts.lora.rank=4",
                             "train.lr=0.01", "train.batch_size=4",
                             "federated.clients=2", "federated.local_steps=2", "federated.partition=iid",
                             "federated.partition_total=null", "output_dir=unused"])
    local = setup(cfg)
    start = {k: v.clone() for k, v in local.mix.adapter_state_dict().items()}
    state, metrics = train_round(local, 0, start, 1)
    mags = [k for k in state if k.endswith(".m")]
    assert mags and set(state) == set(start) and metrics["num-examples"] > 0
    assert any(not torch.equal(state[k], start[k]) for k in mags)


def test_the_lora_methods_keep_a_dora_choice_and_the_others_refuse_it():
    from mixroute.config import load_config
    from mixroute.methods import mixture_config, stage1_config

    def cfg(method):
        return load_config(None, [f"train.method={method}", "mixture.expert=dora"])

    for method in ("moa", "lora_single", "lora_mixed", "moe_lora", "moe_lora_naive"):
        assert mixture_config(cfg(method), 4).expert == "dora", method
    assert stage1_config(cfg("moa")).expert == "dora"
    assert mixture_config(load_config(None, ["train.method=moa"]), 4).expert == "lora"
    with pytest.raises(ConfigError, match="train.method 'smora' .* cannot route dora experts"):
        mixture_config(cfg("smora"), 4)


def test_under_bf16_autocast_a_dora_mixture_stays_close_to_float32():
    from mixroute.devices import autocast

    ids, am = batch()
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(expert="dora", router="task", num_experts=2, num_tasks=2,
                                                        experts={"lora": {"rank": 4}})).eval()
    with torch.no_grad():
        for name, p in mix.experts.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if not name.endswith(".m") else 0.2))
        ref = mix(ids, attention_mask=am).logits
        with autocast("cpu", "bf16"):
            half = mix(ids, attention_mask=am).logits
    assert not torch.equal(half.float(), ref)   # bf16 was applied
    assert (half.float() - ref).abs().max() / ref.abs().max() < 0.05
