"""Pruning math and prune_model on the tiny model: exact sparsity, N:M structure, Wanda by hand, SparseGPT vs
magnitude reconstruction, dead inputs, bad input."""

import copy
import math

import pytest
import torch

from mixroute.prune import (NMPattern, PruneError, HessianAccumulator, magnitude_mask, parse_pattern,
                            prune_magnitude, prune_model, prune_wanda, sparsegpt_prune_layer, wanda_mask)
from mixroute.prune.masks import num_pruned

METHODS = ("magnitude", "wanda", "sparsegpt")


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (4, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # padding must not enter the statistics
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, ids[2:]]


def pruned_copy(tiny, method, calib, **target):
    model = copy.deepcopy(tiny[0])
    report = prune_model(model, method, calib_batches=calib, **target)
    return model, report


def expected_zeros(method, weight_shape, sparsity, blocksize=128):
    rows, cols = weight_shape
    if method == "magnitude":
        return num_pruned(sparsity, rows * cols)
    if method == "wanda":
        return rows * num_pruned(sparsity, cols)
    return sum(num_pruned(sparsity, rows * (min(s + blocksize, cols) - s)) for s in range(0, cols, blocksize))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact(tiny, calib, method, sparsity):
    model, report = pruned_copy(tiny, method, calib, sparsity=sparsity)
    modules = dict(model.named_modules())
    assert len(report.per_layer) == 14  # 7 projections x 2 layers; no embedding / LM head by default
    for name, achieved in report.per_layer.items():
        w = modules[name].weight
        assert int((w == 0).sum()) == expected_zeros(method, w.shape, sparsity), name
        assert achieved == pytest.approx(sparsity, abs=1 / w.shape[1])
    assert report.overall_sparsity == pytest.approx(sparsity, abs=0.01)
    assert torch.equal(modules["model.embed_tokens"].weight, tiny[0].model.embed_tokens.weight)  # untouched


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:4"])
def test_nm_structure_row_by_row(tiny, calib, method, pattern):
    pat = parse_pattern(pattern)
    model, report = pruned_copy(tiny, method, calib, pattern=pattern)
    modules = dict(model.named_modules())
    for name in report.per_layer:
        w = modules[name].weight
        zeros_per_group = (w.reshape(w.shape[0], -1, pat.m) == 0).sum(-1)
        assert (zeros_per_group == pat.m - pat.n).all(), name  # keep exactly N of every M per output row
        assert report.per_layer[name] == pytest.approx(1 - pat.n / pat.m)
    assert report.pattern == pattern and report.target_sparsity == pytest.approx(pat.sparsity)


def test_wanda_hand_computed():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -1.0, 0.5]])
    x = torch.tensor([[0.0, 3.0, 0.0, 0.3], [4.0, 0.0, 1.0, 0.4]])  # column norms 4, 3, 1, 0.5
    acc = HessianAccumulator(4)
    acc.add(x)
    assert torch.allclose(acc.act_norm, torch.tensor([4.0, 3.0, 1.0, 0.5]))
    # scores |W| * norm: row 0 [4, 6, 3, 2] -> prune cols 2, 3 (the largest weights!); row 1 [16, 9, 1, .25]
    expected = torch.tensor([[False, False, True, True], [False, False, True, True]])
    assert torch.equal(wanda_mask(w, acc.act_norm, sparsity=0.5), expected)
    assert torch.equal(prune_wanda(w, acc.act_norm, pattern="2:4"), w.masked_fill(expected, 0))
    # magnitude disagrees on row 0: it drops the two smallest |W|
    assert torch.equal(magnitude_mask(w, pattern="2:4")[0], torch.tensor([True, True, False, False]))


def test_wanda_in_model_uses_layer_inputs(tiny, calib):
    """Layer 0's q_proj mask equals wanda_mask on the q_proj inputs recorded by hand (real tokens only)."""
    model = copy.deepcopy(tiny[0])
    norms = _q_inputs(model, 0, calib).pow(2).sum(0).sqrt()
    expected = wanda_mask(model.model.layers[0].self_attn.q_proj.weight, norms, sparsity=0.5)
    prune_model(model, "wanda", sparsity=0.5, calib_batches=calib)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight == 0, expected)


