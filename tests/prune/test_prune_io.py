"""Pruned model directories (save / load with plain transformers, zeros intact, atomic, --force) and sparsity
surviving adapter training."""

import copy
import json

import pytest
import torch

from mixroute.prune import PruneError, prune_model
from mixroute.prune.pipeline import pack_windows, save_pruned


@pytest.fixture(scope="module")
def pruned(tiny):
    model = copy.deepcopy(tiny[0])
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, "sparsegpt", pattern="2:4", calib_batches=[ids])
    return model, tiny[1], report


def test_round_trip_plain_transformers(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    from mixroute.models import load_base_model

    model, tok, report = pruned
    out = save_pruned(model, tok, tmp_path / "pruned", report)
    assert {"config.json", "model.safetensors", "tokenizer.json", "prune_report.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["pattern"] == "2:4" and saved["overall_sparsity"] == pytest.approx(0.5)
    assert "keeps N of every M" in saved["convention"] and len(saved["per_layer"]) == 14
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, _ = load_base_model(str(out))
    want = model.state_dict()
    for loaded in (plain, ours):
        got = loaded.state_dict()
        for name in saved["per_layer"]:
            assert torch.equal(got[f"{name}.weight"], want[f"{name}.weight"]), name
        w = got["model.layers.1.mlp.down_proj.weight"]
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    ids = torch.randint(0, 2000, (1, 8))
    assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)


def test_out_dir_rules(pruned, tmp_path):
    model, tok, report = pruned
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(PruneError, match="exists and is not empty; pass --force"):
        save_pruned(model, tok, out, report)
    assert (out / "keep.txt").exists()
    save_pruned(model, tok, out, report, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(PruneError, match="is a file"):
        save_pruned(model, tok, tmp_path / "file", report, force=True)


def test_pack_windows():
    lists = [[1] * 5, [2] * 7, [3] * 9]
    batches = pack_windows(lists, n_samples=3, seq_len=6, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (1, 6)]
    assert pack_windows([[1, 2, 3]], n_samples=4, seq_len=8)[0]["input_ids"].tolist() == [[1, 2, 3]]


def test_sparsity_survives_training(pruned):
    """Base zeros (and every other base weight) stay bit-identical while a LoRA mixture trains on top."""
    from mixroute.config import MixtureConfig
    from mixroute.mixture import Mixture

    model = copy.deepcopy(pruned[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mix = Mixture.attach(model, MixtureConfig(router="task", num_experts=2, num_tasks=2, experts={"lora": {"rank": 4}}))
    params = mix.adapter_parameters()
    adapters_before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 2000, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    mix.train()
    for _ in range(3):
        out = mix(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                  task_ids=torch.tensor([0, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, p) for a, p in zip(adapters_before, params))  # the adapters did train
    base = mix.detach().state_dict()
    assert base.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(base[k], v), k
    w = base["model.layers.0.self_attn.q_proj.weight"]
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
