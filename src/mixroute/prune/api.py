"""`prune_model`: prune every nn.Linear of the decoder blocks (optionally the embeddings / LM head) in place."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
from torch import Tensor, nn

from mixroute.prune.calibrate import Batch, advance, as_batch, capture_layer_inputs, collect_stats, \
    decoder_layers, final_inputs_stats, linear_modules, run_layer, use_layer
from mixroute.prune.masks import NM_CONVENTION, NMPattern, PatternLike, PruneError, check_nm_width, \
    prune_magnitude, prune_wanda, resolve_target
from mixroute.prune.sparsegpt import HessianAccumulator, sparsegpt_prune_layer
from mixroute.progress import steps

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneReport:
    """What was pruned and how sparse it came out (written as prune_report.json beside the model)."""

    method: str
    sparsity: Optional[float]  # unstructured target (None for N:M)
    pattern: Optional[str]  # "N:M" (None for unstructured)
    convention: str
    target_sparsity: float
    overall_sparsity: float  # zeros / weights over every pruned tensor
    per_layer: dict[str, float]  # module name -> achieved sparsity
    pruned_weights: int  # weights in the pruned tensors
    model_sparsity: float  # zeros / all parameters of the model (embeddings, norms included)
    calibration: dict = field(default_factory=dict)  # batches, tokens, source, samples, seq_len
    settings: dict = field(default_factory=dict)  # blocksize, percdamp, include_embeddings, include_lm_head
    ppl_before: Optional[float] = None
    ppl_after: Optional[float] = None
    eval: dict = field(default_factory=dict)  # split, examples, tokens of the perplexity evaluation
    wall_time_s: float = 0.0  # pruning only (not loading, evaluation or saving)
    model: str = ""  # where the base model came from

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise PruneError(f"method {method!r} is unknown; valid: {', '.join(METHODS)}")
    return method


def prune_targets(model: nn.Module, include_embeddings: bool = False,
                  include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Name -> module to prune: every nn.Linear of the decoder layers, plus the embedding / LM head if asked.

    With tied input/output embeddings one tensor serves both; it is listed once, as the LM head when
    ``include_lm_head`` (pruned with the chosen method) and otherwise as the embedding (magnitude).
    """
    names = {id(mod): name for name, mod in model.named_modules()}
    targets: dict[str, nn.Module] = {}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb is not None and head is not None and emb.weight is head.weight
    if include_embeddings and emb is not None and not (tied and include_lm_head):
        targets[names[id(emb)]] = emb
    for layer in decoder_layers(model):
        for mod in linear_modules(layer).values():
            targets[names[id(mod)]] = mod
    if include_lm_head and head is not None:
        targets[names[id(head)]] = head
    return targets


def _check_widths(targets: dict[str, nn.Module], pattern: Optional[NMPattern]) -> None:
    if pattern is not None:
        for name, mod in targets.items():
            check_nm_width(pattern, mod.weight.shape[1], name)


def _set_weight(mod: nn.Module, new: Tensor) -> None:
    mod.weight.data.copy_(new)


def _prune_with_stats(mod: nn.Linear, stats: HessianAccumulator, method: str, sparsity: Optional[float],
                      pattern: Optional[NMPattern], blocksize: int, percdamp: float) -> None:
    if method == "wanda":
        _set_weight(mod, prune_wanda(mod.weight.data, stats.act_norm, sparsity, pattern))
    else:
        _set_weight(mod, sparsegpt_prune_layer(mod.weight.data, stats.hessian, sparsity, pattern, blocksize,
                                               percdamp))


def _prune_sequential(model: nn.Module, batches: list[Batch], method: str, sparsity: Optional[float],
                      pattern: Optional[NMPattern], blocksize: int, percdamp: float, progress: bool) -> None:
    """Wanda / SparseGPT: calibrate and prune one decoder layer at a time on the pruned model's activations."""
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, batches)
    with steps(f"{method} layers", len(layers), progress) as tick:
        for index, layer in enumerate(layers):
            use_layer(inputs, index)
            modules = linear_modules(layer)
            stats = collect_stats(modules, lambda inp: run_layer(layer, inp), inputs, hessian=method == "sparsegpt")
            for name, mod in modules.items():
                _prune_with_stats(mod, stats[name], method, sparsity, pattern, blocksize, percdamp)
            advance(layer, inputs)
            tick()


def _prune_magnitude_layers(model: nn.Module, sparsity: Optional[float], pattern: Optional[NMPattern],
                            progress: bool) -> None:
    layers = decoder_layers(model)
    with steps("magnitude layers", len(layers), progress) as tick:
        for layer in layers:
            for mod in linear_modules(layer).values():
                _set_weight(mod, prune_magnitude(mod.weight.data, sparsity, pattern))
            tick()