def _layer_problem(seed=0, rows=32, cols=64, tokens=512):
    """A weight and its inputs: correlated features with log-normal scales (outlier features, as in LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / math.sqrt(cols)
    scale = torch.exp(torch.randn(cols, generator=gen))
    x = (torch.randn(tokens, cols, generator=gen) @ mix + 0.3 * torch.randn(tokens, cols, generator=gen)) * scale
    return torch.randn(rows, cols, generator=gen), x


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.75}])
def test_sparsegpt_beats_magnitude_reconstruction(target):
    w, x = _layer_problem()
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)

    def error(w_pruned):
        return torch.linalg.norm(x @ w.T - x @ w_pruned.T).item()

    e_mag = error(prune_magnitude(w, **target))
    e_wanda = error(prune_wanda(w, acc.act_norm, **target))
    w_sgpt = sparsegpt_prune_layer(w, acc.hessian, **target)
    e_sgpt = error(w_sgpt)
    assert e_sgpt < 0.5 * e_mag and e_sgpt < e_wanda  # measured: 0.24-0.36 x magnitude, 0.76-0.95 x Wanda
    # the OBS updates get close to the best possible kept weights for SparseGPT's own mask (least squares)
    best = torch.zeros_like(w)
    for r in range(w.shape[0]):
        kept = (w_sgpt[r] != 0).nonzero().squeeze(1)
        best[r, kept] = torch.linalg.lstsq(x[:, kept], x @ w[r]).solution
    assert e_sgpt < 1.25 * error(best)


def test_sparsegpt_lazy_blocks_equal_column_by_column():
    w, x = _layer_problem(seed=1)
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)
    one_block = sparsegpt_prune_layer(w, acc.hessian, pattern="2:4", blocksize=64)
    per_group = sparsegpt_prune_layer(w, acc.hessian, pattern="2:4", blocksize=4)
    assert torch.allclose(one_block, per_group, atol=1e-4)


def test_sparsegpt_dead_inputs_and_blocks():
    w, x = _layer_problem(cols=48)
    x[:, 5] = 0.0  # an input feature never active: zero Hessian diagonal
    acc = HessianAccumulator(48)
    acc.add(x)
    out = sparsegpt_prune_layer(w, acc.hessian, pattern="2:4", blocksize=18)  # rounded down to 16: groups intact
    assert torch.isfinite(out).all() and (out[:, 5] == 0).all()
    assert ((out.reshape(32, -1, 4) == 0).sum(-1) == 2).all()


@pytest.mark.parametrize("bad", ["2-4", "a:b", "5:4", "0:4", "4:4", ":4", "2:4:8"])
def test_bad_pattern(bad):
    with pytest.raises(PruneError, match="1 <= N < M"):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), "half"])
def test_bad_sparsity(tiny, bad):
    with pytest.raises(PruneError, match="sparsity"):
        prune_model(copy.deepcopy(tiny[0]), "magnitude", sparsity=bad)


def test_bad_requests(tiny, calib):
    model = copy.deepcopy(tiny[0])
    with pytest.raises(PruneError, match=r"M=5 does not divide the input width 64 of model.layers.0.self_attn"):
        prune_model(model, "magnitude", pattern="3:5")
    with pytest.raises(PruneError, match="needs calibration data"):
        prune_model(model, "wanda", sparsity=0.5)
    with pytest.raises(PruneError, match="needs calibration data"):
        prune_model(model, "sparsegpt", pattern="2:4", calib_batches=[torch.zeros(0, 8, dtype=torch.long)])
    with pytest.raises(PruneError, match="exactly one"):
        prune_model(model, "magnitude", sparsity=0.5, pattern="2:4")
    with pytest.raises(PruneError, match="valid: magnitude, wanda, sparsegpt"):
        prune_model(model, "obs", sparsity=0.5)
    assert model.model.layers[0].self_attn.q_proj.weight.ne(0).all()  # nothing touched by a rejected request


def test_embeddings_and_tied_lm_head(tiny, calib):
    model, report = pruned_copy(tiny, "wanda", calib, pattern="2:4", include_lm_head=True)
    emb = model.get_input_embeddings().weight
    assert "lm_head" in report.per_layer and report.settings["tied_embeddings"]
    assert ((emb.reshape(emb.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # tied: the same tensor (padding row: 4)
    model, report = pruned_copy(tiny, "magnitude", None, sparsity=0.5, include_embeddings=True)
    assert report.per_layer["model.embed_tokens"] == pytest.approx(0.5)


def test_nmpattern():
    assert parse_pattern(" 4 : 8 ") == NMPattern(4, 8) and str(NMPattern(1, 4)) == "1:4"
    assert NMPattern(3, 4).sparsity == 0.25 and NMPattern(1, 4).sparsity == 0.75


def _q_inputs(model, layer, calib):
    """Inputs of ``layer``'s q_proj over the calibration batches, real tokens only."""
    q = model.model.layers[layer].self_attn.q_proj
    seen = []
    handle = q.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in calib:
            ids = b["input_ids"] if isinstance(b, dict) else b
            mask = b["attention_mask"] if isinstance(b, dict) else torch.ones_like(ids)
            model(input_ids=ids, attention_mask=mask)
            seen[-1] = seen[-1][mask.bool()]
    handle.remove()
    return torch.cat(seen)


def test_calibration_is_sequential(tiny, calib):
    """Layer 1 is calibrated on the outputs of the already pruned layer 0, not of the dense one."""
    pruned, _ = pruned_copy(tiny, "wanda", calib, sparsity=0.5)
    half = copy.deepcopy(tiny[0])
    half.model.layers[0].load_state_dict(pruned.model.layers[0].state_dict())  # only layer 0 pruned
    q1 = tiny[0].model.layers[1].self_attn.q_proj.weight
    got = pruned.model.layers[1].self_attn.q_proj.weight == 0
    sequential = wanda_mask(q1, _q_inputs(half, 1, calib).pow(2).sum(0).sqrt(), sparsity=0.5)
    dense = wanda_mask(q1, _q_inputs(tiny[0], 1, calib).pow(2).sum(0).sqrt(), sparsity=0.5)
    assert torch.equal(got, sequential) and not torch.equal(got, dense)
