"""mixroute's LoRA and DoRA banks and Poly router pinned to Hugging Face PEFT: same weights -> same logits (1e-5),
on the tiny Llama and, for LoRA and DoRA, on every family of tests/families.py."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, tiny_family
from marks import FAST_FAMILIES, fast_only

from mixroute.config import ALL_PROJECTIONS, MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import tiny_model

ATOL = 1e-5


def batch(bsz: int = 4, seq: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 5000, (bsz, seq), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding on one row
    return ids, am


def peft_adapters(tmp_path, n: int, r: int = 4, alpha: float = 8.0, targets=ALL_PROJECTIONS,
                  dora: bool = False) -> list[str]:
    """n random PEFT LoRA adapters (B != 0) saved to disk; ``dora``: DoRA adapters whose magnitudes are moved
    away from the weight norms they start at."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(n):
        model, _ = tiny_model()
        torch.manual_seed(100 + i)
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                              init_lora_weights=False, use_dora=dora))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand_like(p))
        d = tmp_path / f"adapter{i}"
        pm.save_pretrained(d)
        dirs.append(str(d))
    return dirs


def peft_model_with(dirs: list[str]):
    from peft import PeftModel

    model, _ = tiny_model()
    pm = PeftModel.from_pretrained(model, dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        pm.load_adapter(d, adapter_name=f"a{i}")
    return pm.eval()


KINDS = pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])


