"""Prompt experts (MoP, Dun et al. 2023): E blocks of L trainable virtual tokens injected at decoder layer m.

Design (docs/mop.md). Prompt tokens sit before the input and attend only to prompt tokens, so their keys and
values at every layer >= m do not depend on the input. Each forward therefore runs the E*L prompt tokens once,
batch-independently, through layers m..N-1 as their own tiny sequence (block-diagonal causal mask: every
expert's block sees only itself) and keeps each layer's K/V. Input tokens then attend to those K/V as extra
columns placed before their own, with ``log(g_e)`` (the gate, ``routers/gate.py``) added to the attention logits
of expert e's columns. Layers below m never see the prompts. With E=1, m=0 and g=1 this is exactly PEFT prompt
tuning: there the virtual tokens are prepended embeddings that attend causally among themselves.

Positions (RoPE): each expert's block holds positions 0..L-1 and input tokens are shifted by L (L..L+T-1), as in
PEFT prompt tuning at m=0. The shift is applied at every layer; RoPE only sees position differences, so layers
below m are unaffected.

Hooking transformers (5.x): the attention of a registered implementation ``mixroute_mop_<sdpa|eager>`` wraps the
model's own one (transformers has no hook that adds K/V columns); a decoder pre-hook shifts ``position_ids`` and
runs the prompt pass (before ``output_hidden_states`` recording starts); a pre-hook on layer g runs the gate.
At the prefill both are computed and kept; decode steps (KV cache, no grad) reuse them.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mixroute.config import MixtureConfig
from mixroute.routers.base import masked_mean
from mixroute.routers.gate import PROMPT_ROUTERS, Gate, GateRouter


class PromptBank(nn.Module):
    """``weight`` (E, L, H): the prompt experts' virtual tokens, in the hidden-state space entering layer m."""

    def __init__(self, num_experts: int, num_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_experts, self.num_tokens = num_experts, num_tokens
        self.weight = nn.Parameter(torch.zeros(num_experts, num_tokens, hidden_size))


class _StopForward(Exception):
    """Raised by the gate hook in features-only mode (``gate_features``): nothing above layer g is needed."""


def resolve_layers(cfg: MixtureConfig, num_layers: int) -> tuple[int, int]:
    """(inject layer m, gate layer g) with defaults N//2 and N//3 (<= m); bad values name the field and range."""
    m = num_layers // 2 if cfg.inject_layer is None else cfg.inject_layer
    if not 0 <= m < num_layers:
        raise ValueError(f"mixture.inject_layer={m} is out of range: valid 0..{num_layers - 1} (0 = the input "
                         f"layer; this model has {num_layers} decoder layers)")
    g = min(num_layers // 3, m) if cfg.gate_layer is None else cfg.gate_layer
    if cfg.router == "gate" and not 0 <= g <= m:
        raise ValueError(f"mixture.gate_layer={g} is out of range: valid 0..{m} (the gate reads the hidden states "
                         f"entering layer g and must be known at the injection layer inject_layer={m})")
    return m, g


class PromptInjector:
    """The hooks and per-forward state that connect a ``PromptBank`` and a ``GateRouter`` to one HF model."""

    def __init__(self, mix: nn.Module, bank: PromptBank, gate: GateRouter, inject_layer: int) -> None:
        self.mix, self.bank, self.gate, self.m = mix, bank, gate, inject_layer
        self.dec = mix.model.get_decoder()
        self.kv: Optional[dict[int, tuple[Tensor, Tensor]]] = None   # layer -> prompt (K, V), (1, Hkv, E*L, D)
        self.gate_out: Optional[Gate] = None                          # this forward's gate
        self.kept: Optional[Gate] = None                              # decided at the prefill
        self.capture: Optional[dict] = None                           # set during the prompt pass
        self.features_only = False
        self.features: Optional[Tensor] = None
        self._masks: dict = {}
        self._last_ids: Optional[Tensor] = None       # input of the last no-grad, no-cache forward
        self.continuation = False                     # this forward extends it by one token (generate, no cache)

    # ---------------------------------------------------------------- prompt pass
    def run_prompt_layers(self, hidden: Tensor, start: int, stop: int, capture: bool) -> Tensor:
        """Run the (1, E*L, H) prompt sequence through layers start..stop-1 (block-diagonal causal mask,
        positions 0..L-1 per expert); with ``capture`` keep every layer's K/V in ``self.capture``."""
        E, L = self.bank.num_experts, self.bank.num_tokens
        pos = torch.arange(L, device=hidden.device).repeat(E).unsqueeze(0)
        rope = self.dec.rotary_emb(hidden, pos)
        blk = torch.arange(E * L, device=hidden.device) // L
        ok = (blk[:, None] == blk[None, :]) & (pos[0][:, None] >= pos[0][None, :])
        mask = torch.zeros(ok.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~ok, torch.finfo(hidden.dtype).min)[None, None]
        self.capture = {} if capture else None
        try:
            for i in range(start, stop):
                # .forward, not __call__: the prompt pass is not a forward of the model, so hooks on the decoder
                # layers (ours at layer g, callers capturing hidden states) must not see it
                out = self.dec.layers[i].forward(hidden, attention_mask=mask, position_embeddings=rope,
                                                 position_ids=pos, past_key_values=None, use_cache=False)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden
        finally:
            self.kv = self.capture if capture else self.kv
            self.capture = None

    def init_prompts(self, token_ids: Tensor) -> None:
        """Set the prompts to the hidden states entering layer m of these E*L vocabulary tokens (their
        embeddings at m=0, as PEFT does; for m>0 each block run as a prompt through layers 0..m-1)."""
        with torch.no_grad():
            hidden = self.mix.model.get_input_embeddings()(token_ids).unsqueeze(0)
            if self.m > 0:
                hidden = self.run_prompt_layers(hidden, 0, self.m, capture=False)
            self.bank.weight.copy_(hidden.reshape(self.bank.weight.shape))

    # ---------------------------------------------------------------- hooks
    def before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        pkv = kwargs.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(past, past + x.shape[1], device=x.device).unsqueeze(0)
        kwargs["position_ids"] = pos + self.bank.num_tokens
        self._masks = {}
        self.continuation = self._extends_last_prefill(x, past, bool(kwargs.get("use_cache")))
        if self.features_only:
            return args, kwargs
        if (past == 0 and not self.continuation) or self.kv is None or torch.is_grad_enabled():
            w = self.bank.weight
            self.run_prompt_layers(w.reshape(1, -1, w.shape[-1]), self.m, len(self.dec.layers), capture=True)
        return args, kwargs

    def _extends_last_prefill(self, x: Tensor, past: int, use_cache: bool) -> bool:
        """Generation without a KV cache re-runs the whole sequence each step: a no-grad, no-cache forward whose
        tokens are the previous forward's plus one new token continues that sequence, so its gate is kept."""
        if torch.is_grad_enabled() or x.dtype != torch.long or past > 0 or use_cache:
            self._last_ids = None
            return False
        prev, self._last_ids = self._last_ids, x
        return (prev is not None and prev.shape[0] == x.shape[0] and x.shape[1] == prev.shape[1] + 1
                and torch.equal(x[:, :-1], prev))

    def gate_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.capture is not None:        # the prompt pass itself runs this layer
            return
        ctx = self.mix.context
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.features_only:
            self.features = masked_mean(hidden, ctx.read_mask())
            raise _StopForward
        if (not ctx.is_prefill or self.continuation) and self.kept is not None:
            gate = self.kept.for_batch(hidden.shape[0])
        else:
            task_ids = ctx.task_ids
            if task_ids is not None and task_ids.shape[0] != hidden.shape[0]:
                task_ids = task_ids.repeat_interleave(hidden.shape[0] // task_ids.shape[0])
            gate = self.gate(hidden, ctx.read_mask(), task_ids)
            ctx.add_aux(gate.aux)
            self.kept = gate.detach()
        self.gate_out = gate
        ctx.routing["gate"] = gate.weights
        if gate.logits is not None and self.gate.eta > 0:
            ctx.router_logits["gate"] = gate.logits

    # ---------------------------------------------------------------- attention
    def attend(self, base: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Optional[Tensor], **kwargs: Any) -> Any:
        """The model's attention with this layer's prompt K/V prepended and the log-gate as their bias."""
        layer = module.layer_idx
        if self.capture is not None:
            self.capture[layer] = (key, value)
            return base(module, query, key, value, attention_mask, **kwargs)
        if self.kv is None or layer not in self.kv or self.gate_out is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        pk, pv = self.kv[layer]
        bsz = query.shape[0]
        mask = self._mask(attention_mask, bsz, query.shape[2], key.shape[2], query.dtype, query.device)
        key = torch.cat([pk.expand(bsz, -1, -1, -1).to(key.dtype), key], dim=2)
        value = torch.cat([pv.expand(bsz, -1, -1, -1).to(value.dtype), value], dim=2)
        return base(module, query, key, value, mask, **kwargs)

    def _mask(self, mask: Optional[Tensor], bsz: int, q: int, k: int, dtype: torch.dtype,
              device: torch.device) -> Tensor:
        """Additive (B, 1, Q, E*L + K) mask: log-gate on the prompt columns, the model's own mask on the rest.
        Built once per forward (every layer gets the same mask object)."""
        cache_key = (id(mask), bsz, q, k)
        if cache_key in self._masks:
            return self._masks[cache_key][1]
        low = torch.finfo(dtype).min
        if mask is None:       # sdpa's "is_causal" shortcut: causal over the last q of k positions
            i = torch.arange(q, device=device)[:, None] + (k - q)
            mask = torch.where(i >= torch.arange(k, device=device)[None, :], 0.0, low).to(dtype)[None, None]
        elif mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, low)
        gate = self.gate_out.for_batch(bsz)
        bias = gate.log_weights.to(device=device, dtype=dtype).clamp_min(low).repeat_interleave(self.bank.num_tokens, -1)
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
    if cfg.prompt_init == "random":
        return torch.randint(0, emb.num_embeddings, (total,), device=emb.weight.device)
    if not cfg.prompt_init_text:
        raise ValueError("mixture.prompt_init='text' needs mixture.prompt_init_text (the text to start from)")
    if tokenizer is None:
        from mixroute.models import embedded_tokenizer

        tokenizer = embedded_tokenizer()
        if len(tokenizer) != emb.num_embeddings:
            raise ValueError("mixture.prompt_init='text': no tokenizer for this model; pass tokenizer= to "
                             "install_prompt_experts or use prompt_init='random'")
    ids = tokenizer(cfg.prompt_init_text)["input_ids"]
    if not ids:
        raise ValueError("mixture.prompt_init_text tokenizes to nothing")
    ids = (ids * (total // len(ids) + 1))[:total]
    return torch.tensor(ids, dtype=torch.long, device=emb.weight.device)


def install_prompt_experts(mix: nn.Module, cfg: MixtureConfig, tokenizer: Any = None) -> None:
    """Called by ``Mixture.attach`` for ``expert='prompt'``: registers ``experts['prompt']`` (a ``PromptBank``),
    ``routers['gate']`` (a ``GateRouter``) and the hooks (removed by ``mix.detach()``)."""
    model = mix.model
    dec, conf = model.get_decoder(), model.config
    if not hasattr(dec, "layers") or not hasattr(dec, "rotary_emb"):
        raise ValueError(f"prompt experts need a decoder with .layers and a shared .rotary_emb (Llama-style); "
                         f"{type(dec).__name__} has not")
    if cfg.router not in PROMPT_ROUTERS:
        raise ValueError(f"mixture.router={cfg.router!r} cannot route prompt experts; valid with expert='prompt': "
                         f"{', '.join(PROMPT_ROUTERS)}")
    num_layers, num_experts = len(dec.layers), 1 if cfg.router == "single" else cfg.num_experts
    m, g = resolve_layers(cfg, num_layers)
    total, max_pos = num_experts * cfg.num_virtual_tokens, getattr(conf, "max_position_embeddings", None)
    if max_pos is not None and total >= max_pos:
        raise ValueError(f"mixture.num_experts * mixture.num_virtual_tokens = {num_experts} * "
                         f"{cfg.num_virtual_tokens} = {total} prompt tokens does not fit the context: must be < "
                         f"max_position_embeddings={max_pos}, leaving room for the input")
    impl = conf._attn_implementation or "eager"
    impl = impl.removeprefix("mixroute_mop_")
    bank = PromptBank(num_experts, cfg.num_virtual_tokens, conf.hidden_size)
    gate = GateRouter(cfg, conf.hidden_size, num_experts, cfg.router)
    gate.layer = g
    mix.experts["prompt"], mix.routers["gate"] = bank, gate
    inj = PromptInjector(mix, bank, gate, m)
    bank.injector = inj                     # plain attribute (not a submodule): found by gate_features
    ref = next(model.parameters())
    bank.to(device=ref.device, dtype=ref.dtype)
    inj.init_prompts(_init_token_ids(mix, cfg, total, tokenizer))
    conf._attn_implementation = _register_attention(impl)
    attns = [layer.self_attn for layer in dec.layers]
    for a in attns:
        a.__dict__["_mixroute_mop"] = inj   # plain attribute, not a registered submodule / state_dict entry
    mix.add_hook(_Uninstall(conf, impl, attns))
    mix.add_hook(dec.register_forward_pre_hook(inj.before_decoder, with_kwargs=True))
    mix.add_hook(dec.layers[g].register_forward_pre_hook(inj.gate_hook, with_kwargs=True))


def gate_features(mix: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                  prompt_mask: Optional[Tensor] = None) -> Tensor:
    """(B, H) pooled hidden states the gate reads, running the frozen model only up to the gate layer."""
    inj: PromptInjector = mix.experts["prompt"].injector
    inj.features_only, inj.features = True, None
    try:
        with torch.no_grad(), mix.context.inputs(None, prompt_mask):
            mix.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        inj.features_only = False
    if inj.features is None:
        raise RuntimeError("gate_features: the gate layer was not reached")
    return inj.features
