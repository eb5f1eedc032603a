"""Prompt experts (MoP, Dun et al. 2023): E blocks of L trainable virtual tokens injected at decoder layer m.

Design (docs/mop.md). Prompt tokens sit before the input and attend only to prompt tokens, so their keys and
values at every layer >= m do not depend on the input. Each forward therefore runs the E*L prompt tokens once,
batch-independently, through layers m..N-1 as their own tiny sequence (block-diagonal causal mask: every
expert's block sees only itself) and keeps each layer's K/V. Input tokens then attend to those K/V as extra
columns placed before their own, with ``log(g_e)`` (the gate, ``routers/gate.py``) added to the attention logits
of expert e's columns. The weights g come from the mixture's router (an ordinary router, ``routers/``, run at
its read layer by ``Mixture``; MoP's is the ``gate``): the bank reads them from the routing context. Layers
below m never see the prompts. With E=1, m=0 and g=1 this is exactly PEFT prompt
tuning: there the virtual tokens are prepended embeddings that attend causally among themselves.

Positions: each expert's block holds positions 0..L-1 and input tokens are shifted by L (L..L+T-1), as in
PEFT prompt tuning at m=0, in every family. With rotary embeddings (Llama-likes, Phi, GPT-NeoX) the prompt pass
rotates the prompts' keys at 0..L-1 and the shift is applied at every layer; RoPE only sees position
differences, so layers below m are unaffected. With absolute position embeddings (GPT-2, OPT: added to the
input, ``mixroute.arch.position_style``) the prompts are hidden states that already carry their positions
(``init_prompts`` computes them at 0..L-1, training keeps them free), and the input's embedding positions start
at L. ALiBi models and models whose attention bypasses transformers' attention interface (Falcon, Bloom) are
refused at attach, with the reason (``mixroute.arch.prompt_support``).

Hooking transformers (5.x): the attention of a registered implementation ``mixroute_mop_<sdpa|eager>`` wraps the
model's own one (transformers has no hook that adds K/V columns); a decoder pre-hook shifts ``position_ids`` and
runs the prompt pass (before ``output_hidden_states`` recording starts). The prompt K/V are computed at the
prefill (and at every forward with gradients) and reused by decode steps.
"""

from __future__ import annotations

import sys
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import Tensor, nn

from mixroute.arch import (attention_module, decoder, decoder_layers, layer_input, position_style,
                           positions_from_mask, prompt_support)
from mixroute.config import ConfigError, MixtureConfig, f
from mixroute.experts.base import ExpertKind


@dataclass
class PromptExpertConfig:
    """The settings of prompt experts (MoP): ``mixture.experts.prompt``."""

    num_virtual_tokens: int = f(10, "Prompt tokens per expert (L).", ge=1)
    inject_layer: Optional[int] = f(None, "Layer m where prompts are injected (0 = input; null = middle layer).",
                                    ge=0)
    gate_layer: Optional[int] = f(None, "Layer g whose output the router (MoP's gate) reads (null = one third of "
                                        "the depth, at most m).", ge=0)
    prompt_init: Literal["random", "text"] = f("random", "Init prompts from random vocabulary embeddings or from "
                                                       "the embeddings of prompt_init_text.")
    prompt_init_text: Optional[str] = f(None, "Text whose token embeddings initialise the prompts.")


