"""``gate`` router (MoP, Dun et al. 2023): one weight per prompt expert, decided once per sequence.

A small MLP reads the frozen model's hidden states entering decoder layer ``gate_layer`` (the output of layer
``gate_layer - 1``; 0 = the embeddings), mean-pooled over the prompt tokens, and outputs a softmax over the E
prompt experts (optionally only the top ``gate_top_k``, renormalised). The prompt experts use the *log* of
these weights as an additive attention bias on each expert's prompt columns (``experts/prompt.py``), so the
router hands out ``log_weights`` directly: computing them as a log-softmax keeps the gradient finite where a
top-k gate has exact zeros (log 0 = -inf, never differentiated).

Training adds ``eta * CE(logits, task_ids)`` (``gate_ce``) when the batch carries category labels; expert t is
then aligned with category t and the logits are reported as label-aligned router logits. ``pretrain_gate``
trains the gate alone on those labels ("before" prompt training).

The same module also serves the parameter-free prompt routers: ``single`` (E=1, weight 1), ``uniform``
(1/E each) and ``oracle`` (all weight on the expert of the task label).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.config import MixtureConfig
from mixroute.routers.base import masked_mean

PROMPT_ROUTERS = ("gate", "single", "uniform", "oracle")


@dataclass
class Gate:
    """One gate decision: ``weights`` (B, E) sum to 1 per row; ``log_weights`` = log(weights) (-inf = off)."""

    weights: Tensor
    log_weights: Tensor
    logits: Optional[Tensor] = None
    aux: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "Gate":
        return Gate(self.weights.detach(), self.log_weights.detach(),
                    None if self.logits is None else self.logits.detach())

    def for_batch(self, bsz: int) -> "Gate":
        """This decision for a batch that generate() expanded (beams / num_return_sequences)."""
        n = self.weights.shape[0]
        if n == bsz:
            return self
        if n == 1 or bsz % n == 0:
            rep = bsz // n
            pick = lambda t: None if t is None else t.repeat_interleave(rep, dim=0)  # noqa: E731
            return Gate(pick(self.weights), pick(self.log_weights), pick(self.logits))
        raise RuntimeError(f"decode batch {bsz} is not a multiple of the prefill batch {n}")


class GateRouter(nn.Module):
    """Sequence-level gate over E prompt experts (see the module docstring). ``mode`` is the router name."""

    level = "sequence"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int, mode: str = "gate") -> None:
        super().__init__()
        if mode not in PROMPT_ROUTERS:
            raise ValueError(f"mixture.router={mode!r} cannot route prompt experts; valid with expert='prompt': "
                             f"{', '.join(PROMPT_ROUTERS)}")
        if mode == "oracle" and num_experts < cfg.num_tasks:
            raise ValueError(f"router 'oracle' sends each of num_tasks={cfg.num_tasks} labels to its own prompt "
                             f"expert, but num_experts={num_experts}; set mixture.num_experts >= {cfg.num_tasks}")
        self.mode, self.num_experts, self.eta = mode, num_experts, cfg.eta
        self.top_k = cfg.gate_top_k if cfg.gate_top_k and cfg.gate_top_k < num_experts else None
        self.layer = 0                      # set by install_prompt_experts (the resolved gate_layer)
        self.forced: Optional[Tensor] = None
        if mode == "gate":
            # the pooled residual stream of a mid layer has a large, layer-dependent scale: normalise it first
            self.norm = nn.LayerNorm(hidden_size)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, cfg.gate_hidden), nn.GELU(),
                                     nn.Linear(cfg.gate_hidden, num_experts))

    def force(self, weights: Optional[Tensor]) -> None:
        """Override the gate with fixed weights (E,) or (B, E) (>= 0; zeros switch experts off); None undoes."""
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.shape[-1] != self.num_experts or bool((weights < 0).any()):
                raise ValueError(f"forced gate weights must be >= 0 with last dim num_experts={self.num_experts}, "
                                 f"got shape {tuple(weights.shape)}")
            weights = weights / weights.sum(-1, keepdim=True)
        self.forced = weights

    def logits(self, pooled: Tensor) -> Tensor:
        """(B, E) gate logits from pooled (B, H) hidden states (float32)."""
        w = self.mlp[0].weight
        return self.mlp(self.norm(pooled.to(device=w.device, dtype=w.dtype))).float()

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Gate:
        bsz, dev = hidden.shape[0], hidden.device
        if self.forced is not None:
            w = self.forced.to(dev).expand(bsz, -1) if self.forced.dim() == 1 else self.forced.to(dev)
            return Gate(w, w.log(), None)
        if self.mode in ("single", "uniform"):
            w = torch.full((bsz, self.num_experts), 1.0 / self.num_experts, device=dev)
            return Gate(w, w.log())
        if self.mode == "oracle":
            if task_ids is None:
                raise ValueError("router 'oracle' needs task_ids (pass task_ids= to Mixture.forward / generate)")
            task_ids = task_ids.to(dev).long()
            if int(task_ids.max()) >= self.num_experts or int(task_ids.min()) < 0:
                raise ValueError(f"router 'oracle': task ids must be in [0, {self.num_experts}), got "
                                 f"{task_ids.tolist()}")
            w = F.one_hot(task_ids, self.num_experts).float()
            return Gate(w, w.log())
        logits = self.logits(masked_mean(hidden, mask))
        aux = {}
        if task_ids is not None and self.eta > 0:
            task_ids = task_ids.to(logits.device).long()
            if int(task_ids.max()) < self.num_experts:
                aux["gate_ce"] = self.eta * F.cross_entropy(logits, task_ids)
        kept = logits
        if self.top_k is not None:
            idx = logits.topk(self.top_k, dim=-1).indices
            off = torch.ones_like(logits, dtype=torch.bool).scatter(-1, idx, False)
            kept = logits.masked_fill(off, float("-inf"))
        log_w = kept.log_softmax(-1)
        return Gate(log_w.exp(), log_w, logits, aux)


def pretrain_gate(mixture: nn.Module, batches: Iterable[dict], steps: int, lr: float = 1e-3) -> list[float]:
    """Train only the MoP gate on category labels (cross-entropy vs ``task_ids``) before the prompts.

    ``batches``: collator dicts with ``input_ids``, ``attention_mask``, ``task_ids`` and optionally
    ``prompt_mask``; cycled until ``steps`` optimizer steps (a non-sequence iterable is read into a list once).
    The frozen model runs only up to the gate layer, once per distinct batch (features are cached: they do not
    depend on anything trained). Returns the loss of every step.
    """
    from mixroute.experts.prompt import gate_features

    gate = mixture.routers["gate"] if "gate" in mixture.routers else None
    if not isinstance(gate, GateRouter) or gate.mode != "gate":
        raise ValueError("pretrain_gate needs a MoP mixture with router='gate' (expert='prompt')")
    data: Sequence[dict] = batches if isinstance(batches, Sequence) else list(batches)
    if steps <= 0 or not data:
        return []
    for i, b in enumerate(data):
        if b.get("task_ids") is None:
            raise ValueError(f"pretrain_gate: batch {i} has no task_ids (category labels are required)")
        if int(b["task_ids"].max()) >= gate.num_experts:
            raise ValueError(f"pretrain_gate: batch {i} holds task id {int(b['task_ids'].max())} but the gate has "
                             f"num_experts={gate.num_experts}; labels must be in [0, {gate.num_experts})")
    feats: dict[int, Tensor] = {}
    opt = torch.optim.AdamW([p for p in gate.parameters() if p.requires_grad], lr=lr)
    was_training, losses = gate.training, []
    gate.train()
    for step, i in zip(range(steps), itertools.cycle(range(len(data)))):
        if i not in feats:
            b = data[i]
            feats[i] = gate_features(mixture, b["input_ids"], b.get("attention_mask"), b.get("prompt_mask"))
        target = data[i]["task_ids"].to(feats[i].device).long()
        loss = F.cross_entropy(gate.logits(feats[i]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    gate.train(was_training)
    return losses
