"""MoP (Mixture of Prompts): prompt experts + gate, on the tiny model (integration test on SmolLM2 at the end)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mixroute.config import MixtureConfig
from mixroute.experts.prompt import PromptExpertConfig
from mixroute.routers.gate import GateConfig
from mixroute.mixture import Mixture
from mixroute.train.gate import pretrain_router, router_inputs

L = 4


def mop(model, **kw) -> Mixture:
    """A MoP mixture; ``kw`` mixes shared fields with the prompt experts' and the gate's settings, each sent to
    its owner."""
    own = lambda cls: {k: kw.pop(k) for k in [fl.name for fl in dataclasses.fields(cls)] if k in kw}  # noqa: E731
    prompt, gate = {"num_virtual_tokens": L, **own(PromptExpertConfig)}, {"gate_hidden": 16, **own(GateConfig)}
    cfg = dict(expert="prompt", router="gate", num_experts=3, num_tasks=3, experts={"prompt": prompt},
               routers={"gate": gate})
    cfg.update(kw)
    return Mixture.attach(model, MixtureConfig(**cfg))


def batch(n: int = 3, t: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 2000, (n, t), generator=g)
    am = torch.ones_like(ids)
    am[1, t - 3:] = 0                                   # right padding on one row
    labels = ids.masked_fill(am == 0, -100)
    labels[:, : t // 2] = -100
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, : t // 2] = True
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "prompt_mask": pm,
            "task_ids": torch.arange(n) % 3}


def peft_prompt_logits(model, prompts: torch.Tensor, ids, am) -> torch.Tensor:
    """PEFT prompt tuning with the given virtual tokens: logits of the input tokens."""
    from peft import PromptTuningConfig, get_peft_model

    n = prompts.shape[0]
    pm = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(prompts)
        return pm(input_ids=ids, attention_mask=am).logits[:, n:]


# ------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("router", ["single", "gate"])
def test_e1_m0_equals_peft_prompt_tuning(tiny, router):
    model, _ = tiny
    b = batch()
    mix = mop(copy.deepcopy(model), router=router, num_experts=1, inject_layer=0, gate_layer=0, num_tasks=1)
    prompts = torch.randn(L, model.config.hidden_size) * 0.5
    with torch.no_grad():
        mix.experts["prompt"].weight.copy_(prompts.unsqueeze(0))
        ours = mix(b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = peft_prompt_logits(model, prompts, b["input_ids"], b["attention_mask"])
    keep = b["attention_mask"].bool()
    assert (ours - ref)[keep].abs().max().item() < 1e-5
    base = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (base - ref)[keep].abs().max().item() > 1e-3          # the prompt really changes the logits


def test_text_init_equals_peft_text_init(tiny, tmp_path):
    """prompt_init='text' starts from the same embeddings as PEFT's TEXT init (E=1, m=0)."""
    from peft import PromptTuningConfig, get_peft_model

    model, tok = tiny
    text = "Answer the question briefly."
    tok.save_pretrained(tmp_path)
    pm = get_peft_model(copy.deepcopy(model), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path)))
    mix = mop(copy.deepcopy(model), router="single", num_experts=1, num_virtual_tokens=7, inject_layer=0,
              prompt_init="text", prompt_init_text=text)
    assert torch.equal(mix.experts["prompt"].weight[0], pm.prompt_encoder["default"].embedding.weight)


