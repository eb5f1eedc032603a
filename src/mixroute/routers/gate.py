"""``gate`` router (MoP, Dun et al. 2023): a soft weight per expert, decided once per sequence.

A small MLP reads the hidden states entering its decoder layer (for prompt experts ``gate_layer``: the output
of layer ``gate_layer - 1``; 0 = the embeddings), mean-pooled over the prompt tokens, and outputs a softmax over
the E experts (optionally only the top ``gate_top_k``, renormalised). With prompt experts the bank adds
``log(weight)`` to the attention logits of each expert's prompt columns (``experts/prompt.py``).

Training adds ``eta * CE(logits, task_ids)`` (``gate_ce``) when the batch carries category labels; expert t is
then aligned with category t. ``mixroute.train.gate.pretrain_router`` trains the gate alone on those labels
before the experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.config import MixtureConfig, f
from mixroute.routers.base import Router, RouterDims, RouteWeights, pool_prompt, small_init


@dataclass
class GateConfig:
    eta: float = f(0.1, "Weight of the routing cross-entropy against the category label.", ge=0.0)
    gate_hidden: int = f(256, "Hidden size of the gate MLP.", ge=1)
    gate_top_k: Optional[int] = f(None, "Keep the top-k experts per sequence and renormalise, in training and "
                                        "inference (null = all E, a soft gate).", ge=1)


class GateRouter(Router):
    """Sequence-level MLP gate; see the module docstring."""

    name = "gate"
    Config = GateConfig
    label_aligned = True
    supports_global = True

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        s = self.settings(cfg)
        self.num_experts, self.eta = dims.num_experts, s.eta
        self.top_k = s.gate_top_k if s.gate_top_k and s.gate_top_k < dims.num_experts else None
        # the pooled residual stream of a mid layer has a large, layer-dependent scale: normalise it first
        self.norm = nn.LayerNorm(dims.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(dims.hidden_size, s.gate_hidden), nn.GELU(),
                                 small_init(nn.Linear(s.gate_hidden, dims.num_experts)))

    def features(self, hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
        """(B, H) what the gate reads from the hidden states entering its layer."""
        return pool_prompt(hidden, mask)

    def logits(self, pooled: Tensor) -> Tensor:
        """(B, E) float32 gate logits from ``features`` (B, H)."""
        w = self.mlp[0].weight
        return self.mlp(self.norm(pooled.to(device=w.device, dtype=w.dtype))).float()

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        logits = self.logits(self.features(hidden, mask))
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
        return RouteWeights(weights=kept.softmax(-1), logits=logits, aux=aux)
