"""What a causal LM is made of, for the parts of mixroute that reach inside it (docs/models.md).

One owner for "which modules": the decoder layers (and their path in the model, which is also PEFT's module key
prefix), the attention module of a layer, the projections that get LoRA experts (``resolve_targets``), and how
the model encodes positions (what prompt experts need). Families differ in names (``model.layers`` /
``transformer.h`` / ``model.decoder.layers``; ``self_attn`` / ``attn`` / ``attention``), in fused projections
(Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) and in layer types (GPT-2's ``Conv1D``
stores its weight as (in, out)). Where PEFT or transformers know an answer we ask them: PEFT's linear layer
types and ``all-linear`` resolution, PEFT's per-architecture default targets, transformers' ``get_decoder`` and
``_supports_attention_backend``. A layer of an unknown shape is an error that names what is missing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from mixroute.config import ConfigError

ALL_LINEAR = "all-linear"      # PEFT's shorthand (peft.tuners.tuners_utils.INCLUDE_LINEAR_LAYERS_SHORTHAND)
PEFT_DEFAULT = "peft-default"  # PEFT's default LoRA targets for the model's architecture

# transformers has no accessor for the list of decoder blocks; these attribute names cover the families it
# ships (Llama-likes, OPT, GPT-NeoX, Phi: layers; GPT-2, Falcon, Bloom: h)
_LAYER_LISTS = ("layers", "h", "blocks", "block")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
# decoders that number positions from the attention mask (padding-aware) when given no position_ids, where the
# others count 0..T-1: the prompt experts' position shift must start from the same numbers
_POSITIONS_FROM_MASK = {"opt"}

PositionStyle = Literal["rotary", "absolute", "alibi", "unknown"]


class ArchitectureError(ConfigError):
    """The model lacks a part mixroute needs, or a requested target; the message names the architecture, what is
    missing and what the model has instead."""


def family(model: nn.Module) -> str:
    """``ArchitectureClass (model_type)``, how errors name a model."""
    return f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (transformers' ``get_decoder``: ``model.model``, ``transformer``, ``model.decoder``)."""
    if not hasattr(model, "get_decoder"):
        raise ArchitectureError(f"{type(model).__name__} is not a Hugging Face causal LM (no get_decoder())")
    return model.get_decoder()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order (``model.layers``, ``transformer.h``, ``model.decoder.layers``, ...)."""
    dec = decoder(model)
    for name in _LAYER_LISTS:
        layers = getattr(dec, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    depth = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in dec.children() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(lists) == 1:
        return lists[0]
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in dec.named_children())
    raise ArchitectureError(f"cannot find the decoder layers of {family(model)}: its decoder "
                            f"{type(dec).__name__} has no ModuleList named {', '.join(_LAYER_LISTS)} (nor one "
                            f"of num_hidden_layers={depth} blocks); its children: {children}")


def layers_path(model: nn.Module) -> str:
    """The decoder layers' module name in ``model`` (``model.layers``): the prefix of PEFT's module keys."""
    layers = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is layers)


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention module of one decoder layer (``self_attn``, ``attn``, ``attention``, ...)."""
    for name in _ATTENTION_NAMES:
        m = getattr(layer, name, None)
        if isinstance(m, nn.Module):
            return m
    found = [m for m in layer.children() if type(m).__name__.endswith("Attention")]
    if len(found) == 1:
        return found[0]
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children())
    raise ArchitectureError(f"cannot find the attention module of {type(layer).__name__}: no child named "
                            f"{', '.join(_ATTENTION_NAMES)} or of a class ending in 'Attention'; its children: "
                            f"{children}")


# the projections that read a normalised copy of the residual stream, per part of a decoder layer, and the norm
# that feeds them (Llama-family names: Arrow's prototypes live in those projections' input space)
Part = Literal["attention", "mlp"]
_NORMALISED_INPUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "attention": (("q_proj", "k_proj", "v_proj"), "input_layernorm"),
    "mlp": (("gate_proj", "up_proj"), "post_attention_layernorm"),
}


def input_part(module_name: str) -> Optional[Part]:
    """``attention`` / ``mlp`` when the projection ``module_name`` (``model.layers.3.self_attn.q_proj``) reads the
    normalised input of its layer's attention / MLP, else None."""
    last = module_name.rsplit(".", 1)[-1]
    return next((part for part, (names, _) in _NORMALISED_INPUTS.items() if last in names), None)


def input_norm(layer: nn.Module, part: Part) -> Optional[nn.Module]:
    """The norm whose output the ``part`` projections of decoder layer ``layer`` read; None where it has none."""
    return getattr(layer, _NORMALISED_INPUTS[part][1], None)


