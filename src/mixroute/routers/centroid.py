"""``centroid`` router: each expert is represented by a prototype, the mean pooled hidden state of a few
example prompts of its domain (the same features the ``task`` router reads: the hidden states entering the
router's layer, pooled over the prompt tokens without the attention sinks). Features and prototypes are
layer-normalised before the cosine, so one large residual dimension does not decide it. A prompt goes to the
experts whose prototypes are closest in cosine; weights are a softmax of the cosines over
``centroid_temperature`` (top-k kept, top-1 by default).

The prototypes are buffers, not parameters: nothing is trained, so adding an expert to a library needs only
its examples (``mixroute.library`` computes and sets them). A prototype left at zero scores cosine 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mixroute.config import MixtureConfig, f
from mixroute.routers.base import Router, RouterDims, RouteWeights, one_hot_route, pool_prompt, top_k_weights


@dataclass
class CentroidConfig:
    top_k: int = f(1, "Experts kept per sequence.", ge=1)
    centroid_temperature: float = f(0.1, "Softmax temperature over the cosines between a prompt's pooled hidden "
                                         "state and each expert's prototype.", gt=0.0)


class CentroidRouter(Router):
    """Nearest-prototype (cosine) sequence router; see the module docstring."""

    name = "centroid"
    Config = CentroidConfig
    supports_global = True
    library_state = "examples"

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts
        s = self.settings(cfg)
        self.top_k = min(s.top_k, dims.num_experts)
        self.temperature = s.centroid_temperature
        self.register_buffer("prototypes", torch.zeros(dims.num_experts, dims.hidden_size))

    def load_library_state(self, key: str, library: Any) -> None:
        self.prototypes.copy_(library.prototypes(self.read_layer))

    def features(self, hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
        """(B, H) what the router (and a prototype) reads from the hidden states entering its layer."""
        return pool_prompt(hidden, mask)

    def logits(self, pooled: Tensor) -> Tensor:
        """(B, E) cosine / temperature between ``features`` (B, H) and the prototypes."""
        h = pooled.shape[-1]
        protos = self.prototypes.float()
        # a prototype left at zero stays zero (cosine 0) instead of becoming layer_norm's constant vector
        protos = torch.where(protos.abs().sum(-1, keepdim=True) > 0, F.layer_norm(protos, (h,)), protos)
        cos = F.normalize(F.layer_norm(pooled.float(), (h,)), dim=-1) @ F.normalize(protos, dim=-1).T
        return cos / self.temperature

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        logits = self.logits(self.features(hidden, mask))
        if self.top_k == 1:
            return one_hot_route(logits.argmax(dim=-1), self.num_experts, logits=logits)
        w = top_k_weights(logits.softmax(-1), self.top_k)
        return RouteWeights(weights=w.to(hidden.dtype), logits=logits)