def test_m0_any_gate_equals_one_hf_forward_with_prompt_mask(tiny):
    """Independent reference at m=0: one plain HF forward over [all prompts; input] with a hand-built 4-D mask
    (prompt blocks causal within themselves, input attends to expert e's columns with bias log g_e)."""
    model, _ = tiny
    b = batch(n=2, t=8)
    b["attention_mask"][:] = 1
    mix = mop(copy.deepcopy(model), inject_layer=0, gate_layer=0)
    g = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    mix.force(g)
    with torch.no_grad():
        ours = mix(b["input_ids"], attention_mask=b["attention_mask"]).logits
    P = mix.experts["prompt"].weight.detach()
    E, T = P.shape[0], b["input_ids"].shape[1]
    emb = torch.cat([P.reshape(1, E * L, -1).expand(2, -1, -1), model.get_input_embeddings()(b["input_ids"])], 1)
    low = torch.finfo(torch.float32).min
    n = E * L + T
    mask = torch.full((2, 1, n, n), low)
    for e in range(E):
        blk = slice(e * L, (e + 1) * L)
        mask[:, :, blk, blk] = torch.triu(torch.full((L, L), low), 1)
        mask[:, 0, E * L:, blk] = g[:, e].log()[:, None, None]
    mask[:, :, E * L:, E * L:] = torch.triu(torch.full((T, T), low), 1)
    pos = torch.cat([torch.arange(L).repeat(E), torch.arange(T) + L]).unsqueeze(0)
    with torch.no_grad():
        ref = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits[:, E * L:]
    assert (ours - ref).abs().max().item() < 1e-5


def test_one_hot_gate_equals_single_prompt_at_inject_layer(tiny):
    model, _ = tiny
    b = batch()
    mix = mop(copy.deepcopy(model), inject_layer=1, gate_layer=0)
    ids, am = b["input_ids"], b["attention_mask"]
    keep = am.bool()
    with torch.no_grad():
        soft = mix(ids, attention_mask=am).logits
        for e in range(3):
            mix.force(torch.nn.functional.one_hot(torch.tensor(e), 3).float())
            ours = mix(ids, attention_mask=am).logits
            single = mop(copy.deepcopy(model), router="single", inject_layer=1)
            single.experts["prompt"].weight.copy_(mix.experts["prompt"].weight[e:e + 1])
            ref = single(ids, attention_mask=am).logits
            assert (ours - ref)[keep].abs().max().item() < 1e-5
            assert (ours - soft)[keep].abs().max().item() > 1e-4   # the gate matters
    mix.force(None)