def _calibration(batches: Optional[Iterable[Batch]], method: str) -> tuple[list[Batch], int]:
    batches = list(batches or [])
    tokens = 0
    for batch in batches:
        ids, mask = as_batch(batch)
        tokens += int(ids.numel() if mask is None else mask.sum())
    if method != "magnitude" and tokens == 0:
        raise PruneError(f"method {method!r} needs calibration data (its layer statistics come from activations) "
                         "but the calibration batches hold no tokens; give a non-empty data source, or use "
                         "method 'magnitude'")
    return batches, tokens


def prune_model(model: nn.Module, method: Method, sparsity: Optional[float] = None,
                pattern: Optional[PatternLike] = None, calib_batches: Optional[Iterable[Batch]] = None, *,
                include_embeddings: bool = False, include_lm_head: bool = False, blocksize: int = 128,
                percdamp: float = 0.01, progress: bool = False) -> PruneReport:
    """Prune ``model`` in place and report the achieved sparsity.

    Args:
        method: ``magnitude`` (|W|, no data), ``wanda`` (|W| * ||X_j||, per output row) or ``sparsegpt``
            (OBS reconstruction with weight updates); the last two calibrate layer by layer on
            ``calib_batches`` (LongTensors of input_ids or dicts with input_ids / attention_mask).
        sparsity: unstructured fraction of weights to prune, in (0, 1). Exclusive with ``pattern``.
        pattern: ``"N:M"``: keep N of every M consecutive input weights of each output row.
        include_embeddings: also prune the input embedding table (magnitude; N:M groups along the hidden dim).
        include_lm_head: also prune the LM head with ``method`` (with tied embeddings this prunes both).
        blocksize, percdamp: SparseGPT column block size and Hessian dampening (fraction of mean diagonal).
        progress: show a progress bar over layers.
    """
    method = check_method(method)
    sparsity, pat = resolve_target(sparsity, pattern)
    targets = prune_targets(model, include_embeddings, include_lm_head)
    _check_widths(targets, pat)
    batches, tokens = _calibration(calib_batches, method)
    head = model.get_output_embeddings()
    start = time.perf_counter()
    with torch.no_grad():
        emb = model.get_input_embeddings()
        if emb in targets.values():  # magnitude: an embedding row has no input activation to weigh it by
            _set_weight(emb, prune_magnitude(emb.weight.data, sparsity, pat))
        if method == "magnitude":
            _prune_magnitude_layers(model, sparsity, pat, progress)
        else:
            _prune_sequential(model, batches, method, sparsity, pat, blocksize, percdamp, progress)
        if include_lm_head and head in targets.values():
            if method == "magnitude":
                _set_weight(head, prune_magnitude(head.weight.data, sparsity, pat))
            else:
                stats = final_inputs_stats(model, head, batches, hessian=method == "sparsegpt")
                _prune_with_stats(head, stats, method, sparsity, pat, blocksize, percdamp)
    elapsed = time.perf_counter() - start
    return _report(model, targets, method, sparsity, pat, elapsed,
                   calibration={"batches": len(batches), "tokens": tokens},
                   settings={"blocksize": blocksize, "percdamp": percdamp, "include_embeddings": include_embeddings,
                             "include_lm_head": include_lm_head, "sequential": method != "magnitude",
                             "tied_embeddings": _tied(model)})


def sparsity_of(tensor: Tensor) -> float:
    return float((tensor == 0).sum()) / max(tensor.numel(), 1)


def _report(model: nn.Module, targets: dict[str, nn.Module], method: str, sparsity: Optional[float],
            pat: Optional[NMPattern], elapsed: float, calibration: dict, settings: dict) -> PruneReport:
    per_layer = {name: sparsity_of(mod.weight) for name, mod in targets.items()}
    zeros = sum(int((mod.weight == 0).sum()) for mod in targets.values())
    total = sum(mod.weight.numel() for mod in targets.values())
    params = {id(p): p for p in model.parameters()}.values()  # tied tensors once
    model_zeros = sum(int((p == 0).sum()) for p in params)
    model_total = sum(p.numel() for p in params)
    return PruneReport(
        method=method, sparsity=sparsity, pattern=None if pat is None else str(pat), convention=NM_CONVENTION,
        target_sparsity=pat.sparsity if pat is not None else float(sparsity), overall_sparsity=zeros / total,
        per_layer=per_layer, pruned_weights=total, model_sparsity=model_zeros / model_total,
        calibration=calibration, settings=settings, wall_time_s=round(elapsed, 3))


def _tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return emb is not None and head is not None and emb.weight is head.weight