@KINDS
@torch.no_grad()
def test_single_lora_equals_peft(tmp_path, dora):
    dirs = peft_adapters(tmp_path, 1, dora=dora)
    ids, am = batch()
    ref = peft_model_with(dirs)(input_ids=ids, attention_mask=am).logits
    mix = Mixture.from_peft(tiny_model()[0], dirs, MixtureConfig(router="single")).eval()
    assert mix.cfg.expert == ("dora" if dora else "lora")
    out = mix(ids, attention_mask=am).logits
    base = tiny_model()[0](input_ids=ids, attention_mask=am).logits
    assert (ref - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@KINDS
@torch.no_grad()
def test_top1_routed_equals_peft_active_adapter(tmp_path, dora):
    dirs = peft_adapters(tmp_path, 3, dora=dora)
    ids, am = batch()
    pm = peft_model_with(dirs)
    mix = Mixture.from_peft(tiny_model()[0], dirs, MixtureConfig(router="task", num_tasks=3)).eval()
    for e in range(3):
        pm.set_adapter(f"a{e}")
        ref = pm(input_ids=ids, attention_mask=am).logits
        for router in mix.routers.values():  # force the task router's top-1 to expert e
            router.proj.weight.zero_()
            router.proj.bias.copy_(torch.nn.functional.one_hot(torch.tensor(e), 3).float() * 10)
        out = mix(ids, attention_mask=am)
        assert (out.routing["layer_0"].argmax(-1) == e).all()
        torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_mixed_batch_equals_peft_adapter_names(tmp_path):
    dirs = peft_adapters(tmp_path, 3)
    ids, am = batch()
    tids = torch.tensor([2, 0, 1, 2])
    ref = peft_model_with(dirs)(input_ids=ids, attention_mask=am,
                                adapter_names=[f"a{int(t)}" for t in tids]).logits
    mix = Mixture.from_peft(tiny_model()[0], dirs, MixtureConfig(router="oracle", num_tasks=3)).eval()
    torch.testing.assert_close(mix(ids, attention_mask=am, task_ids=tids).logits, ref, atol=ATOL, rtol=0)


@KINDS
@torch.no_grad()
def test_export_peft_round_trip(tmp_path, dora):
    from peft import PeftModel

    cfg = MixtureConfig(expert="dora" if dora else "lora", router="oracle", num_experts=3, num_tasks=3,
                        experts={"lora": {"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}})
    mix = Mixture.attach(tiny_model()[0], cfg).eval()
    for name, p in mix.experts.named_parameters():
        if name.endswith(".m"):   # DoRA magnitudes: away from the weight norms they start at
            p.mul_(1 + 0.3 * torch.rand_like(p))
        else:
            torch.nn.init.normal_(p, std=0.05)
    mix.export_peft(1, str(tmp_path / "e1"))
    ids, am = batch()
    ref = PeftModel.from_pretrained(tiny_model()[0], str(tmp_path / "e1")).eval()(input_ids=ids, attention_mask=am)
    out = mix(ids, attention_mask=am, task_ids=torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    back = Mixture.from_peft(tiny_model()[0], [str(tmp_path / "e1")], MixtureConfig(router="single")).eval()
    torch.testing.assert_close(back(ids, attention_mask=am).logits, ref.logits, atol=ATOL, rtol=0)


def test_from_peft_rejects_mismatched_adapters(tmp_path):
    a = peft_adapters(tmp_path / "a", 1, r=4)
    b = peft_adapters(tmp_path / "b", 1, r=2)
    with pytest.raises(ValueError, match="r: 4 .* vs 2"):
        Mixture.from_peft(tiny_model()[0], a + b, MixtureConfig(router="oracle", num_tasks=2))
    c = peft_adapters(tmp_path / "c", 1, r=4, targets=["q_proj"])
    with pytest.raises(ValueError, match="targets"):
        Mixture.from_peft(tiny_model()[0], a + c, MixtureConfig(router="oracle", num_tasks=2))


@pytest.mark.parametrize("n_splits", [1, 2])
@torch.no_grad()
def test_poly_equals_peft_poly(n_splits):
    from peft import PolyConfig, get_peft_model

    r, skills, tasks = 4, 3, 5
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model()[0], PolyConfig(r=r, n_tasks=tasks, n_skills=skills, n_splits=n_splits,
                                                    target_modules=list(ALL_PROJECTIONS), init_weights=False,
                                                    task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "module_logits" in name:
                p.normal_()  # distinct allocations per task / module
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="poly", num_experts=skills, num_tasks=tasks,
                                                        experts={"lora": {"rank": r, "alpha": 1.0}},
                                                        routers={"poly": {"n_splits": n_splits}})).eval()
    # PEFT Poly scales by 1/r: alpha = 1 gives the same alpha / r.
    mods = dict(pm.named_modules())
    for key, bank in mix.experts.items():
        layer = mods["base_model.model." + mix.module_names[key]]
        pa, pb = layer.poly_lora_A["default"], layer.poly_lora_B["default"]      # (S, E, d, r), (S, E, r, d)
        bank.A.view(skills, r, n_splits, -1).copy_(pa.permute(1, 3, 0, 2))
        bank.B.view(n_splits, -1, skills, r).copy_(pb.permute(0, 3, 1, 2))
        layer_idx = int(key.split("_")[1])
        logits = layer.poly_router["default"].module_logits.view(tasks, n_splits, skills)
        mix.routers[f"layer_{layer_idx}"].module_logits[mix.module_slots[key]].copy_(logits)
    ids, am = batch()
    tids = torch.tensor([4, 0, 2, 4])
    ref = pm(input_ids=ids, attention_mask=am, task_ids=tids).logits
    out = mix(ids, attention_mask=am, task_ids=tids).logits
    base = tiny_model()[0](input_ids=ids, attention_mask=am).logits
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ every architecture
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", fast_only(FAMILIES, FAST_FAMILIES))
@torch.no_grad()
def test_lora_equals_peft_on_every_family(family, dora, tmp_path, one_thread):
    """PEFT all-linear LoRA (and DoRA) adapters (Phi-3's fused qkv_proj, GPT-2's Conv1D, OPT's flattened MLP,
    ...): one adapter alone, and a mixed batch with one adapter per sequence against each row under its PEFT
    adapter (PEFT's own mixed batches, ``adapter_names``, fail on OPT, whose MLP sees (B*T, H) rows, and refuse
    DoRA)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    dirs = []
    for i in range(2):
        torch.manual_seed(100 + i)
        pm = get_peft_model(tiny_family(family)[0], LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False, use_dora=dora))
        for name, p in pm.named_parameters():   # DoRA magnitudes away from the weight norms they start at
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
        pm.save_pretrained(tmp_path / f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
    ids, am = batch()
    pm = PeftModel.from_pretrained(tiny_family(family)[0], dirs[0], adapter_name="a0")
    pm.load_adapter(dirs[1], adapter_name="a1")
    pm.eval()
    single = Mixture.from_peft(tiny_family(family)[0], dirs[:1], MixtureConfig(router="single")).eval()
    torch.testing.assert_close(single(ids, attention_mask=am).logits,
                               pm(input_ids=ids, attention_mask=am).logits, atol=ATOL, rtol=0)
    tids = torch.tensor([1, 0, 0, 1])
    ref = torch.empty_like(base := tiny_family(family)[0](input_ids=ids, attention_mask=am).logits)
    for a in range(2):
        pm.set_adapter(f"a{a}")
        ref[tids == a] = pm(input_ids=ids, attention_mask=am).logits[tids == a]
    mixed = Mixture.from_peft(tiny_family(family)[0], dirs, MixtureConfig(router="oracle", num_tasks=2)).eval()
    torch.testing.assert_close(mixed(ids, attention_mask=am, task_ids=tids).logits, ref, atol=ATOL, rtol=0)
    assert (ref - base).abs().max() > 1e-3


@pytest.mark.parametrize("family, mlp_only", [("gpt2", True), ("phi3", False), ("opt", True)])
@torch.no_grad()
def test_export_peft_round_trip_on_other_families(family, mlp_only, tmp_path, one_thread):
    """An exported expert selects exactly its modules in PEFT (GPT-2 mlp_only: "mlp.c_proj", not attn.c_proj
    too) and records Conv1D's fan_in_fan_out."""
    import json

    from peft import PeftModel

    mix = Mixture.attach(tiny_family(family)[0], MixtureConfig(router="oracle", num_experts=2, num_tasks=2,
                                                               experts={"lora": {"rank": 4, "mlp_only": mlp_only}})).eval()
    for p in mix.experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mix.export_peft(1, str(tmp_path / "e1"))
    conf = json.loads((tmp_path / "e1" / "adapter_config.json").read_text())
    assert conf["fan_in_fan_out"] == (family == "gpt2")
    ref = PeftModel.from_pretrained(tiny_family(family)[0], str(tmp_path / "e1")).eval()
    assert sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in ref.named_modules()
                  if n.endswith(".lora_A")) == sorted(mix.module_names.values())
    ids, am = batch()
    out = mix(ids, attention_mask=am, task_ids=torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(out.logits, ref(input_ids=ids, attention_mask=am).logits, atol=ATOL, rtol=0)