def test_layers_below_inject_layer_see_only_the_input(tiny):
    model, _ = tiny
    b = batch()
    mix = mop(copy.deepcopy(model), inject_layer=1, gate_layer=1)
    with torch.no_grad():
        ours = mix(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        base = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    keep = b["attention_mask"].bool()
    # hidden_states[1] = output of layer 0 (below m=1): untouched; the logits do change
    assert len(base.hidden_states) == 3
    assert (ours.logits - base.logits)[keep].abs().max() > 1e-3
    mix2 = copy.deepcopy(model)
    out2 = mop(mix2, inject_layer=1, gate_layer=1).model(input_ids=b["input_ids"],
                                                        attention_mask=b["attention_mask"], output_hidden_states=True)
    assert len(out2.hidden_states) == 3                                  # the prompt pass is not recorded
    assert (out2.hidden_states[1] - base.hidden_states[1])[keep].abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- gate
def test_gate_routing_aux_and_top_k(fresh_tiny):
    model, _ = fresh_tiny
    b = batch()
    mix = mop(model, eta=0.5, gate_top_k=2)
    out = mix(**{k: b[k] for k in ("input_ids", "attention_mask", "labels", "prompt_mask", "task_ids")})
    w = out.routing["gate"]
    assert w.shape == (3, 3)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert ((w > 0).sum(-1) == 2).all()                                  # top-2 of 3, renormalised
    assert set(out.aux_losses) == {"gate_ce"}
    ce = torch.nn.functional.cross_entropy(out.router_logits["gate"], b["task_ids"])
    assert torch.allclose(out.aux_losses["gate_ce"], 0.5 * ce)
    assert torch.allclose(out.loss, out.lm_loss + out.aux_losses["gate_ce"])


def test_gate_reads_only_prompt_tokens(fresh_tiny):
    model, _ = fresh_tiny
    b = batch()
    mix = mop(model)
    with torch.no_grad():
        w1 = mix(b["input_ids"], attention_mask=b["attention_mask"], prompt_mask=b["prompt_mask"]).routing["gate"]
        ids2 = b["input_ids"].clone()
        ids2[:, -2:] = 7                                                 # change response tokens only
        w2 = mix(ids2, attention_mask=b["attention_mask"], prompt_mask=b["prompt_mask"]).routing["gate"]
        w3 = mix(ids2, attention_mask=b["attention_mask"]).routing["gate"]   # None: every attended token
    assert torch.allclose(w1, w2)
    assert not torch.allclose(w1, w3)


def _labelled_batches(n: int, seed: int) -> list[dict]:
    """Category t: tokens from its own vocabulary range (what a gate can learn from the prompt alone)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        tids = torch.arange(6) % 3
        ids = torch.stack([torch.randint(200 + 500 * int(t), 400 + 500 * int(t), (8,), generator=g) for t in tids])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_ids": tids})
    return batches


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_pretrain_router_learns_labels_and_touches_only_the_gate(fresh_tiny, precision):
    """Also under the run's autocast (training calls it inside ``accelerator.autocast()``): one autocast region
    caches each weight's bf16 copy, and a fit inside it never moved the router (chance accuracy)."""
    from mixroute.devices import autocast

    model, _ = fresh_tiny
    mix = mop(model, gate_layer=1, inject_layer=1)
    batches = _labelled_batches(2, seed=1)
    prompts = mix.experts["prompt"].weight.detach().clone()
    with autocast("cpu", precision):
        res = pretrain_router(mix, batches, steps=40, lr=1e-2, batch_size=6)
    assert res.steps == 40 and res.losses[-1] < 0.5 * res.losses[0]
    assert torch.equal(prompts, mix.experts["prompt"].weight)
    with torch.no_grad():
        w = mix(batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).routing["gate"]
    assert (w.argmax(-1) == batches[0]["task_ids"]).all()


def test_pretrain_router_reads_every_training_example_and_stops_on_validation(fresh_tiny):
    """Every example of the train split is read (not the first batches only); validation picks the epoch kept,
    and the first cross-entropy of a fresh gate is a uniform guess (ln E), not a confident wrong one."""
    import math

    model, _ = fresh_tiny
    mix = mop(model, gate_layer=1, inject_layer=1)
    train, val = _labelled_batches(7, seed=2), _labelled_batches(2, seed=3)
    seen = router_inputs(mix, train, ["gate"])["gate"]
    assert seen.shape[0] == 42
    res = pretrain_router(mix, train, steps=1000, lr=1e-2, val_batches=val, batch_size=8, patience=2)
    assert res.train_examples == 42
    assert res.epochs * 6 >= res.steps > 6          # 42 / 8 -> 6 steps an epoch: several full epochs
    assert res.steps < 1000 and 1 <= res.best_epoch < res.epochs   # stopped by validation, best kept
    assert abs(res.first_ce - math.log(3)) < 0.1 * math.log(3)
    assert res.val_accuracy > 0.5                     # chance is 1/3


@pytest.mark.parametrize("eta,router_lr", [(0.0, 0.01), (0.5, 0.0)])
def test_pretrain_router_leaves_no_gradient_for_the_next_stage(fresh_tiny, eta, router_lr):
    """The next stage's first optimizer step adds to whatever ``.grad`` holds: MoA's stage 2 with its routing loss
    off (eta 0, experts by label) must leave the pre-trained routers exactly as pre-training kept them, where the
    last pre-training batch's gradient used to move every router weight in Adam's first step; so must
    ``train.router_lr=0`` with the routing loss on."""
    from mixroute.config import RunConfig
    from mixroute.train.centralized import build_optimizer, make_accelerator
    from mixroute.train.loop import train_step

    model, _ = fresh_tiny
    mix = Mixture.attach(model, MixtureConfig(expert="lora", router="task", num_experts=3, num_tasks=3,
                                              routers={"task": {"eta": eta, "route_train": "label"}}))
    batches = _labelled_batches(3, seed=4)
    pretrain_router(mix, batches, steps=10, lr=1e-2, val_batches=_labelled_batches(1, seed=5), batch_size=6)
    assert all(p.grad is None for p in mix.routers.parameters())
    kept = {k: t.clone() for k, t in mix.routers.state_dict().items()}
    cfg = RunConfig()
    cfg.train.router_lr, cfg.train.warmup_steps = router_lr, 0
    opt, sched = build_optimizer(mix.adapter_parameters(), cfg, 4, list(mix.routers.parameters()))
    experts = {k: t.clone() for k, t in mix.adapter_state_dict().items() if "router" not in k}
    stats = train_step(mix, [batches[0] | {"labels": batches[0]["input_ids"]}], opt, sched,
                       make_accelerator(cfg.model), 1.0, 1)
    assert (stats.router_grad_norm or 0.0) > 0 if eta else stats.router_grad_norm is None
    for k, t in mix.routers.state_dict().items():
        assert torch.equal(t, kept[k]), k
    moved = mix.adapter_state_dict()
    assert any(not torch.equal(moved[k], t) for k, t in experts.items())   # the step did train the experts


# ------------------------------------------------------------------------------------------- generation
# (the expert x router matrix, incl. every prompt router, is in test_mixture_matrix.py)
def test_generate_uses_the_prompts(tiny):
    """generate()'s first-step scores are Mixture.forward's last-position logits, and differ from the base's."""
    model, tok = tiny
    mix = mop(copy.deepcopy(model), inject_layer=0, gate_layer=0)
    ids = torch.randint(100, 2000, (2, 6), generator=torch.Generator().manual_seed(6))
    am = torch.ones_like(ids)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        first = mix.generate(ids, attention_mask=am, **kw).logits[0]
        fwd = mix(ids, attention_mask=am).logits[:, -1]
        base = model.generate(ids, attention_mask=am, **kw).logits[0]
    assert (first - fwd).abs().max() < 1e-5
    assert (first - base).abs().max() > 1e-4


def test_detach_restores_the_base_model(tiny):
    model, _ = tiny
    m = copy.deepcopy(model)
    b = batch()
    with torch.no_grad():
        ref = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        mix = mop(m)
        mix.detach()
        got = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert m.config._attn_implementation == "sdpa"
    assert torch.equal(got, ref)


def test_eager_attention_works_too(tiny):
    model, _ = tiny
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    b = batch()
    mix = mop(m, inject_layer=1, gate_layer=0)
    s = mop(copy.deepcopy(model), inject_layer=1, gate_layer=0)
    with torch.no_grad():
        s.experts["prompt"].weight.copy_(mix.experts["prompt"].weight)
        s.routers["gate"].load_state_dict(mix.routers["gate"].state_dict())
        a = mix(b["input_ids"], attention_mask=b["attention_mask"]).logits
        c = s(b["input_ids"], attention_mask=b["attention_mask"]).logits
    keep = b["attention_mask"].bool()
    assert (a - c)[keep].abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("kw, words", [
    (dict(inject_layer=2), ["inject_layer=2", "0..1"]),
    (dict(inject_layer=0, gate_layer=1), ["gate_layer=1", "0..0", "inject_layer=0"]),
    (dict(inject_layer=1, gate_layer=5), ["gate_layer=5", "0..1"]),
    (dict(num_experts=8, num_virtual_tokens=300), ["num_virtual_tokens", "2400", "max_position_embeddings=2048"]),
    (dict(router="token_topk"), ["router='token_topk'", "single, uniform, oracle, task, gate"]),
    (dict(prompt_init="text"), ["prompt_init_text"]),
    (dict(router="oracle", num_experts=2, num_tasks=3), ["num_experts=2", "num_tasks=3"]),
])
def test_bad_configs_fail_clearly(fresh_tiny, kw, words):
    model, _ = fresh_tiny
    with pytest.raises(ValueError) as err:
        mop(model, **kw)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_default_layers_for_smollm_depth():
    from mixroute.experts.prompt import resolve_layers

    assert resolve_layers(MixtureConfig(expert="prompt", router="gate"), 30) == (15, 10)
    assert resolve_layers(MixtureConfig(expert="prompt", router="gate",
                                        experts={"prompt": {"inject_layer": 4}}), 30) == (4, 4)
    assert resolve_layers(MixtureConfig(expert="prompt", router="gate"), 2) == (1, 0)


def test_logits_for_labels_gives_the_same_loss(tiny):
    model, _ = tiny
    b = batch()
    mix = mop(copy.deepcopy(model))
    with torch.no_grad():
        full = mix(**b)
        lab = mix(**b, logits_for="labels")
    assert lab.logits is None
    assert torch.allclose(full.loss, lab.loss, atol=1e-6)


def test_layer_hooks_do_not_see_the_prompt_pass(tiny):
    """Callers that capture hidden states with a layer pre-hook (evaluation, the classifier baseline) see only
    the input, also at the injection layer."""
    model, _ = tiny
    b = batch()
    mix = mop(copy.deepcopy(model), inject_layer=0, gate_layer=0)
    seen = []
    h = mix.model.get_decoder().layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.no_grad():
        mix(b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    assert seen == [(*b["input_ids"].shape, model.config.hidden_size)]


# ------------------------------------------------------------------------------------------- real model
@pytest.mark.integration
def test_e1_m0_equals_peft_prompt_tuning_smollm(smollm):
    """Same virtual tokens, same logits as PEFT prompt tuning on the real model.

    In float64 the two agree to ~1e-12 (the same function); in float32 they differ by a few 1e-5 on logits of
    magnitude ~30, the size of SmolLM2's own float32 noise (the same sequence alone vs in a padded batch
    differs by up to ~7e-5 in plain transformers), so the float32 bound is 1e-4."""
    model, tok = smollm
    enc = tok(["Give me three ideas for a picnic.", "Summarise: the cat sat on the mat all day."],
              return_tensors="pt", padding=True)
    ids, am = enc["input_ids"], enc["attention_mask"]
    keep = am.bool()
    for dtype, bound in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        m = copy.deepcopy(model).to(dtype)
        mix = mop(copy.deepcopy(m), router="single", num_experts=1, num_virtual_tokens=10, inject_layer=0)
        prompts = mix.experts["prompt"].weight[0].detach().clone()      # random vocabulary embeddings
        with torch.no_grad():
            ours = mix(ids, attention_mask=am).logits
        ref = peft_prompt_logits(m, prompts, ids, am)
        assert (ours - ref)[keep].abs().max().item() < bound, dtype
        assert (ref - m(input_ids=ids, attention_mask=am).logits)[keep].abs().max().item() > 1e-2



# ------------------------------------------------------------------------------------------- MoA's per-layer routers
def _moa(experts: str):
    """Per-layer task routers over 3 LoRA experts with random B (a LoRA's B starts at 0, which would make the
    experts invisible to the features)."""
    from mixroute.models import tiny_model

    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=3, num_tasks=3,
                                                        experts={"lora": {"rank": 2}}, gate_pretrain_experts=experts))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in mix.named_parameters():
            if n.startswith("experts."):
                p.normal_(0, 0.5)
    return mix.eval()


