"""Sequential layer-by-layer calibration: the inputs of decoder layer l+1 are computed with layer l pruned.

As in the SparseGPT and Wanda reference procedures: run the model once up to the first decoder layer and keep
that layer's inputs (hidden states plus the keyword arguments the model passes: causal mask, rotary
embeddings, ...). Then for each layer: hook every ``nn.Linear`` inside it to accumulate input statistics over
all calibration batches, prune those linears, and run the (now pruned) layer again to produce the inputs of
the next layer. Only real tokens (``attention_mask == 1``) enter the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

from torch import Tensor, nn

from mixroute.arch import Reached, reading_layer_inputs
from mixroute.prune.masks import PruneError
from mixroute.prune.sparsegpt import HessianAccumulator

Batch = Union[Tensor, dict]


@dataclass
class LayerInput:
    """One calibration batch as seen by a decoder layer."""

    args: tuple
    kwargs: dict
    token_mask: Optional[Tensor]  # (B, T) bool, True on real tokens; None = all real
    per_layer_kwargs: dict[int, dict] = field(default_factory=dict)  # layer index -> its keyword arguments

    @property
    def hidden(self) -> Tensor:
        return self.args[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``mixroute.arch.decoder_layers``: the one place that finds them)."""
    from mixroute.arch import ArchitectureError
    from mixroute.arch import decoder_layers as find_layers

    try:
        return find_layers(model)
    except ArchitectureError as e:
        raise PruneError(str(e)) from None


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder layer, by its name relative to the layer."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def as_batch(batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
    """(input_ids, attention_mask) from a LongTensor of ids or a dict holding them."""
    if isinstance(batch, Tensor):
        ids, mask = batch, None
    elif isinstance(batch, dict) and "input_ids" in batch:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise PruneError(f"a calibration batch must be a LongTensor of input_ids or a dict with 'input_ids'; got "
                         f"{type(batch).__name__}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        mask = None if mask is None else mask.reshape(1, -1)
    return ids, mask


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[Batch]) -> list[LayerInput]:
    """Run the decoder once per batch; keep the first layer's inputs and every layer's own keyword arguments.

    Per-layer keyword arguments matter for models whose layers get different masks (sliding-window layers);
    ``LayerInput.per_layer_kwargs[l]`` holds what layer l was called with.
    """
    captured: list[LayerInput] = []
    current: dict[str, Any] = {}

    def read(index: int, args: tuple, kwargs: dict) -> None:
        if index == 0:
            captured.append(LayerInput(args, kwargs, current["mask"], {}))
        captured[-1].per_layer_kwargs[index] = kwargs
        if index == len(layers) - 1:
            raise Reached  # nothing after the last layer is needed

    with reading_layer_inputs(model, read):
        _run_until_hooks(model, batches, current)
    return captured


def _run_until_hooks(model: nn.Module, batches: Iterable[Any], current: dict) -> None:
    """Feed every non-empty batch to ``model`` (its token mask in ``current["mask"]`` for the hooks); a hook
    raising ``Reached`` ends that batch's forward early."""
    device = next(model.parameters()).device
    for batch in batches:
        ids, mask = as_batch(batch)
        if ids.numel() == 0:
            continue
        current["mask"] = None if mask is None else mask.to(device).bool()
        try:
            model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                  use_cache=False)
        except Reached:
            pass


def use_layer(inputs: list[LayerInput], index: int) -> None:
    """Point each input's keyword arguments at those layer ``index`` is called with."""
    for inp in inputs:
        inp.kwargs = inp.per_layer_kwargs.get(index, inp.kwargs)


def collect_stats(modules: dict[str, nn.Linear], run: Callable[[LayerInput], Any], inputs: list[LayerInput],
                  hessian: bool) -> dict[str, HessianAccumulator]:
    """Accumulate input statistics of ``modules`` while ``run`` executes each calibration input."""
    stats = {name: HessianAccumulator(mod.in_features, hessian, mod.weight.device) for name, mod in modules.items()}
    current: dict[str, Optional[Tensor]] = {"mask": None}

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0]
            mask = current["mask"]
            stats[name].add(x[mask] if mask is not None and mask.shape == x.shape[:-1] else x)
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in modules.items()]
    try:
        for inp in inputs:
            current["mask"] = inp.token_mask
            run(inp)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def run_layer(layer: nn.Module, inp: LayerInput) -> Tensor:
    """The output hidden states of a decoder layer (older transformers return a tuple)."""
    out = layer(*inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def advance(layer: nn.Module, inputs: list[LayerInput]) -> None:
    """Replace each input's hidden states by the layer's output: the next layer's inputs."""
    for inp in inputs:
        inp.args = (run_layer(layer, inp), *inp.args[1:])


def final_inputs_stats(model: nn.Module, head: nn.Linear, batches: Iterable[Batch],
                       hessian: bool) -> HessianAccumulator:
    """Input statistics of the LM head (final normed hidden states), stopping before the logits are computed."""
    stats = HessianAccumulator(head.in_features, hessian, head.weight.device)
    current: dict[str, Optional[Tensor]] = {"mask": None}

    def hook(_module, args):
        x = args[0]
        mask = current["mask"]
        stats.add(x[mask] if mask is not None and mask.shape == x.shape[:-1] else x)
        raise Reached

    handle = head.register_forward_pre_hook(hook)
    try:
        _run_until_hooks(model, batches, current)
    finally:
        handle.remove()
    return stats
