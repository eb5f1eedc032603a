"""The pieces of serving on vLLM that need no vLLM process: a soft or top-k mixture written as one stacked
LoRA adapter gives PEFT the mixture's own logits; the routing pre-pass (``Mixture.route_prompts``) decides
what the full forward decides; what vLLM cannot serve is refused with the reason and ``--engine local``."""

from __future__ import annotations

import pytest
import torch

from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import tiny_model
from mixroute.serve.vllm import check_servable, lora_rank_for, unsupported, write_mixture_adapter

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def batch(bsz: int = 3, seq: int = 10):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 5000, (bsz, seq), generator=g)
    am = torch.ones_like(ids)
    am[0, :2] = 0
    return ids, am


def random_experts(mix: Mixture) -> Mixture:
    torch.manual_seed(7)
    for p in mix.experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return mix.eval()


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2, 0.0], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
@torch.no_grad()
def test_a_mixture_written_as_one_stacked_adapter_gives_peft_the_mixtures_logits(tmp_path, weights):
    from peft import PeftModel

    cfg = MixtureConfig(router="task", num_experts=4, num_tasks=4, router_scope="global",
                        experts={"lora": {"rank": 4, "alpha": 8.0, "target_modules": TARGETS}})
    mix = random_experts(Mixture.attach(tiny_model()[0], cfg))
    rank = write_mixture_adapter(mix, weights, tmp_path / "mix")
    assert rank == 4 * sum(w > 0 for w in weights)
    ids, am = batch()
    mix.force(torch.tensor(weights))
    ours = mix(ids, attention_mask=am).logits
    ref = PeftModel.from_pretrained(tiny_model()[0], str(tmp_path / "mix")).eval()(input_ids=ids, attention_mask=am)
    torch.testing.assert_close(ours, ref.logits, atol=1e-5, rtol=0)
    base = tiny_model()[0](input_ids=ids, attention_mask=am).logits
    assert (ours - base).abs().max() > 1e-2, "the experts changed nothing: the test would pass for any adapter"


@torch.no_grad()
def test_the_routing_prepass_decides_what_the_full_forward_decides():
    cfg = MixtureConfig(router="task", num_experts=4, num_tasks=4, router_scope="global",
                        experts={"lora": {"rank": 4, "target_modules": TARGETS}})
    mix = random_experts(Mixture.attach(tiny_model()[0], cfg))
    for p in mix.routers.parameters():
        torch.nn.init.normal_(p, std=0.5)
    assert mix.decides_before_layers()
    ids, am = batch(bsz=6)
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    decided = mix.route_prompts(ids, am, pos)["global"].weights.clone()
    mix(ids, attention_mask=am, position_ids=pos)
    full = mix.context.kept["global"].weights
    torch.testing.assert_close(decided, full)
    assert len(set(decided.argmax(-1).tolist())) > 1, "every prompt went to one expert: nothing was compared"


@pytest.mark.parametrize("cfg,why", [
    (dict(router="task", num_experts=3, num_tasks=3, router_scope="layer"), "one router per layer"),
    (dict(router="token_topk", num_experts=3), "token-level"),
    (dict(router="poly", num_experts=3, num_tasks=3), "Poly"),
    (dict(router="gate", expert="prompt", num_experts=3, num_tasks=3), "soft prompts"),
    (dict(router="task", expert="dora", num_experts=3, num_tasks=3, router_scope="global"), "DoRA"),
])
def test_what_vllm_cannot_serve_is_refused_with_the_reason(cfg, why):
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(**cfg,
                                                        experts={"lora": {"rank": 4, "target_modules": TARGETS}}))
    assert why in (unsupported(mix) or "")
    with pytest.raises(ValueError, match="--engine local"):
        check_servable(mix)


def test_servable_mixtures_pass_and_ranks_round_up_to_what_vllm_accepts():
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=3, num_tasks=3,
                                                        router_scope="global",
                                                        experts={"lora": {"rank": 4, "target_modules": TARGETS}}))
    assert unsupported(mix) is None and unsupported(None) is None
    assert [lora_rank_for(n) for n in (1, 4, 8, 9, 24, 33, 300, 600)] == [1, 8, 8, 16, 32, 64, 320, 512]


def test_an_expert_library_is_served_with_global_routing_and_refused_per_layer(tiny_run, tmp_path):
    from mixroute.library import Library
    from mixroute.serve import load_library
    from mixroute.serve.vllm import VLLMEngine

    Library.from_run(tmp_path / "lib", tiny_run).mixture().detach()
    served = load_library(str(tmp_path / "lib"))
    with pytest.raises(ValueError, match="one router per layer.*--engine local"):
        VLLMEngine(served)   # the constructor refuses: no vLLM process is started for it
    served.mix.detach()
    served = load_library(str(tmp_path / "lib"), scope="global")
    eng = VLLMEngine(served)   # accepted: constructing starts nothing
    assert eng.mix.decides_before_layers() and eng.expert_names == served.library.man.names()
    with pytest.raises(ValueError, match="routes per token"):
        served.library.mixture("arrow", scope="global")


def test_serve_router_scope_is_checked_before_anything_loads(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from mixroute.cli import app
    from mixroute.library import Library

    res = CliRunner().invoke(app, ["serve", tiny_run, "--router-scope", "global"])
    assert res.exit_code == 2 and "apply to libraries only" in res.output
    Library.create(tmp_path / "lib", "tiny")
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "lib"), "--router-scope", "sideways"])
    assert res.exit_code == 2 and "valid: layer, global" in res.output
