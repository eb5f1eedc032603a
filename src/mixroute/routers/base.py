"""What every router returns and declares, and small helpers shared by the routers.

A router is a small module ``forward(hidden, mask, task_ids) -> RouteWeights``: weights over *experts*, never
over an expert bank's internal layout. The bank that reads the route expands the weights to its own layout
(the LoRA bank repeats each expert's weight over its r ranks; the prompt bank turns them into attention
biases), so one router serves every expert kind it makes sense for, and adding a router never touches a bank.

Each router class also declares what the rest of the library used to guess from its name: ``name``, ``level``
(see ``Level``), ``label_aligned`` (expert t stands for category t: router accuracy, the classifier baseline,
category names in ``mixroute generate``), ``needs_task_ids`` (labels are needed at inference too),
``supports_global`` (one router for the whole model is meaningful), ``library_state`` (whether and from what an
expert library fills it: ``LibrarySource``; ``load_library_state`` does it), ``Config`` (its own settings: a dataclass read from
``mixture.routers.<name>``, see ``settings``) and ``validate(cfg)`` (config errors that name the field and what
would be valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import Tensor, nn

from mixroute.config import ConfigError, MixtureConfig, settings_of

# sequence: one decision per sequence, from its prompt tokens, kept through generation (MoA, MoP's gate, ...)
# token:    one decision per token (MoE-LoRA)
# rank:     per token, over the single ranks of the stacked LoRA bank (SMoRA); weights are (B, T, E*r)
# task:     a function of the task label only, mixing parameters per task (Poly/MHR); kept like sequence
Level = Literal["sequence", "token", "rank", "task"]
KEPT_LEVELS = ("sequence", "task")
# where an expert library (mixroute.library) takes a router's state from:
# examples: a ``prototypes`` buffer (E, H), each expert's mean prompt features at the router's layer
# lora:     ``prototypes`` (E, H) and ``gain`` (H,) derived from the experts' LoRA weights alone (Arrow)
# fitted:   the router's whole state, fitted on labelled prompts (``library fit-router``) or taken from a run
LibrarySource = Literal["examples", "lora", "fitted"]


@dataclass
class RouteWeights:
    """One router's decision for one forward.

    ``weights``: (B, E) for sequence-level routers, (B, T, E) token-level, (B, T, R) rank-level (R = E*r),
    (B, M, S, E) task-level (Poly: per LoRA module of the layer and per input split). ``index`` (B,) is set
    when every sequence uses exactly one expert (then ``weights`` is one-hot): the LoRA bank gathers that
    expert instead of running the whole stack. ``logits`` (B, E) are reported by label-aligned routers.
    """

    weights: Tensor
    level: Level = "sequence"
    index: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    # layouts derived once per forward and shared by every bank that reads this route (not a user field)
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def observed(self) -> Tensor:
        """Weights per expert as reports show them: Poly's are averaged over modules -> (B, S, E)."""
        return self.weights.mean(1) if self.level == "task" else self.weights

    def shared_index(self) -> Optional[int]:
        """The expert every sequence uses, when there is one (then a plain single-LoRA matmul suffices)."""
        if "shared" not in self._derived:
            idx = self.index
            one = idx is not None and idx.numel() > 0 and bool((idx == idx[0]).all())
            self._derived["shared"] = int(idx[0]) if one else None
        return self._derived["shared"]

    def per_rank(self, rank: int, dtype: torch.dtype) -> Tensor:
        """(B, 1 or T, E*r): the weight of every rank of a stacked bank of rank-``rank`` experts, in that
        order (expert 0's r ranks first, as the bank stacks them)."""
        key = ("per_rank", rank, dtype)
        if key not in self._derived:
            w = self.weights.to(dtype)
            w = w if self.level == "rank" else w.repeat_interleave(rank, dim=-1)
            self._derived[key] = w.unsqueeze(1) if w.dim() == 2 else w
        return self._derived[key]

    def reused(self, key: object, make) -> Any:
        """``make()`` for this decision, kept on it when autograd is off: decode steps that keep a prefill's
        decision then reuse what a bank derived from it (e.g. the gathered A/B of each sequence's expert)
        instead of recomputing it every step. With autograd on it is recomputed (no graph is kept alive)."""
        if torch.is_grad_enabled():
            return make()
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def select(self, rows: Tensor) -> "RouteWeights":
        """This decision restricted to (or repeated over) some batch rows."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return RouteWeights(weights=self.weights[rows], level=self.level, index=pick(self.index),
                            logits=pick(self.logits))

    def for_batch(self, bsz: int) -> "RouteWeights":
        """A prefill decision for a batch that ``generate`` widened (beams, num_return_sequences): HF repeats
        each row in place (``repeat_interleave``), so row b of the wide batch is row b // k of the prefill."""
        n = self.weights.shape[0]
        if n == bsz:
            return self
        if bsz % n:
            raise RuntimeError(f"decode batch {bsz} is not a multiple of the prefill batch {n}")
        return self.select(torch.arange(bsz, device=self.weights.device) // (bsz // n))

    def detach(self) -> "RouteWeights":
        """The decision without its graph or aux losses (what generation keeps from the prefill)."""
        det = lambda t: None if t is None else t.detach()  # noqa: E731
        return RouteWeights(weights=self.weights.detach(), level=self.level, index=self.index,
                            logits=det(self.logits))


@dataclass
class NoSettings:
    """The settings of a router that has none beyond what every mixture shares."""


@dataclass
class RouterDims:
    """Sizes a router is built for: the hidden states it reads, the experts it weighs, and the bank around it."""

    hidden_size: int
    num_experts: int
    rank: int = 1          # LoRA rank per expert (rank-level routers weigh E * rank single ranks)
    num_modules: int = 1   # LoRA modules this router serves in its layer (Poly's per-module allocation)


class Router(nn.Module):
    """The declarations every router makes (see the module docstring); subclasses implement ``forward``."""

    name: ClassVar[str]
    level: ClassVar[Level] = "sequence"
    label_aligned: ClassVar[bool] = False
    needs_task_ids: bool = False          # an instance may change it (Poly's 'mu' mode needs no label)
    supports_global: ClassVar[bool] = False
    trains_experts: bool = True           # False: the experts stay frozen (MHR-z trains only the allocation)
    library_state: ClassVar[Optional[LibrarySource]] = None   # None: it cannot route an expert library
    read_layer: int = 0                   # decoder layer whose input it reads (set by Mixture.attach)
    Config: ClassVar[type] = NoSettings   # its own settings: a dataclass with a help text per field

    @classmethod
    def settings(cls, cfg: MixtureConfig) -> Any:
        """This router's settings under ``cfg``: ``cfg.routers[name]`` typed as ``Config`` (defaults filled)."""
        return settings_of(cls.Config, (cfg.routers or {}).get(cls.name), f"mixture.routers.{cls.name}",
                           f"router {cls.name!r}")

    @classmethod
    def validate(cls, cfg: MixtureConfig, rank: int = 1) -> None:
        """Raise ``ConfigError`` for settings this router cannot work with (called before anything is built);
        ``rank``: the rank of each expert (1 for experts without ranks)."""
        cls.settings(cfg)
        if cfg.router_scope == "global" and not cls.supports_global:
            raise ConfigError(f"mixture.router_scope='global' is not valid with router {cls.name!r} (it routes "
                              "each layer from that layer's input); use router_scope='layer'")

    @classmethod
    def experts_for(cls, cfg: MixtureConfig) -> int:
        """How many experts this router weighs under ``cfg`` (``single`` always has one)."""
        return cfg.num_experts

    @classmethod
    def check_target(cls, cfg: MixtureConfig, path: str, fan_in: int, fan_out: int) -> None:
        """Raise for a projection (``path``, its in/out features) this router cannot serve; called for every
        target before anything is patched."""

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        raise NotImplementedError

    def update_balancing(self) -> None:
        """Called after each optimizer step; routers with loss-free load balancing (SMoRA) override it."""

    def load_library_state(self, key: str, library: Any) -> None:
        """Rebuild this router (key ``key`` in its mixture) from an expert library's state: ``library`` answers
        ``prototypes(layer)`` (the experts' example features entering ``layer``), ``arrow(key)`` (prototypes
        and gain from the LoRA weights) and ``fitted(key, names)`` (a fitted router's tensors), with the
        library's own errors when it lacks them. Routers that declare ``library_state`` override it; the rest
        hold no state a library could supply (uniform, oracle, ...), and are left as built."""


def need_labels(name: str, task_ids: Optional[Tensor], num_experts: int, device: torch.device) -> Tensor:
    """The task ids a label-routed router needs, checked: present and in [0, num_experts)."""
    if task_ids is None:
        raise ValueError(f"router {name!r} needs task_ids (pass task_ids= to Mixture.forward / generate)")
    task_ids = task_ids.to(device).long()
    if task_ids.numel() and (int(task_ids.max()) >= num_experts or int(task_ids.min()) < 0):
        raise ValueError(f"router {name!r}: task ids must be in [0, {num_experts}), got {task_ids.tolist()}")
    return task_ids


def check_experts_cover_labels(name: str, cfg: MixtureConfig, why: str) -> None:
    """Routers that send label t to expert t need num_experts >= num_tasks."""
    if cfg.num_experts < cfg.num_tasks:
        raise ConfigError(f"router {name!r} {why}: each of num_tasks={cfg.num_tasks} labels needs its own expert, "
                          f"but num_experts={cfg.num_experts}; set mixture.num_experts >= {cfg.num_tasks}")


def per_example(weights: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """Observed routing weights reduced to one vector per example: (B, E) as is; per token (B, T, E) or
    (B, T, E*r) the mean over the tokens ``token_mask`` (B, T) attends; Poly's (B, S, E) the mean over splits."""
    w = weights.detach().float()
    if w.dim() == 2:
        return w
    if token_mask is not None and token_mask.shape[1] == w.shape[1]:
        m = token_mask.to(w.device, w.dtype).unsqueeze(-1)
        return (w * m).sum(1) / m.sum(1).clamp_min(1.0)
    while w.dim() > 2:
        w = w.mean(1)
    return w


def expert_mass(routing: dict[str, Tensor], num_experts: int, token_mask: Optional[Tensor] = None,
                per_token: Optional[set[str]] = None) -> Optional[Tensor]:
    """(B, E): how much of each example went to each expert, averaged over the routers of ``routing`` (router
    key -> observed weights) and normalised to sum 1; rank-level weights (E*r) are folded into their experts.
    ``token_mask`` averages per-token weights over attended tokens, for the keys in ``per_token`` (default:
    any key whose weights have the mask's length). What federated usage statistics and the server's
    ``routing`` field report. None when no router's weights map to the experts."""
    vecs = []
    for key, w in routing.items():
        vec = per_example(w, token_mask if per_token is None or key in per_token else None)
        if vec.shape[-1] != num_experts and vec.shape[-1] % num_experts == 0:
            vec = vec.reshape(len(vec), num_experts, -1).sum(-1)
        if vec.shape[-1] != num_experts:
            continue
        vecs.append(vec / vec.sum(-1, keepdim=True).clamp_min(1e-12))
    return torch.stack(vecs).mean(0) if vecs else None


def masked_mean(hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is true; all positions if None."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# A position is an attention sink when its hidden-state norm is this many times the median of its sequence's
# read positions. Measured on SmolLM2-135M-Instruct (80 Dolly prompts, chat template): the first token's norm
# is 43-176x the median from layer 12 on, where no other token exceeds 1.6x; at layers 3-9 the first token is
# 5-10x and a few other positions reach 6-11x (they behave as secondary sinks and are left out with it).
# The first read position is always left out; 8 separates the rest with margin from layer 12 on.
SINK_NORM_RATIO = 8.0


def sink_free(hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(B, T) bool: the positions of ``mask`` (all when None) without attention sinks: the first read position
    of every sequence (the sink of a causal decoder, whatever the layer) and any position whose hidden-state
    norm exceeds ``SINK_NORM_RATIO`` times its sequence's median. A sequence with nothing left keeps ``mask``."""
    bsz, seq = hidden.shape[:2]
    read = torch.ones(bsz, seq, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    first = (read.long().cumsum(1) == 1) & read
    norms = hidden.detach().float().norm(dim=-1).masked_fill(~read, float("nan"))
    median = norms.nanmedian(dim=1, keepdim=True).values
    keep = read & ~first & ~(norms > SINK_NORM_RATIO * median)
    empty = ~keep.any(dim=1, keepdim=True)
    return torch.where(empty, read, keep)


def pool_prompt(hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(B, H) what a sequence-level router reads: the mean of ``hidden`` (B, T, H) over the read positions
    (``mask``: attended prompt tokens) with the attention sinks left out (``sink_free``). A plain mean is
    dominated by the sink (on SmolLM2 the pooled norm is ~790 with it, ~120 without) and then encodes little
    more than 1 / prompt length."""
    return masked_mean(hidden, sink_free(hidden, mask))


def small_init(linear: nn.Linear, std: float = 1e-3) -> nn.Linear:
    """A router's output layer drawn near zero: its first softmax is close to uniform (cross-entropy ~ ln E)
    yet the experts are not tied (argmax still varies with the input)."""
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def one_hot_route(index: Tensor, num_experts: int, aux: dict | None = None,
                  logits: Optional[Tensor] = None) -> RouteWeights:
    """A top-1-per-sequence decision: one-hot weights plus the index the LoRA bank gathers by."""
    weights = torch.nn.functional.one_hot(index, num_experts).float()
    return RouteWeights(weights=weights, level="sequence", index=index, logits=logits, aux=aux or {})


def top_k_weights(probs: Tensor, k: int) -> Tensor:
    """Keep each row's top-k probabilities, renormalised to sum 1 (zeros elsewhere)."""
    vals, idx = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