class PromptBank(nn.Module, ExpertKind):
    """``weight`` (E, L, H): the prompt experts' virtual tokens, in the hidden-state space entering layer m.

    The prompts are read by every input token of a sequence alike, so the bank takes one decision per
    sequence: routers of these levels can drive it."""

    levels = ("sequence",)
    Config: ClassVar[type] = PromptExpertConfig
    settings_name: ClassVar[str] = "prompt"

    def __init__(self, num_experts: int, num_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_experts, self.num_tokens = num_experts, num_tokens
        self.weight = nn.Parameter(torch.zeros(num_experts, num_tokens, hidden_size))

    def expert_axes(self) -> dict[str, tuple[int, int]]:
        return {"weight": (0, 1)}


def resolve_layers(cfg: MixtureConfig, num_layers: int) -> tuple[int, int]:
    """(inject layer m, gate layer g) with defaults N//2 and N//3 (<= m); bad values name the field and range."""
    s = PromptBank.settings(cfg)
    m = num_layers // 2 if s.inject_layer is None else s.inject_layer
    if not 0 <= m < num_layers:
        raise ConfigError(f"mixture.experts.prompt.inject_layer={m} is out of range: valid 0..{num_layers - 1} (0 = "
                          f"the input layer; this model has {num_layers} decoder layers)")
    g = min(num_layers // 3, m) if s.gate_layer is None else s.gate_layer
    if not 0 <= g <= m:
        raise ConfigError(f"mixture.experts.prompt.gate_layer={g} is out of range: valid 0..{m} (the router reads the "
                          f"hidden states entering layer g and must be known at the injection layer inject_layer={m})")
    return m, g


class PromptInjector:
    """The hooks and per-forward state that connect a ``PromptBank`` to one HF model; the routing weights are
    the mixture's route ``router_key`` of the current forward."""

    def __init__(self, mix: nn.Module, bank: PromptBank, router_key: str, inject_layer: int) -> None:
        self.mix, self.bank, self.router_key, self.m = mix, bank, router_key, inject_layer
        self.dec, self.layers = decoder(mix.model), decoder_layers(mix.model)
        self.rotary = self.dec.rotary_emb if position_style(mix.model) == "rotary" else None
        self.mask_positions = positions_from_mask(mix.model)
        # layer signatures differ by family (GPT-2 takes no position arguments, GPT-NeoX calls its cache
        # layer_past): pass only what a layer declares
        self.layer_params = set(inspect.signature(type(self.layers[0]).forward).parameters)
        self.kv: Optional[dict[int, tuple[Tensor, Tensor]]] = None   # layer -> prompt (K, V), (1, Hkv, E*L, D)
        self.capture: Optional[dict] = None                           # set during the prompt pass
        self._masks: dict = {}

    # ---------------------------------------------------------------- prompt pass
    def run_prompt_layers(self, hidden: Tensor, start: int, stop: int, capture: bool) -> Tensor:
        """Run the (1, E*L, H) prompt sequence through layers start..stop-1 (block-diagonal causal mask,
        positions 0..L-1 per expert); with ``capture`` keep every layer's K/V in ``self.capture``."""
        E, L = self.bank.num_experts, self.bank.num_tokens
        pos = torch.arange(L, device=hidden.device).repeat(E).unsqueeze(0)
        blk = torch.arange(E * L, device=hidden.device) // L
        ok = (blk[:, None] == blk[None, :]) & (pos[0][:, None] >= pos[0][None, :])
        mask = torch.zeros(ok.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~ok, torch.finfo(hidden.dtype).min)[None, None]
        kwargs: dict[str, Any] = {"attention_mask": mask}
        if "position_ids" in self.layer_params:
            kwargs["position_ids"] = pos
        if "use_cache" in self.layer_params:
            kwargs["use_cache"] = False
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, pos)
        self.capture = {} if capture else None
        try:
            for i in range(start, stop):
                # .forward, not __call__: the prompt pass is not a forward of the model, so hooks on the decoder
                # layers (ours at layer g, callers capturing hidden states) must not see it
                out = self.layers[i].forward(hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden
        finally:
            self.kv = self.capture if capture else self.kv
            self.capture = None

    def init_prompts(self, token_ids: Tensor) -> None:
        """Set the prompts to the hidden states entering layer m of these E*L vocabulary tokens, each expert's
        block run by the model itself as one sequence at positions 0..L-1: at m=0 their embeddings as PEFT
        initialises them, plus whatever the family adds there (GPT-2 / OPT position embeddings, Gemma's
        embedding scale); for m>0 what layers 0..m-1 make of them."""
        E, L = self.bank.num_experts, self.bank.num_tokens
        hidden = layer_input(self.mix.model, self.m, kwargs={"input_ids": token_ids.view(E, L)})
        with torch.no_grad():
            self.bank.weight.copy_(hidden.reshape(self.bank.weight.shape))

    # ---------------------------------------------------------------- hooks
    def before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        pkv = kwargs.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self._default_positions(kwargs.get("attention_mask"), past, x.shape[1], x.device)
        kwargs["position_ids"] = pos + self.bank.num_tokens
        self._masks = {}
        # the prompts' K/V do not depend on the input: a decode step (the mixture's context says so, with or
        # without a KV cache) reuses the prefill's; anything that trains recomputes them for the gradient
        if self.mix.context.is_prefill or self.kv is None or torch.is_grad_enabled():
            w = self.bank.weight
            self.run_prompt_layers(w.reshape(1, -1, w.shape[-1]), self.m, len(self.layers), capture=True)
        return args, kwargs

    def _default_positions(self, mask: Optional[Tensor], past: int, length: int, device: torch.device) -> Tensor:
        """The positions the decoder would use without ``position_ids`` (the shift is added to these)."""
        if self.mask_positions and mask is not None and mask.dim() == 2:
            return ((mask.long().cumsum(-1) * mask.long()) - 1)[:, past:]
        return torch.arange(past, past + length, device=device).unsqueeze(0)

    # ---------------------------------------------------------------- attention
    def attend(self, base: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Optional[Tensor], **kwargs: Any) -> Any:
        """The model's attention with this layer's prompt K/V prepended and the log-gate as their bias."""
        layer = module.layer_idx
        if self.capture is not None:
            self.capture[layer] = (key, value)
            return base(module, query, key, value, attention_mask, **kwargs)
        route = self.mix.context.routes.get(self.router_key)
        if self.kv is None or layer not in self.kv or route is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        pk, pv = self.kv[layer]
        bsz = query.shape[0]
        mask = self._mask(route.weights, attention_mask, bsz, query.shape[2], key.shape[2], query.dtype,
                          query.device)
        key = torch.cat([pk.expand(bsz, -1, -1, -1).to(key.dtype), key], dim=2)
        value = torch.cat([pv.expand(bsz, -1, -1, -1).to(value.dtype), value], dim=2)
        return base(module, query, key, value, mask, **kwargs)

    def _mask(self, weights: Tensor, mask: Optional[Tensor], bsz: int, q: int, k: int, dtype: torch.dtype,
              device: torch.device) -> Tensor:
        """Additive (B, 1, Q, E*L + K) mask: log(weight) of expert e on its prompt columns (switched off where
        the weight is 0), the model's own mask on the rest. Built once per forward (every layer gets the same
        mask object)."""
        cache_key = (id(mask), bsz, q, k)
        if cache_key in self._masks:
            return self._masks[cache_key][1]
        low = torch.finfo(dtype).min
        if mask is None:       # sdpa's "is_causal" shortcut: causal over the last q of k positions
            i = torch.arange(q, device=device)[:, None] + (k - q)
            mask = torch.where(i >= torch.arange(k, device=device)[None, :], 0.0, low).to(dtype)[None, None]
        elif mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, low)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        w = weights.to(device=device, dtype=wide)
        # log of a clamped weight where it is > 0: an exact zero (top-k, one-hot) is "off", with a zero gradient
        off = torch.finfo(wide).min
        log_w = torch.where(w > 0, w.clamp_min(1e-30).log(), off).to(dtype).clamp_min(low)
        bias = log_w.repeat_interleave(self.bank.num_tokens, -1)
        full = torch.cat([bias[:, None, None, :].expand(bsz, 1, q, -1), mask.to(dtype).expand(bsz, 1, q, k)], -1)
        self._masks[cache_key] = (mask, full)   # keep ``mask`` alive so its id stays unique this forward
        return full


def _base_attention(impl: str, module: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _register_attention(impl: str) -> str:
    """Register ``mixroute_mop_<impl>``: the model's attention + mask functions, routed through the injector
    that ``install_prompt_experts`` put on each attention module (plain pass-through where there is none)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if impl not in ("sdpa", "eager"):
        raise ValueError(f"prompt experts need attn_implementation 'sdpa' or 'eager' (the model uses {impl!r}); "
                         "load the model with attn_implementation='sdpa'")
    name = f"mixroute_mop_{impl}"

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  **kwargs: Any) -> Any:
        base = _base_attention(impl, module)
        inj = getattr(module, "_mixroute_mop", None)
        if inj is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        return inj.attend(base, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


class _Uninstall:
    """A hook-like handle (``remove()``) that ``Mixture.detach`` calls: restores attention and module attrs."""

    def __init__(self, config: Any, impl: str, attns: list[nn.Module]) -> None:
        self.config, self.impl, self.attns = config, impl, attns

    def remove(self) -> None:
        self.config._attn_implementation = self.impl
        for a in self.attns:
            a.__dict__.pop("_mixroute_mop", None)


def _init_token_ids(mix: nn.Module, cfg: MixtureConfig, total: int, tokenizer: Any) -> Tensor:
    """E*L token ids to initialise from: random vocabulary ids, or the init text repeated/trimmed (as PEFT)."""
    emb = mix.model.get_input_embeddings()
    s = PromptBank.settings(cfg)
    if s.prompt_init == "random":
        return torch.randint(0, emb.num_embeddings, (total,), device=emb.weight.device)
    if not s.prompt_init_text:
        raise ValueError("mixture.experts.prompt.prompt_init='text' needs mixture.experts.prompt.prompt_init_text "
                         "(the text to start from)")
    if tokenizer is None:
        from mixroute.models import embedded_tokenizer

        tokenizer = embedded_tokenizer()
        if len(tokenizer) != emb.num_embeddings:
            raise ValueError("mixture.experts.prompt.prompt_init='text': no tokenizer for this model; pass "
                             "tokenizer= to install_prompt_experts or use prompt_init='random'")
    ids = tokenizer(s.prompt_init_text)["input_ids"]
    if not ids:
        raise ValueError("mixture.experts.prompt.prompt_init_text tokenizes to nothing")
    ids = (ids * (total // len(ids) + 1))[:total]
    return torch.tensor(ids, dtype=torch.long, device=emb.weight.device)


def install_prompt_experts(mix: nn.Module, cfg: MixtureConfig, num_experts: int, router_key: str,
                           tokenizer: Any = None) -> int:
    """Called by ``Mixture.attach`` for ``expert='prompt'``: registers ``experts['prompt']`` (a ``PromptBank``)
    and its hooks (removed by ``mix.detach()``); the bank reads route ``router_key``. Returns the layer whose
    input the router must read (``gate_layer``)."""
    model = mix.model
    conf = model.config
    why = prompt_support(model)
    if why is not None:
        raise ConfigError(f"mixture.expert='prompt' cannot run on this model: {why}. LoRA experts work on it "
                          "(mixture.expert=lora); docs/models.md lists the families")
    layers = decoder_layers(model)
    m, g = resolve_layers(cfg, len(layers))
    tokens = PromptBank.settings(cfg).num_virtual_tokens
    total, max_pos = num_experts * tokens, getattr(conf, "max_position_embeddings", None)
    if max_pos is not None and total >= max_pos:
        raise ConfigError(f"mixture.num_experts * mixture.experts.prompt.num_virtual_tokens = {num_experts} * "
                          f"{tokens} = {total} prompt tokens does not fit the context: must be < "
                          f"max_position_embeddings={max_pos}, leaving room for the input")
    impl = conf._attn_implementation or "eager"
    impl = impl.removeprefix("mixroute_mop_")
    bank = PromptBank(num_experts, tokens, conf.hidden_size)
    mix.experts["prompt"] = bank
    inj = PromptInjector(mix, bank, router_key, m)
    ref = next(model.parameters())
    bank.to(device=ref.device, dtype=ref.dtype)
    inj.init_prompts(_init_token_ids(mix, cfg, total, tokenizer))
    conf._attn_implementation = _register_attention(impl)
    attns = [attention_module(layer) for layer in layers]
    for a in attns:
        a.__dict__["_mixroute_mop"] = inj   # plain attribute, not a registered submodule / state_dict entry
    mix.add_hook(_Uninstall(conf, impl, attns))
    mix.add_hook(inj.dec.register_forward_pre_hook(inj.before_decoder, with_kwargs=True))
    return g