def linear_types() -> tuple[type, ...]:
    """The layer types PEFT's LoRA and its all-linear resolution take: ``nn.Linear`` and GPT-2's ``Conv1D``
    (imported here, not at module level: transformers costs half a second to import)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def lm_head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """The LM head on ``hidden`` as the model's own forward applies it: with Gemma-2's final logit soft-capping
    (``cap * tanh(logits / cap)``), which a loss computed from the head alone would skip."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer; ``Conv1D`` stores its weight transposed, (in, out)."""
    if not isinstance(module, nn.Linear):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out, in), whatever its storage (GPT-2's ``Conv1D`` keeps (in, out))."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def position_style(model: nn.Module) -> PositionStyle:
    """How the model encodes positions: ``rotary`` (a shared ``rotary_emb`` on the decoder), ``absolute`` (a
    learned position embedding added to the input, GPT-2 / OPT), ``alibi`` (distance biases in the attention
    scores) or ``unknown``."""
    conf, dec = model.config, decoder(model)
    if getattr(conf, "alibi", False) or getattr(conf, "position_embedding_type", None) == "alibi":
        return "alibi"
    if isinstance(getattr(dec, "rotary_emb", None), nn.Module):
        return "rotary"
    inputs = model.get_input_embeddings()
    if any(isinstance(m, nn.Embedding) and m is not inputs for m in dec.children()):
        return "absolute"
    return "unknown"


def positions_from_mask(model: nn.Module) -> bool:
    """True where the decoder numbers positions from the attention mask when given no ``position_ids``."""
    return getattr(model.config, "model_type", None) in _POSITIONS_FROM_MASK


@dataclass(frozen=True)
class Target:
    """One projection that gets LoRA experts."""

    layer: int          # decoder layer index
    name: str           # relative to the layer, e.g. "self_attn.q_proj", "attn.c_attn"
    path: str           # module name in the model, e.g. "model.layers.0.self_attn.q_proj" (PEFT's key)
    module: nn.Module   # an nn.Linear or a transformers Conv1D


def projections(model: nn.Module) -> list[list[Target]]:
    """Every linear layer (``nn.Linear`` or ``Conv1D``, what PEFT's LoRA takes) of every decoder layer."""
    prefix, types = layers_path(model), linear_types()
    return [[Target(i, n, f"{prefix}.{i}.{n}", m) for n, m in layer.named_modules() if isinstance(m, types)]
            for i, layer in enumerate(decoder_layers(model))]


def _all_linear(model: nn.Module) -> set[str]:
    """PEFT's own ``all-linear`` resolution (every linear / Conv1D but the output head), as module names."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return set(_maybe_include_all_linear_layers(LoraConfig(target_modules=ALL_LINEAR), model).target_modules)


def _matches(path: str, name: str) -> bool:
    # PEFT's rule for a list of target names (check_target_module_exists): the whole key or a dotted suffix
    return path == name or path.endswith(f".{name}")


def peft_default_targets(model: nn.Module) -> list[str] | None:
    """PEFT's default LoRA targets for this architecture (None where PEFT has no entry)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    return PEFT_TARGETS.get(getattr(model.config, "model_type", None))


def resolve_targets(model: nn.Module, requested: Sequence[str] | str, mlp_only: bool = False,
                    allow_partial: bool = False) -> list[list[Target]]:
    """The projections of each decoder layer that get LoRA experts.

    ``requested``: names matched as PEFT does (a module's whole name or a dotted suffix: ``q_proj``,
    ``mlp.c_proj``), or one keyword: ``all-linear`` (every linear layer of the decoder layers, PEFT's
    resolution) or ``peft-default`` (PEFT's default targets for the architecture). ``mlp_only`` keeps the
    projections outside the attention module. A name that matches nothing in some layer is an error naming the
    architecture, the missing names and the layer's projections, unless ``allow_partial`` (then only a layer
    left with no projection at all is an error).
    """
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"mixture.experts.lora.target_modules: {requested!r} must be a non-empty list of module "
                          f"names, or [{ALL_LINEAR}] / [{PEFT_DEFAULT}]")
    keywords = [n for n in names if n in (ALL_LINEAR, PEFT_DEFAULT)]
    if keywords and len(names) > 1:
        raise ConfigError(f"mixture.experts.lora.target_modules: {keywords[0]!r} stands alone; got {names}")
    per_layer = projections(model)
    if keywords == [PEFT_DEFAULT]:
        names = peft_default_targets(model)
        if names is None:
            raise ArchitectureError(f"mixture.experts.lora.target_modules=[{PEFT_DEFAULT}]: PEFT has no default "
                                    f"targets for {family(model)}; use [{ALL_LINEAR}] or name the projections: "
                                    f"{', '.join(t.name for t in per_layer[0])}")
    if keywords == [ALL_LINEAR]:
        chosen = _all_linear(model)
        found = [[t for t in layer if t.path in chosen] for layer in per_layer]
    else:
        found = [[t for t in layer if any(_matches(t.path, n) for n in names)] for layer in per_layer]
        for i, layer in enumerate(per_layer):
            missing = [n for n in names if not any(_matches(t.path, n) for t in layer)]
            if missing and not allow_partial:
                raise ArchitectureError(
                    f"mixture.experts.lora.target_modules: {family(model)} has no {', '.join(missing)} in decoder "
                    f"layer {i}; "
                    f"its projections there are {', '.join(t.name for t in layer)}. Name some of those, use "
                    f"[{ALL_LINEAR}], or set mixture.experts.lora.allow_partial=true to attach to the "
                    f"{len(found[i])} that match")
    if mlp_only:
        layers = decoder_layers(model)
        found = [[t for t in ts if not _inside(t.module, attention_module(layers[i]))] for i, ts in enumerate(found)]
    for i, ts in enumerate(found):
        if not ts:
            which = "MLP projections (mlp_only)" if mlp_only else "projections"
            raise ArchitectureError(f"mixture.experts.lora.target_modules={names}: decoder layer {i} of "
                                    f"{family(model)} gets no {which}; its projections are "
                                    f"{', '.join(t.name for t in per_layer[i])}")
    return found