@pytest.mark.parametrize("experts", ["label", "uniform", "none"])
def test_per_layer_router_features_carry_the_label_only_under_label(experts):
    """Relabelling the same prompts changes what a router above the first layer reads only when the experts
    below run by label; ``none`` reads exactly the frozen base's pooled layer input (the classifier's
    features), and layer 0 reads the embeddings whatever the setting."""
    from mixroute.evaluate import frozen_features

    mix = _moa(experts)
    b = _labelled_batches(1, seed=4)
    relabelled = [dict(b[0], task_ids=(b[0]["task_ids"] + 1) % 3)]
    keys = ["layer_0", "layer_1"]
    x, y = router_inputs(mix, b, keys), router_inputs(mix, relabelled, keys)
    torch.testing.assert_close(x["layer_0"], y["layer_0"])
    assert torch.equal(x["layer_1"], y["layer_1"]) == (experts != "label")
    if experts == "none":
        torch.testing.assert_close(x["layer_1"], frozen_features(mix, b, 1)[0])
    else:
        assert not torch.allclose(x["layer_1"], frozen_features(mix, b, 1)[0])


def test_router_inputs_rejects_an_unknown_setting():
    with pytest.raises(ValueError, match="valid: label, uniform, none"):
        router_inputs(_moa("label"), _labelled_batches(1, seed=4), ["layer_1"], experts="oracle")
