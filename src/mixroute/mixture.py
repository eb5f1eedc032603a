"""``Mixture``: routed parameter-efficient experts attached to one frozen Hugging Face causal LM.

``Mixture.attach(model, cfg)`` builds an expert bank (LoRA: every target projection of every decoder layer
is patched with a stacked bank, ``experts/lora.py``; prompts: a prompt bank injected at one layer,
``experts/prompt.py``) and the routers (``routers/``), and registers forward pre-hooks:

* on the decoder stack (``model.get_decoder()``): starts a forward - stores the attention mask, works out
  prefill vs decode step and clears the per-forward routing outputs;
* on each layer a router reads: runs that router once on the hidden states entering the layer and stores its
  ``RouteWeights`` under the router's key, where the experts read it.

A global router of LoRA experts reading a layer above the embeddings (``router_scope='global'``,
``router_layer``) decides in a *routing pre-pass* instead: at the prefill, the decoder pre-hook first runs the
frozen base (no expert applied) up to that layer, routes once from its hidden states, and only then runs the
real forward with that decision at every layer. The pre-pass costs ``router_layer / num_layers`` of a base
forward per prefill and nothing per decode step.

This is the one routing pipeline every router and expert kind goes through: it keeps sequence-level
decisions from the prefill through generation (with or without a KV cache), widens them for beams, collects
aux losses, logits and observable weights. The model's own ``forward`` signature is unchanged and
``model.generate`` keeps working. Everything a forward produces lives on ``mixture.context`` (a
``RoutingContext``), never in globals.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.arch import (Reached, decoder_layers, in_out_features, layer_input, layers_path, lm_head_logits,
                           resolve_targets)
from mixroute.config import ConfigError, MixtureConfig
from mixroute.experts import (BANKS, EXPERT_KINDS, expert_kind, expert_settings, patch_linear, unpatch_linear,
                              update_expert_settings)
from mixroute.routers import ROUTERS, RouterDims, RouteWeights, build_router, router_class
from mixroute.routers.base import KEPT_LEVELS, one_hot_route


WEIGHTS_NAME = "mixture.safetensors"
CONFIG_NAME = "mixture.json"


@dataclass
class RoutingContext:
    """Per-forward state shared by the hooks, routers and experts (documented in docs/architecture.md)."""

    task_ids: Optional[Tensor] = None          # (B,) set by Mixture.forward / generate for their duration
    prompt_mask: Optional[Tensor] = None       # (B, T) bool, idem; None = every attended token is prompt
    generating: bool = False                   # inside Mixture.generate: forwards after the first are decode steps
    forwards: int = 0                          # forwards since generate() started
    attention_mask: Optional[Tensor] = None    # (B, T_total) of the current forward (None = all attended)
    seq_len: int = 0                           # tokens in the current forward's input
    is_prefill: bool = True                    # False on a decode step (the routers' decisions are kept)
    routes: dict[str, RouteWeights] = field(default_factory=dict)  # router key -> this forward's decision
    routing: dict[str, Tensor] = field(default_factory=dict)     # router key -> observable weights
    router_logits: dict[str, Tensor] = field(default_factory=dict)  # label-aligned routers' logits
    aux_terms: dict[str, list] = field(default_factory=dict)     # aux loss name -> per-router terms
    kept: dict[str, RouteWeights] = field(default_factory=dict)  # sequence-level decisions kept from the prefill
    in_prepass: bool = False                   # inside the routing pre-pass: no expert, no router runs

    def begin(self, attention_mask: Optional[Tensor], seq_len: int, past: int) -> None:
        """Start a forward: called by the decoder pre-hook. Inside ``generate`` only the first forward is a
        prefill, also without a KV cache (then every step re-reads the whole sequence, generated tokens
        included, and routers must not decide again from them); elsewhere a forward is a decode step when the
        KV cache already holds tokens."""
        self.attention_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self.seq_len = seq_len
        self.is_prefill = self.forwards == 0 if self.generating else past == 0
        self.forwards += 1
        self.routes, self.routing, self.router_logits, self.aux_terms = {}, {}, {}, {}
        if self.is_prefill:
            self.kept = {}

    def task_ids_for(self, bsz: int) -> Optional[Tensor]:
        """Task ids for a batch that ``generate`` widened (beams, num_return_sequences): HF repeats each row
        in place, so the ids are repeated the same way."""
        t = self.task_ids
        if t is None or t.shape[0] == bsz:
            return t
        if bsz % t.shape[0]:
            raise RuntimeError(f"batch {bsz} is not a multiple of the {t.shape[0]} task ids given")
        return t.repeat_interleave(bsz // t.shape[0])

    def token_mask(self) -> Optional[Tensor]:
        """(B, T) attended tokens of the current input (None = all)."""
        if self.attention_mask is None:
            return None
        return self.attention_mask[:, -self.seq_len:].bool()

    def read_mask(self) -> Optional[Tensor]:
        """(B, T) tokens a sequence-level router may read: prompt tokens that are attended."""
        mask = self.token_mask()
        if self.prompt_mask is not None and self.prompt_mask.shape[-1] == self.seq_len:
            pm = self.prompt_mask.bool()
            mask = pm if mask is None else mask & pm
        return mask

    def add_aux(self, aux: dict[str, Tensor]) -> None:
        for name, value in aux.items():
            self.aux_terms.setdefault(name, []).append(value)

    def aux_losses(self) -> dict[str, Tensor]:
        """Each auxiliary loss averaged over the routers that produced it (so eta does not scale with depth)."""
        return {name: torch.stack(terms).mean() for name, terms in self.aux_terms.items()}

    @contextlib.contextmanager
    def inputs(self, task_ids: Optional[Tensor], prompt_mask: Optional[Tensor],
               generating: bool = False) -> Iterator[None]:
        """Make task ids / prompt mask visible to the routers for one call; restores the previous values."""
        saved = (self.task_ids, self.prompt_mask, self.generating, self.forwards)
        self.task_ids, self.prompt_mask, self.generating, self.forwards = task_ids, prompt_mask, generating, 0
        try:
            yield
        finally:
            self.task_ids, self.prompt_mask, self.generating, self.forwards = saved


@dataclass
class MixtureOutput:
    """What ``Mixture.forward`` returns (docs/architecture.md, "Mixture forward")."""

    loss: Optional[Tensor]
    lm_loss: Optional[Tensor]
    logits: Optional[Tensor]
    aux_losses: dict[str, Tensor]
    routing: dict[str, Tensor]
    past_key_values: Any = None
    router_logits: dict[str, Tensor] = field(default_factory=dict)


def base_fingerprint(model: nn.Module) -> dict:
    """Shape facts of a base model that a saved mixture must match. Configs name them differently (GPT-2:
    n_embd, n_layer, n_head; transformers' attribute_map aliases the common names where it can), and a fact
    a config does not have is recorded as None."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None)
    return {"architecture": type(model).__name__, "hidden_size": getattr(c, "hidden_size", None),
            "num_hidden_layers": getattr(c, "num_hidden_layers", None), "vocab_size": getattr(c, "vocab_size", None),
            "intermediate_size": getattr(c, "intermediate_size", None),
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads}


class Mixture(nn.Module):
    """Experts + routers on a frozen causal LM. Build with ``Mixture.attach`` or ``Mixture.load``."""

    def __init__(self, model: nn.Module, cfg: MixtureConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.experts = nn.ModuleDict()
        self.routers = nn.ModuleDict()
        self.context = RoutingContext()
        self.module_names: dict[str, str] = {}      # expert key -> module name in the base model
        self.module_slots: dict[str, int] = {}      # expert key -> index among its layer's LoRA modules (Poly)
        self._routers_at: dict[int, list[str]] = {}  # decoder layer -> keys of the routers that read its input
        self.prepass_routers: list[str] = []       # keys of the routers that decide from the routing pre-pass
        self._forced: dict[Optional[str], _Forced] = {}   # router key (None = all) -> fixed weights
        self._by_label = False                              # inside ``routed_by_label``
        self._hooks: list = []
        self._patched: list[nn.Module] = []

    # ------------------------------------------------------------------ building
    @classmethod
    def attach(cls, model: nn.Module, cfg: MixtureConfig | None = None) -> "Mixture":
        """Freeze ``model`` and attach the experts and routers described by ``cfg``."""
        cfg = settle(cfg or MixtureConfig())
        validate_mixture(cfg)
        mix = cls(model, cfg)
        model.requires_grad_(False)
        num_experts = router_class(cfg.router).experts_for(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            dec = model.get_decoder()
            mix.add_hook(dec.register_forward_pre_hook(mix._begin_forward, with_kwargs=True))
            try:
                if cfg.expert == "prompt":
                    from mixroute.experts.prompt import install_prompt_experts  # MoP (other module)

                    layer = install_prompt_experts(mix, cfg, num_experts, PROMPT_ROUTER_KEY)
                    mix._add_router(PROMPT_ROUTER_KEY, layer, RouterDims(model.config.hidden_size, num_experts))
                else:
                    mix._install_lora(cfg, num_experts)
            except BaseException:
                mix.detach()   # a failed attach leaves the model as it was (no hook, no patch)
                raise
        ref = next(model.parameters())
        mix.experts.to(device=ref.device, dtype=ref.dtype)
        mix.routers.to(device=ref.device)
        if not all(r.trains_experts for r in mix.routers.values()):
            mix.experts.requires_grad_(False)
        return mix

    def _add_router(self, key: str, layer: int, dims: RouterDims, prepass: bool = False) -> None:
        """Build router ``key`` and run it on the hidden states entering decoder layer ``layer``: those of the
        forward itself, or (``prepass``) those of the frozen base in a routing pre-pass before it."""
        router = build_router(self.cfg, dims)
        router.read_layer = layer
        self.routers[key] = router
        if prepass:
            self.prepass_routers.append(key)
            return
        if layer not in self._routers_at:
            self._routers_at[layer] = []
            dec_layer = decoder_layers(self.model)[layer]
            self.add_hook(dec_layer.register_forward_pre_hook(self._layer_hook(layer), with_kwargs=True))
        self._routers_at[layer].append(key)

    def _install_lora(self, cfg: MixtureConfig, num_experts: int) -> None:
        # every target is resolved and checked before anything is patched: a bad config leaves the model as it was
        lora = expert_settings(cfg)
        found = resolve_targets(self.model, lora.target_modules, mlp_only=lora.mlp_only,
                                allow_partial=lora.allow_partial)
        for t in (t for layer in found for t in layer):
            router_class(cfg.router).check_target(cfg, t.path, *in_out_features(t.module))
        hidden = self.model.config.hidden_size
        if cfg.router_scope == "global":
            # routers that read no hidden state (single, uniform, oracle, poly) decide at the first layer
            reads = hasattr(router_class(cfg.router), "features")
            layer = global_router_layer(cfg, len(found)) if reads else 0
            self._add_router("global", layer, RouterDims(hidden, num_experts, lora.rank, len(found[0])),
                             prepass=layer > 0)
        for i, targets in enumerate(found):
            key = "global" if cfg.router_scope == "global" else f"layer_{i}"
            if key not in self.routers:
                self._add_router(key, i, RouterDims(hidden, num_experts, lora.rank, len(targets)))
            for slot, t in enumerate(targets):
                ekey = f"layers_{i}_{t.name.replace('.', '_')}"
                bank = BANKS[cfg.expert].for_module(t.module, num_experts, lora.rank, lora.alpha, lora.dropout)
                self.experts[ekey] = bank
                self.module_names[ekey] = t.path
                self.module_slots[ekey] = slot
                patch_linear(t.module, bank, self._route_getter(key), slot)
                self._patched.append(t.module)

    def add_hook(self, handle: Any) -> None:
        """Keep a hook handle so ``detach()`` removes it (also for components installed by other modules)."""
        self._hooks.append(handle)

    def detach(self) -> nn.Module:
        """Remove every hook and patch; returns the untouched base model."""
        for h in self._hooks:
            h.remove()
        for lin in self._patched:
            unpatch_linear(lin)
        self._hooks, self._patched = [], []
        return self.model

    # ------------------------------------------------------------------ the routing pipeline
    def _route_getter(self, key: str):
        ctx = self.context
        return lambda: None if ctx.in_prepass else ctx.routes.get(key)

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.context.in_prepass:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        pkv = kwargs.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        self.context.begin(kwargs.get("attention_mask"), x.shape[1], past)
        for key in self.prepass_routers:
            hidden = None
            if self.context.is_prefill and self._needs_router(key):
                hidden = self.frozen_layer_input(self.routers[key].read_layer, args, kwargs)
            self._route(key, hidden, x.shape[0], x.device)

    def frozen_layer_input(self, layer: int, args: tuple = (), kwargs: Optional[dict] = None) -> Tensor:
        """The frozen base's hidden states entering decoder layer ``layer`` for a decoder call (no expert
        applied, no router run): the routing pre-pass, and the features of its router's pre-training."""
        with self.frozen():
            return layer_input(self.model, layer, args, kwargs)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Forwards inside run the frozen base: no expert applied, no router run (the routing pre-pass's mode;
        also what a library's global routers read)."""
        ctx = self.context
        saved, ctx.in_prepass = ctx.in_prepass, True
        try:
            yield
        finally:
            ctx.in_prepass = saved

    def _needs_router(self, key: str) -> bool:
        """False when forced weights fix every row of router ``key`` (its features need not be computed)."""
        if self._by_label:
            return False
        forced = self._forced.get(key, self._forced.get(None))
        return forced is None or forced.free is not None

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.context.in_prepass:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            for key in self._routers_at[layer]:
                self._route(key, hidden, hidden.shape[0], hidden.device)
        return hook

    def _route(self, key: str, hidden: Optional[Tensor], bsz: int, device: torch.device) -> None:
        """Run (or reuse) router ``key`` on ``hidden`` and publish its decision on the context (``hidden`` may
        be None where the decision is kept or forced for every row)."""
        ctx, router = self.context, self.routers[key]
        kept_level = router.level in KEPT_LEVELS
        reuse = kept_level and not ctx.is_prefill and key in ctx.kept
        forced = self._forced.get(key, self._forced.get(None))
        if self._by_label and router.level == "sequence":
            route = self._label_route(bsz, device)
        elif reuse:
            route = ctx.kept[key].for_batch(bsz)
        elif forced is not None and forced.free is None:
            route = _forced_route(forced, None, bsz, device)
        else:
            token_level = router.level in ("token", "rank")
            route = router(hidden, ctx.token_mask() if token_level else ctx.read_mask(), ctx.task_ids_for(bsz))
            ctx.add_aux(route.aux)
            if forced is not None:  # some rows forced, the rest left to the router
                route = _forced_route(forced, route, bsz, device)
        if reuse:
            ctx.kept[key] = route   # the same object every decode step: what banks derived from it is reused
        elif kept_level:
            ctx.kept[key] = route.detach()
        ctx.routes[key] = route
        ctx.routing[key] = route.observed()
        if route.logits is not None:
            ctx.router_logits[key] = route.logits

    @contextlib.contextmanager
    def routed_by_label(self) -> Iterator[None]:
        """Inside, every sequence-level router sends each sequence to its label's expert (the forward's
        ``task_ids``) and is not run: MoA's stage 1 trained as one mixture (each expert sees only its category,
        as one LoRA per category would), and its validation."""
        saved, self._by_label = self._by_label, True
        try:
            yield
        finally:
            self._by_label = saved

    def _label_route(self, bsz: int, device: torch.device) -> RouteWeights:
        n = router_class(self.cfg.router).experts_for(self.cfg)
        tids = self.context.task_ids_for(bsz)
        if tids is None or int(tids.max()) >= n:
            raise ValueError(f"routing by label needs task_ids below the number of experts ({n}); got "
                             f"{None if tids is None else tids.tolist()}")
        return one_hot_route(tids.to(device).long(), n)

    def force(self, weights: Optional[Tensor], key: Optional[str] = None) -> None:
        """Override sequence-level routing with fixed weights over experts, (E,) or (B, E), >= 0 (normalised;
        zeros switch experts off); ``key`` names one router (default: all). ``None`` undoes. A one-hot row
        runs exactly that expert (the cost of one LoRA). In a (B, E) tensor a row of NaN leaves that sequence
        to the router (per-row overrides inside one batch, as a server mixing requests needs)."""
        if weights is None:
            self._forced.pop(key, None)
            return
        keys = [key] if key is not None else list(self.routers)
        for k in keys:
            if k not in self.routers:
                raise ValueError(f"force: no router {k!r}; this mixture has {', '.join(self.routers)}")
            if self.routers[k].level != "sequence":
                raise ValueError(f"force: router {k!r} routes per {self.routers[k].level}; only sequence-level "
                                 "routing can be fixed")
        n = router_class(self.cfg.router).experts_for(self.cfg)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        free = weights.isnan().all(-1, keepdim=True)   # rows the router decides
        fixed = weights.masked_fill(free, 1.0)
        if weights.shape[-1] != n or weights.dim() not in (1, 2) or bool(fixed.isnan().any()) \
                or (weights.dim() == 1 and bool(free.any())) \
                or bool((fixed < 0).any()) or bool((fixed.sum(-1) <= 0).any()):
            raise ValueError(f"forced weights must be >= 0, not all zero (or, in a (B, E) tensor, a whole row of "
                             f"NaN), with last dim "
                             f"num_experts={n}; got shape {tuple(weights.shape)}")
        self._forced[key] = _Forced(fixed / fixed.sum(-1, keepdim=True), free[..., 0] if bool(free.any()) else None)

    def applied_experts(self) -> Optional[dict[str, list[int]]]:
        """Router key -> the top-1 expert each sequence of the last prefill was given by that router, as the
        experts applied it (None when routing is per token or per task). With one router per layer the layers
        may disagree: this is what ran, layer by layer."""
        kept = {k: r for k, r in self.context.kept.items() if r.level == "sequence"}
        if not kept:
            return None
        return {k: r.weights.float().argmax(-1).tolist() for k, r in kept.items()}

    def chosen_experts(self) -> Optional[list[int]]:
        """Per sequence of the last prefill, the expert most routers applied (ties: the lowest index): the
        one decision with a single (global) router; ``applied_experts`` gives every router's (None when
        routing is per token or per task)."""
        applied = self.applied_experts()
        if applied is None:
            return None
        per_seq = torch.tensor(list(applied.values())).T          # (B, routers)
        return [int(torch.bincount(row).argmax()) for row in per_seq]

    def decides_before_layers(self) -> bool:
        """Whether every router decides before the first decoder layer runs (one global router, from the
        routing pre-pass or from no hidden state at all): then ``route_prompts`` knows the whole routing of a
        prefill without running the experts, and an engine that applies one LoRA per sequence can serve it."""
        return bool(self.routers) and set(self._routers_at) <= {0} and all(
            r.level == "sequence" for r in self.routers.values())

    @torch.no_grad()
    def route_prompts(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None) -> dict[str, RouteWeights]:
        """Router key -> the decision a prefill of these prompts makes, computed by that prefill's own code up
        to the first decoder layer and stopped there: the frozen base's routing pre-pass, no expert applied.
        Forced weights (``force``) and ``context.inputs`` apply as in a forward. Only for mixtures whose routers
        all decide before the first layer (``decides_before_layers``): per-layer routers read the experts'
        own outputs, so their decisions exist only inside a full forward."""
        if not self.decides_before_layers():
            raise ValueError("route_prompts needs routers that decide before the first decoder layer (one global "
                             f"sequence router); this mixture has {', '.join(self.routers) or 'no routers'}")

        def stop(*_: Any) -> None:
            if not self.context.in_prepass:   # the pre-pass itself runs through layer 0 to the router's layer
                raise Reached

        # appended after the routers' own layer-0 hooks, so they have run when this one stops the forward
        handle = decoder_layers(self.model)[0].register_forward_pre_hook(stop)
        try:
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False)
        except Reached:
            pass
        finally:
            handle.remove()
        return {k: self.context.kept[k] for k in self.routers}

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        prompt_mask: Optional[Tensor] = None,
        task_ids: Optional[Tensor] = None,
        logits_for: Literal["all", "labels"] = "all",
        **hf_kwargs: Any,
    ) -> MixtureOutput:
        """Run the base model with the experts; see docs/architecture.md ("Mixture forward").

        ``logits_for="labels"`` (with labels) runs the LM head only at positions whose next token carries a
        label: the same loss, without the (B, T, vocab) logits. ``hf_kwargs`` go to the HF model unchanged.
        """
        if labels is not None:
            hf_kwargs.setdefault("use_cache", False)
        with self.context.inputs(task_ids, prompt_mask):
            if labels is not None and logits_for == "labels":
                out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **hf_kwargs)
                target = labels[:, 1:]
                keep = target != -100
                hidden = out.last_hidden_state[:, :-1][keep]
                logits_sel = lm_head_logits(self.model, hidden)
                lm_loss = F.cross_entropy(logits_sel.float(), target[keep])
                logits = None
            elif logits_for in ("all", "labels"):
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **hf_kwargs)
                logits = out.logits
                lm_loss = None
                if labels is not None:
                    lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                              ignore_index=-100)
            else:
                raise ValueError(f"logits_for={logits_for!r}; expected 'all' or 'labels'")
        aux = self.context.aux_losses()
        loss = None
        if lm_loss is not None:
            loss = lm_loss + sum(aux.values()) if aux else lm_loss
        return MixtureOutput(loss=loss, lm_loss=lm_loss, logits=logits, aux_losses=aux,
                             routing=dict(self.context.routing), past_key_values=out.past_key_values,
                             router_logits=dict(self.context.router_logits))

    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 task_ids: Optional[Tensor] = None, **generate_kwargs: Any) -> Tensor:
        """``model.generate`` with task ids visible to the routers; sequence-level routes are decided at the
        prefill (from every attended prompt token) and kept for the decoding steps, with or without a KV cache.
        ``task_ids`` (B,) are widened with the batch for beams / ``num_return_sequences``."""
        with self.context.inputs(task_ids, None, generating=True):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def update_balancing(self) -> None:
        """Call after each ``optimizer.step()``: routers with loss-free balancing (SMoRA) update their bias."""
        for router in self.routers.values():
            router.update_balancing()

    # ------------------------------------------------------------------ parameters
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise (experts and routers that require grad; the base is frozen)."""
        return [p for p in list(self.experts.parameters()) + list(self.routers.parameters()) if p.requires_grad]

    def trainable_parameters(self) -> int:
        """Number of trainable parameters (experts + routers)."""
        return sum(p.numel() for p in self.adapter_parameters())

    def num_parameters_by_part(self) -> dict[str, int]:
        """Parameter counts: ``experts``, ``routers``, ``trainable`` and the frozen ``base``."""
        return {"experts": sum(p.numel() for p in self.experts.parameters()),
                "routers": sum(p.numel() for p in self.routers.parameters()),
                "trainable": self.trainable_parameters(),
                "base": sum(p.numel() for p in self.model.parameters())}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Experts' and routers' tensors (parameters and persistent buffers), without the base model."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def expert_axis(self, key: str) -> Optional[tuple[int, int]]:
        """(dim, block) when the adapter tensor ``key`` (``adapter_state_dict``'s name) stacks per-expert
        slices along ``dim``, expert e owning ``[e*block, (e+1)*block)``, as its bank declares; None for a
        tensor the experts share (or a router's)."""
        if not key.startswith("experts."):
            return None
        bank, param = key[len("experts."):].rsplit(".", 1)
        return self.experts[bank].expert_axes().get(param)

    # ------------------------------------------------------------------ save / load / PEFT
    def save(self, directory: str) -> None:
        """Write ``mixture.safetensors`` + ``mixture.json`` (config and base fingerprint) into ``directory``."""
        from safetensors.torch import save_file

        from mixroute.config import to_dict
        from mixroute.fileio import atomic_write_text

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        tmp = path / ".mixture.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "mixroute.mixture"})
        os.replace(tmp, path / WEIGHTS_NAME)
        meta = {"format": "mixroute.mixture", "version": 1, "config": to_dict(self.cfg),
                "base": base_fingerprint(self.model)}
        atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, model: nn.Module, directory: str) -> "Mixture":
        """Attach a saved mixture to ``model``; a different base or mismatched shapes is a clear error."""
        from safetensors.torch import load_file

        from mixroute.config import from_dict

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a saved mixture: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        meta = json.loads((path / CONFIG_NAME).read_text())
        have = base_fingerprint(model)
        diff = [f"{k}: saved {v!r}, this model {have.get(k)!r}" for k, v in meta.get("base", {}).items()
                if have.get(k) != v]
        if diff:
            raise ValueError(f"{path / CONFIG_NAME} was saved for a different base model: " + "; ".join(diff))
        mix = cls.attach(model, from_dict(MixtureConfig, meta["config"], "mixture."))
        mix.load_adapter_state_dict(load_file(str(path / WEIGHTS_NAME)), source=str(path / WEIGHTS_NAME))
        return mix

    def load_adapter_state_dict(self, tensors: dict[str, Tensor], source: str = "state dict") -> None:
        """Copy expert/router tensors in; missing, unexpected or mis-shaped tensors are named in the error."""
        own = self.adapter_state_dict()
        problems = [f"missing {k}" for k in own if k not in tensors]
        problems += [f"unexpected {k}" for k in tensors if k not in own]
        problems += [f"{k}: saved shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"{source} does not fit this mixture: " + "; ".join(problems[:5]) + more)
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_peft(cls, model: nn.Module, adapter_dirs: list[str], cfg: MixtureConfig | None = None) -> "Mixture":
        """Import N PEFT LoRA adapters (same rank and targets; all DoRA or none) as the N experts of a new
        mixture (``expert`` becomes 'dora' for DoRA adapters, else 'lora')."""
        from mixroute.experts.lora import read_peft_adapters

        cfg = copy.deepcopy(cfg or MixtureConfig())
        experts, peft_cfg = read_peft_adapters(adapter_dirs)
        cfg.expert = "dora" if peft_cfg["use_dora"] else "lora"
        cfg.num_experts = len(adapter_dirs)
        # the targets are the modules the adapters hold weights for, named relative to their decoder layer
        # ("self_attn.q_proj"): exactly PEFT's set, whatever form (names, regex, all-linear) its config used
        prefix = layers_path(model) + "."
        names = sorted({name for weights in experts for name in weights})
        outside = [n for n in names if not n.startswith(prefix)]
        if outside:
            raise ValueError(f"{adapter_dirs[0]} has LoRA weights outside the decoder layers ({prefix}*): "
                             f"{', '.join(outside[:3])}; mixroute's experts live in the decoder layers only")
        update_expert_settings(cfg, rank=peft_cfg["r"], alpha=float(peft_cfg["lora_alpha"]), mlp_only=False,
                               target_modules=sorted({n[len(prefix):].split(".", 1)[1] for n in names}))
        if (n := router_class(cfg.router).experts_for(cfg)) != len(adapter_dirs):
            raise ValueError(f"router {cfg.router!r} holds {n} expert(s) but {len(adapter_dirs)} adapters were "
                             "given; pass one adapter or choose another router")
        mix = cls.attach(model, cfg)
        for key, bank in mix.experts.items():
            name = mix.module_names[key]
            for e, weights in enumerate(experts):
                if name not in weights:
                    raise ValueError(f"{adapter_dirs[e]} has no LoRA weights for {name}")
                a, b = bank.expert(e)
                with torch.no_grad():
                    a.copy_(weights[name][0])
                    b.copy_(weights[name][1])
                    if weights[name][2] is not None:
                        bank.m[e].copy_(weights[name][2])
        return mix

    def export_peft(self, expert_index: int, out_dir: str) -> None:
        """Write expert ``expert_index`` as a PEFT LoRA (or DoRA) adapter directory
        (``PeftModel.from_pretrained``)."""
        from peft.tuners.tuners_utils import _find_minimal_target_modules
        from transformers.pytorch_utils import Conv1D

        from mixroute.experts.lora import write_peft_adapter

        if self.cfg.expert not in ("lora", "dora") or router_class(self.cfg.router).level == "task":
            raise ValueError(f"export_peft needs LoRA or DoRA experts; this mixture is expert={self.cfg.expert!r}, "
                             f"router={self.cfg.router!r} (Poly skills are only meaningful mixed)")
        n = next(iter(self.experts.values())).num_experts
        if not 0 <= expert_index < n:
            raise ValueError(f"expert index {expert_index} out of range: this mixture has {n} experts")
        weights = {self.module_names[k]: (*bank.expert(expert_index),
                                          bank.m[expert_index] if self.cfg.expert == "dora" else None)
                   for k, bank in self.experts.items()}
        modules = dict(self.model.named_modules())
        # PEFT's own shortest target names that select these modules and no other (GPT-2 has attn.c_proj and
        # mlp.c_proj: with mlp_only the target must be "mlp.c_proj")
        targets = sorted(_find_minimal_target_modules(list(weights), [n for n in modules if n and n not in weights]))
        write_peft_adapter(weights, expert_settings(self.cfg), getattr(self.model.config, "name_or_path", None),
                           out_dir, targets=targets, fan_in_fan_out=isinstance(modules[next(iter(weights))], Conv1D))


def global_router_layer(cfg: MixtureConfig, num_layers: int) -> int:
    """The layer a global router of LoRA experts reads (``router_layer``, default the middle layer)."""
    layer = num_layers // 2 if cfg.router_layer is None else cfg.router_layer
    if not 0 <= layer < num_layers:
        raise ConfigError(f"mixture.router_layer={cfg.router_layer} is out of range: the model has {num_layers} "
                          f"decoder layers (valid: 0 to {num_layers - 1}, or null for the middle layer)")
    return layer


PROMPT_ROUTER_KEY = "gate"  # the one router of a prompt bank (the saved tensors' prefix: routers.gate.*)


def settle(cfg: MixtureConfig) -> MixtureConfig:
    """A copy of ``cfg`` whose ``routers`` and ``experts`` entries are typed settings, the chosen router's and
    expert kind's filled with defaults (what a run records); an entry no router or kind declares is an error."""
    cfg = copy.copy(cfg)
    routers, experts = dict(cfg.routers or {}), dict(cfg.experts or {})
    names = {k.settings_name: k for k in EXPERT_KINDS.values()}
    for section, entries, known in (("routers", routers, ROUTERS), ("experts", experts, names)):
        bad = [n for n in entries if n not in known]
        if bad:
            raise ConfigError(f"mixture.{section}.{bad[0]}: no {section[:-1]} declares settings of that name; "
                              f"valid: {', '.join(sorted(known))}")
    cfg.routers, cfg.experts = routers, experts
    for name in routers:
        routers[name] = ROUTERS[name].settings(cfg)
    for name in experts:
        experts[name] = names[name].settings(cfg)
    routers[cfg.router] = router_class(cfg.router).settings(cfg)
    kind = expert_kind(cfg.expert)
    experts[kind.settings_name] = kind.settings(cfg)
    return cfg


def validate_mixture(cfg: MixtureConfig) -> None:
    """Config errors of a mixture, before anything is built: the settings of every router and expert kind it
    names, the router's own checks and whether the expert kind can be driven by a router of that level."""
    cfg = settle(cfg)
    cls, kind = router_class(cfg.router), expert_kind(cfg.expert)
    if cls.level not in kind.levels:
        ok = [n for n, c in ROUTERS.items() if c.level in kind.levels]
        raise ConfigError(f"mixture.router={cfg.router!r} cannot route {cfg.expert} experts (it routes per "
                          f"{cls.level}); valid with expert={cfg.expert!r}: {', '.join(ok)}")
    cls.validate(cfg, getattr(kind.settings(cfg), "rank", 1))


class _Forced(NamedTuple):
    """Weights given to ``Mixture.force``, normalised; ``free`` (B,) marks rows left to the router (None: none)."""

    weights: Tensor
    free: Optional[Tensor]


def _forced_route(forced: _Forced, route: Optional[RouteWeights], bsz: int, device: torch.device) -> RouteWeights:
    """The forced decision; with ``route`` (the router's own), its rows stay where ``forced.free`` says."""
    w = forced.weights.to(device)
    w = w.expand(bsz, -1) if w.dim() == 1 else w
    if route is not None:
        if w.shape[0] != route.weights.shape[0]:
            raise ValueError(f"per-row forced weights have {w.shape[0]} rows; this batch has "
                             f"{route.weights.shape[0]}")
        w = torch.where(forced.free.to(device)[:, None], route.weights, w.to(route.weights.dtype))
    one_hot = bool(((w == 0) | (w == 1)).all())
    return RouteWeights(weights=w, index=w.argmax(-1) if one_hot else None,
                        logits=None if route is None else route.logits, aux={} if route is None else route.aux)