def _inside(module: nn.Module, parent: nn.Module) -> bool:
    return any(m is module for m in parent.modules())


def describe(model: nn.Module, requested: Sequence[str] | str = (ALL_LINEAR,)) -> dict:
    """What mixroute sees in a model: decoder layers, attention, positions, and the LoRA targets ``requested``
    resolves to (the default is every projection), for ``mixroute model info``."""
    def attempt(part):  # a part that cannot be read shows its error; the rest of the description still helps
        try:
            return part()
        except ArchitectureError as e:
            return f"error: {e}"

    layers = attempt(lambda: decoder_layers(model))
    if isinstance(layers, str):
        return {"decoder layers": layers}
    backend = getattr(type(model), "_supports_attention_backend", False)
    peft = peft_default_targets(model)
    return {
        "decoder layers": f"{layers_path(model)} ({len(layers)} x {type(layers[0]).__name__})",
        "attention": attempt(lambda: f"{type(attention_module(layers[0])).__name__} ("
                                     f"{'through' if backend else 'not through'} transformers' attention interface)"),
        "positions": position_style(model),
        "LoRA targets": attempt(lambda: ", ".join(t.name for t in resolve_targets(model, requested)[0])),
        "LoRA targets (mlp_only)": attempt(lambda: ", ".join(
            t.name for t in resolve_targets(model, requested, mlp_only=True)[0])),
        "PEFT default targets": ", ".join(peft) if peft else "none (PEFT has no entry)",
        "prompt experts": prompt_support(model) or "supported",
    }


def prompt_support(model: nn.Module) -> str | None:
    """Why prompt experts (MoP) cannot run on this model, or None when they can.

    The prompt bank adds K/V columns inside the attention computation, which transformers exposes only to
    models that call its attention interface, and places prompts by position (rotary or absolute)."""
    if not getattr(type(model), "_supports_attention_backend", False):
        return (f"{family(model)} computes attention itself, not through transformers' attention interface "
                "(_supports_attention_backend is False), so the prompt keys and values cannot be added")
    style = position_style(model)
    if style == "alibi":
        return f"{family(model)} encodes positions as ALiBi distance biases, which prompt columns do not have"
    if style == "unknown":
        return (f"cannot tell how {family(model)} encodes positions: its decoder has no shared rotary_emb "
                "and no position embedding")
    return None


class Reached(Exception):
    """Raised by a forward pre-hook to stop a forward once what it needs has been reached: what a router reads
    is below the layers that would follow."""


LayerRead = Callable[[int, tuple, dict], None]


@contextmanager
def reading_layer_inputs(model: nn.Module, read: LayerRead, layers: Optional[Iterable[int]] = None) -> Iterator[None]:
    """Inside the block, every forward through decoder layer ``i`` (of ``layers``; default all) first calls
    ``read(i, args, kwargs)`` with what the layer is called with: ``args[0]`` the hidden states entering it
    (moved there when the model passes them as ``hidden_states=``), ``kwargs`` the rest (attention mask,
    position embeddings, ...). ``read`` may raise ``Reached`` to stop the forward; the caller catches it."""
    blocks = decoder_layers(model)

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states", None)
            read(i, args if hidden is None else (hidden, *args), kwargs)
        return hook

    # first in line: the layer's other pre-hooks (a mixture's router hooks) have not run yet when it stops
    handles = [blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True, prepend=True)
               for i in (range(len(blocks)) if layers is None else layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_input(model: nn.Module, layer: int, args: tuple = (), kwargs: Optional[dict] = None) -> Tensor:
    """The hidden states entering decoder layer ``layer`` for a call ``decoder(*args, **kwargs)``, computed
    without a KV cache and without running the layers above it. Whatever is patched into the model runs as
    it is (a mixture's experts read ``RoutingContext.in_prepass``)."""
    kwargs = dict(kwargs or {})
    kwargs["past_key_values"], kwargs["use_cache"] = None, False
    got: list[Tensor] = []

    def grab(i: int, a: tuple, kw: dict) -> None:
        got.append(a[0])
        raise Reached

    with reading_layer_inputs(model, grab, [layer]):
        try:
            decoder(model)(*args, **kwargs)
        except Reached:
            pass
    if not got:
        raise RuntimeError(f"decoder layer {layer} was not reached")
    return got[0]
