"""Any causal LM a user brings: decoder discovery and LoRA targets per family (``mixroute.arch``), every (expert
kind x router) pair on tiny random Llama, Qwen2, Mistral, Gemma2, Phi-3 (fused projections), GPT-2 (Conv1D) and
OPT (forward, backward, gradients only on adapters, save/load, generate keeps the prefill decision), prompt
experts pinned to PEFT prompt tuning on each of them, the families prompt experts refuse, and `mixroute train` /
`mixroute model info` on local GPT-2-style and Phi-3-style directories."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, MATRIX, tiny_family
from marks import FAST_CASES, FAST_FAMILIES, fast_only
from test_mixture_matrix import CASES, PER_TOKEN, case_config, data
from typer.testing import CliRunner

from mixroute import arch
from mixroute.arch import ArchitectureError
from mixroute.config import ConfigError, MixtureConfig
from mixroute.mixture import Mixture

LLAMA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = [f for f in MATRIX if f != "llama"]  # the Llama row of the matrix is tests/test_mixture_matrix.py
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("family", fast_only(FAMILIES, FAST_FAMILIES))
def test_decoder_layers_attention_and_positions_are_found(family):
    model, _ = tiny_family(family)
    path, positions, _ = FAMILIES[family]
    layers = arch.decoder_layers(model)
    assert len(layers) == 2 and arch.layers_path(model) == path
    assert dict(model.named_modules())[path] is layers
    assert type(arch.attention_module(layers[0])).__name__.endswith("Attention")
    assert arch.position_style(model) == positions


@pytest.mark.parametrize("family", fast_only(FAMILIES, FAST_FAMILIES))
def test_all_linear_is_peft_all_linear_within_the_decoder_layers(family):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_family(family)
    ours = {t.path for layer in arch.resolve_targets(model, ["all-linear"]) for t in layer}
    peft = get_peft_model(tiny_family(family)[0], LoraConfig(target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft.named_modules()
              if n.endswith(".lora_A")}
    assert ours == theirs and len(ours) >= 8


def test_phi3_fused_projections_cannot_be_attached_partially_by_accident():
    model, _ = tiny_family("phi3")
    with pytest.raises(ArchitectureError) as err:
        Mixture.attach(model, MixtureConfig(router="single", experts={"lora": {"target_modules": LLAMA_NAMES}}))
    msg = str(err.value)
    assert "Phi3ForCausalLM" in msg and "'phi3'" in msg
    assert "q_proj, k_proj, v_proj, gate_proj, up_proj" in msg                    # what is missing
    assert "self_attn.qkv_proj" in msg and "mlp.gate_up_proj" in msg               # what it has
    assert "allow_partial" in msg and "all-linear" in msg
    assert not any("forward" in m.__dict__ for m in model.modules()), "nothing may be patched on failure"
    mix = Mixture.attach(model, MixtureConfig(router="single",
                                              experts={"lora": {"target_modules": LLAMA_NAMES, "allow_partial": True}}))
    assert sorted(mix.module_names.values()) == [f"model.layers.{i}.{n}" for i in range(2)
                                                 for n in ("mlp.down_proj", "self_attn.o_proj")]
    mix.detach()
    full = Mixture.attach(model, MixtureConfig(router="single"))   # the default: every projection
    assert {n.split(".", 3)[3] for n in full.module_names.values()} == {
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("family, requested, mlp_only, expected", [
    ("gpt2", ["c_proj"], False, ["attn.c_proj", "mlp.c_proj"]),     # PEFT's suffix rule
    ("gpt2", ["mlp.c_proj"], False, ["mlp.c_proj"]),
    ("gpt2", ["all-linear"], True, ["mlp.c_fc", "mlp.c_proj"]),
    ("opt", ["all-linear"], True, ["fc1", "fc2"]),                   # OPT's MLP sits in the layer itself
    ("phi3", ["all-linear"], True, ["mlp.gate_up_proj", "mlp.down_proj"]),
    ("llama", LLAMA_NAMES, True, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("gpt_neox", ["peft-default"], False, ["attention.query_key_value"]),
    ("gpt2", ["peft-default"], False, ["attn.c_attn"]),
])
def test_targets_resolve_per_family(family, requested, mlp_only, expected):
    model, _ = tiny_family(family)
    found = arch.resolve_targets(model, requested, mlp_only=mlp_only)
    assert [[t.name for t in layer] for layer in found] == [expected, expected]


def test_target_errors_name_the_problem():
    gpt2, _ = tiny_family("gpt2")
    with pytest.raises(ArchitectureError, match=r"GPT2LMHeadModel .* has no q_proj, v_proj in decoder layer 0; "
                                                r"its projections there are attn.c_attn, attn.c_proj"):
        arch.resolve_targets(gpt2, ["q_proj", "v_proj"])
    with pytest.raises(ArchitectureError, match="gets no MLP projections"):
        arch.resolve_targets(gpt2, ["c_attn"], mlp_only=True)
    with pytest.raises(ConfigError, match="stands alone"):
        arch.resolve_targets(gpt2, ["all-linear", "c_fc"])
    phi3, _ = tiny_family("phi3")
    if arch.peft_default_targets(phi3) is None:
        with pytest.raises(ArchitectureError, match="PEFT has no default targets for Phi3ForCausalLM"):
            arch.resolve_targets(phi3, ["peft-default"])


def test_a_failed_attach_leaves_the_model_untouched():
    model, _ = tiny_family("phi3")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ArchitectureError, match="has no q_proj"):
        Mixture.attach(model, MixtureConfig(num_experts=2, experts={"lora": {"target_modules": ["q_proj", "o_proj"]}}))
    assert not model.get_decoder()._forward_pre_hooks
    assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", fast_only(MATRIX, FAST_FAMILIES))
def test_the_loss_on_label_positions_is_the_models_own_loss(family):
    """``logits_for="labels"`` and the held-out pass run the LM head themselves: they must apply what the model's
    forward applies after it (Gemma-2's final logit soft-capping), or training optimises another loss."""
    from mixroute.evaluate import held_out_pass

    # a random tiny model's logits are far below Gemma-2's cap of 30, where tanh is the identity: a small cap bites
    model, _ = tiny_family(family, **({"final_logit_softcapping": 0.5} if family == "gemma2" else {}))
    mix = Mixture.attach(model, MixtureConfig(router="single", num_experts=1, experts={"lora": {"rank": 4}}))
    b = data()
    labels_only = mix(**b, logits_for="labels").lm_loss
    full = mix(**b, logits_for="all").lm_loss
    torch.testing.assert_close(labels_only, full, rtol=1e-5, atol=1e-5)
    keep = b["labels"][:, 1:] != -100
    held = held_out_pass(model, mix, [b])
    torch.testing.assert_close(held.nll.sum() / keep.sum(), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("case", fast_only(CASES, FAST_CASES))
@pytest.mark.parametrize("family", fast_only(ROWS, FAST_FAMILIES))
def test_every_pair_on_every_family(family, case, tmp_path):
    model, _ = tiny_family(family)
    mix = Mixture.attach(model, case_config(case))
    if not case.startswith("prompt"):  # every projection of every layer (the MLP ones with mlp_only)
        want = arch.resolve_targets(model, ["all-linear"], mlp_only=bool(CASES[case].get("lora", {}).get("mlp_only")))
        assert sorted(mix.module_names.values()) == sorted(t.path for layer in want for t in layer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(mix.experts.parameters()) + list(mix.routers.parameters()):
            p.add_(torch.randn_like(p) * 0.1)

    mix.train()
    out = mix(**data())
    assert torch.isfinite(out.loss) and out.routing
    out.loss.backward()
    assert all(p.grad is None for p in mix.model.parameters()), "base weights must stay frozen"
    named = {n: p for n, p in mix.named_parameters() if p.requires_grad}
    assert named and all(n.startswith(("experts.", "routers.")) for n in named)
    assert all(p.grad is not None for p in named.values()) and any(p.grad.abs().sum() > 0 for p in named.values())

    mix.eval()
    batch = data()
    with torch.no_grad():
        before = mix(**batch).logits
        base = tiny_family(family)[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (before - base).abs().max() > 1e-4, "the experts must change the output"
    mix.save(str(tmp_path / "m"))
    loaded = Mixture.load(tiny_family(family)[0], str(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, before, atol=1e-5, rtol=0)

        seen: list[dict] = []
        hook = mix.model.get_decoder().register_forward_hook(
            lambda m, a, o: seen.append({k: v.clone() for k, v in mix.context.routing.items()}))
        kw = dict(attention_mask=batch["attention_mask"], task_ids=batch["task_ids"], max_new_tokens=3,
                  do_sample=False, pad_token_id=0)
        cached = mix.generate(batch["input_ids"], use_cache=True, **kw)
        hook.remove()
    assert cached.shape == (3, 15) and len(seen) == 3
    for step in seen[1:]:
        for key, w in step.items():
            if case in PER_TOKEN:
                assert w.shape[1] == 1
            else:
                torch.testing.assert_close(w, seen[0][key])     # decided at the prefill, kept
    if case.startswith("prompt"):  # re-reading the whole sequence every step: the same positions, same tokens
        with torch.no_grad():
            assert torch.equal(mix.generate(batch["input_ids"], use_cache=False, **kw), cached)


# ---------------------------------------------------------------------------------------------- prompt experts
@pytest.mark.parametrize("family", fast_only(MATRIX, FAST_FAMILIES))
@torch.no_grad()
def test_prompt_experts_e1_m0_equal_peft_prompt_tuning(family):
    """E=1, m=0: PEFT prompt tuning on each family. Our prompts live in the hidden-state space entering layer 0,
    so they are PEFT's virtual tokens as the model itself turns them into layer-0 input (GPT-2 / OPT add their
    position embeddings 0..L-1, Gemma scales embeddings); the input tokens sit at positions L.. in both."""
    from peft import PromptTuningConfig, get_peft_model

    L = 4
    model, _ = tiny_family(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 2000, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = 0                                           # left padding: OPT numbers positions from the mask
    pm = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L))
    pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    grabbed = []
    hook = arch.decoder_layers(pm.base_model)[0].register_forward_pre_hook(
        lambda m, a, kw: grabbed.append((a[0] if a else kw["hidden_states"])[0, :L].clone()), with_kwargs=True)
    ref = pm.eval()(input_ids=ids, attention_mask=am).logits[:, L:]
    hook.remove()
    prompts = {"prompt": {"num_virtual_tokens": L, "inject_layer": 0, "gate_layer": 0}}
    mix = Mixture.attach(model, MixtureConfig(expert="prompt", router="single", num_experts=1, experts=prompts)).eval()
    mix.experts["prompt"].weight.copy_(grabbed[0].unsqueeze(0))
    ours = mix(ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
    base = tiny_family(family)[0](input_ids=ids, attention_mask=am).logits
    assert (base - ref)[keep].abs().max() > 1e-3                   # the prompt really changes the logits


@pytest.mark.parametrize("kw, words", [
    (dict(), ["FalconForCausalLM", "attention interface"]),
    (dict(alibi=True), ["FalconForCausalLM", "attention interface"]),
])
def test_prompt_experts_are_refused_where_they_cannot_work(kw, words):
    model, _ = tiny_family("falcon", **kw)
    impl = model.config._attn_implementation
    with pytest.raises(ConfigError) as err:
        Mixture.attach(model, MixtureConfig(expert="prompt", router="single", num_experts=1,
                                            experts={"prompt": {"num_virtual_tokens": 2}}))
    assert all(w in str(err.value) for w in words) and "mixture.expert=lora" in str(err.value)
    assert model.config._attn_implementation == impl                 # refused before touching the model
    Mixture.attach(model, MixtureConfig(router="single"))            # LoRA experts work on Falcon


def test_alibi_is_named_as_the_reason(monkeypatch):
    model, _ = tiny_family("falcon", alibi=True)
    assert arch.position_style(model) == "alibi"
    monkeypatch.setattr(type(model), "_supports_attention_backend", True)  # the next reason in line
    assert "ALiBi" in arch.prompt_support(model)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("family, preset, fused", [("gpt2", "mop", "attn.c_attn"),
                                                   ("phi3", "moa", "self_attn.qkv_proj")])
def test_cli_trains_on_a_local_model_directory(family, preset, fused, tmp_path):
    from pathlib import Path

    from mixroute.cli import app

    model, tok = tiny_family(family)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    runner = CliRunner()
    res = runner.invoke(app, ["model", "info", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    assert fused in res.output and "LoRA targets" in res.output
    out = tmp_path / "run"
    cfg = Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml"
    res = runner.invoke(app, ["train", str(cfg), f"model.name={tmp_path / 'model'}", "data.synthetic_per_task=4",
                              "data.max_length=48", "train.max_steps=2", "train.stage1_steps=1",
                              "train.eval_every=0", "train.save_every=0", "mixture.gate_pretrain_steps=1",
                              "eval.max_eval=2", f"output_dir={out}", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "mixture.safetensors").is_file()
