"""``centroid`` router: each expert is represented by a prototype, the mean pooled hidden state of a few
example prompts of its domain (the same features the ``task`` router reads: the hidden states entering the
router's layer, mean-pooled over the prompt tokens). A prompt goes to the experts whose prototypes are closest
in cosine; weights are a softmax of the cosines over ``centroid_temperature`` (top-k kept, top-1 by default).

The prototypes are buffers, not parameters: nothing is trained, so adding an expert to a library needs only
its examples (``mixroute.library`` computes and sets them). A prototype left at zero scores cosine 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mixroute.config import MixtureConfig
from mixroute.routers.base import Router, RouterDims, RouteWeights, masked_mean, one_hot_route, top_k_weights


class CentroidRouter(Router):
    """Nearest-prototype (cosine) sequence router; see the module docstring."""

    name = "centroid"
    supports_global = True

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts
        self.top_k = min(cfg.top_k, dims.num_experts)
        self.temperature = cfg.centroid_temperature
        self.register_buffer("prototypes", torch.zeros(dims.num_experts, dims.hidden_size))

    def logits(self, pooled: Tensor) -> Tensor:
        """(B, E) cosine / temperature between pooled (B, H) features and the prototypes."""
        cos = F.normalize(pooled.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T
        return cos / self.temperature

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        logits = self.logits(masked_mean(hidden, mask))
        if self.top_k == 1:
            return one_hot_route(logits.argmax(dim=-1), self.num_experts, logits=logits)
        w = top_k_weights(logits.softmax(-1), self.top_k)
        return RouteWeights(weights=w.to(hidden.dtype), logits=logits)
