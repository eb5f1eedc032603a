"""Mixture core behaviour: label-only logits, errors that name what is wrong, routing inputs, detach."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture, MixtureOutput
from mixroute.models import TinyModelSpec, tiny_model


def batch(bsz: int = 3, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 3000, (bsz, seq), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[am == 0] = -100
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, :6] = True
    return dict(input_ids=ids, attention_mask=am, labels=labels, prompt_mask=pm, task_ids=torch.tensor([0, 1, 2]))


def randomised(mix: Mixture) -> Mixture:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in list(mix.experts.parameters()) + list(mix.routers.parameters()):
            p.normal_(std=0.1)
    return mix


@pytest.mark.parametrize("router", ["task", "token_topk", "rank"])
def test_logits_for_labels_equals_full_loss(router):
    mix = randomised(Mixture.attach(tiny_model()[0], MixtureConfig(
        router=router, num_experts=3, num_tasks=3, experts={"lora": {"rank": 4}},
        routers={"task": {"top_k": 2}, "token_topk": {"top_k": 2}, "rank": {"rank_top_k": 3}}))).eval()
    full = mix(**batch())
    part = mix(**batch(), logits_for="labels")
    assert isinstance(part, MixtureOutput) and part.logits is None and full.logits is not None
    torch.testing.assert_close(part.lm_loss, full.lm_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(part.loss, full.loss, atol=1e-5, rtol=0)
    # and the full computation matches Hugging Face's own shifted loss (called directly, the routers see no
    # prompt mask, so compare with prompt_mask=None)
    b = batch()
    ref = mix.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    own = mix(**dict(b, prompt_mask=None)).lm_loss
    torch.testing.assert_close(own, ref, atol=1e-5, rtol=0)


def test_load_onto_other_base_is_a_clear_error(tmp_path):
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=2, num_tasks=2,
                                                        experts={"lora": {"rank": 2}}))
    mix.save(str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / "mixture.json").read_text())
    assert meta["base"]["hidden_size"] == 64 and meta["config"]["router"] == "task"
    other, _ = tiny_model(spec=TinyModelSpec(hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match="hidden_size: saved 64, this model 32"):
        Mixture.load(other, str(tmp_path / "m"))
    # tensors edited to the wrong shape: the error names the tensor
    path = tmp_path / "m" / "mixture.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".A"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=f"{key}: saved shape"):
        Mixture.load(tiny_model()[0], str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="not a saved mixture"):
        Mixture.load(tiny_model()[0], str(tmp_path))


def test_router_reads_only_prompt_tokens():
    mix = randomised(Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=3, num_tasks=3,
                                                                   experts={"lora": {"rank": 2}}))).eval()
    b = batch()
    with torch.no_grad():
        r1 = mix(**b).router_logits
        b2 = dict(b, input_ids=b["input_ids"].clone())
        b2["input_ids"][:, 6:] = 7  # change only the response
        r2 = mix(**b2).router_logits
        r3 = mix(**dict(b2, prompt_mask=None)).router_logits
    torch.testing.assert_close(r1["layer_0"], r2["layer_0"])
    assert not torch.allclose(r1["layer_0"], r3["layer_0"])


def test_aux_losses_and_balancing():
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=3, num_tasks=3,
                                                        routers={"task": {"eta": 0.5}}))
    mix.train()
    out = mix(**batch())
    assert set(out.aux_losses) == {"routing_ce"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["routing_ce"])
    cfg = MixtureConfig(router="rank", num_experts=2, experts={"lora": {"rank": 4}},
                        routers={"rank": {"rank_top_k": 2, "bias_update_rate": 0.1}})
    mix = Mixture.attach(tiny_model()[0], cfg).train()
    mix(**batch())
    router = mix.routers["layer_0"]
    load = router.load.clone()
    assert load.sum() == 2 * int(batch()["attention_mask"].sum())  # k=2 ranks per attended token
    mix.update_balancing()
    torch.testing.assert_close(router.balance_bias, torch.sign(load.mean() - load) * 0.1)
    assert router.load.sum() == 0


def test_configuration_errors():
    with pytest.raises(ValueError, match="num_experts=2"):
        Mixture.attach(tiny_model()[0], MixtureConfig(router="oracle", num_experts=2, num_tasks=4))
    with pytest.raises(ValueError, match="needs task_ids"):
        Mixture.attach(tiny_model()[0], MixtureConfig(router="oracle", num_experts=2, num_tasks=2))(
            batch()["input_ids"])
    with pytest.raises(ValueError, match="target_modules"):
        Mixture.attach(tiny_model()[0], MixtureConfig(experts={"lora": {"target_modules": ["qq_proj"]}}))


def test_parameter_counts_and_detach():
    model, _ = tiny_model()
    ids = batch()["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    mix = randomised(Mixture.attach(model, MixtureConfig(router="task", num_experts=4, num_tasks=4,
                                                         experts={"lora": {"rank": 2, "mlp_only": True}})))
    # mlp: gate/up 64 -> 128, down 128 -> 64; per expert r * (in + out); 2 layers; router per layer: its
    # LayerNorm (2 * 64) and its projection (64 * 4 + 4)
    parts = mix.num_parameters_by_part()
    assert parts["experts"] == 2 * 4 * 2 * 3 * (64 + 128)
    assert parts["routers"] == 2 * (2 * 64 + 64 * 4 + 4)
    assert mix.trainable_parameters() == parts["experts"] + parts["routers"]
    assert parts["base"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert not torch.allclose(mix(ids).logits, base)
        mix.detach()
        torch.testing.assert_close(model(input_ids=ids).logits, base)


@torch.no_grad()
def test_force_fixes_sequence_routing_for_every_expert_kind():
    """A forced one-hot row runs exactly that expert (same logits as label routing to it); a forced soft row
    mixes like the uniform router; token-level routing cannot be forced."""
    b = batch()
    task = randomised(Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=3, num_tasks=3)))
    oracle = Mixture.attach(tiny_model()[0], MixtureConfig(router="oracle", num_experts=3, num_tasks=3))
    oracle.load_state_dict({k: v for k, v in task.state_dict().items() if not k.startswith("routers.")},
                           strict=False)
    task.eval()
    task.force(torch.nn.functional.one_hot(b["task_ids"], 3).float())
    torch.testing.assert_close(task(b["input_ids"]).logits,
                               oracle(b["input_ids"], task_ids=b["task_ids"]).logits)
    assert task.chosen_experts() == [0, 1, 2]
    uniform = Mixture.attach(tiny_model()[0], MixtureConfig(router="uniform", num_experts=3))
    uniform.load_state_dict(oracle.state_dict(), strict=False)
    task.force(torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(task(b["input_ids"]).logits, uniform(b["input_ids"]).logits)
    task.force(None)
    assert task(b["input_ids"]).routing["layer_0"].tolist() != [[1 / 3] * 3] * 3
    with pytest.raises(ValueError, match="num_experts=3"):
        task.force(torch.tensor([1.0, 0.0]))
    for router in ("token_topk", "poly"):   # per token, or parameters mixed per task: nothing to fix per sequence
        other = Mixture.attach(tiny_model()[0], MixtureConfig(router=router, num_experts=3, num_tasks=3))
        with pytest.raises(ValueError, match="only sequence-level"):
            other.force(torch.tensor([1.0, 0.0, 0.0]))
