"""``task`` router (MoA, Feng et al. 2024): one sequence-level decision per input.

A linear classifier reads the hidden states entering its decoder layer, pooled over the prompt tokens without
the attention sinks (``pool_prompt``) and normalised (LayerNorm), and scores the E experts. Its projection
starts near zero, so the first routing cross-entropy is ln E (a uniform guess) rather than the 12-24 nats a
default init gave on raw features from the middle layers on (bench/router_features.py), whose gradient swamped
the experts' in the first steps. Training adds ``eta * CE(logits, task_ids)`` (``routing_ce``); the experts
follow the label (``route_train='label'``, teacher forcing) or the router's own top-k. Inference keeps the top-k
(top-1 by default: the cost of one expert). With LoRA experts one router per layer is shared by the layer's
attention and MLP LoRAs (``router_scope='layer'``, as the paper), or one router decides once per sequence for
every layer (``'global'``): it reads the frozen base's hidden states entering ``router_layer`` in a routing
pre-pass (``Mixture``), so its features do not depend on the experts and can be computed before them, which is
also what an engine taking one adapter per request needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.config import MixtureConfig, f
from mixroute.routers.base import (Router, RouterDims, RouteWeights, check_experts_cover_labels, need_labels,
                                   one_hot_route, pool_prompt, small_init, top_k_weights)


@dataclass
class TaskRouterConfig:
    top_k: int = f(1, "Experts kept per sequence at inference.", ge=1)
    eta: float = f(0.1, "Weight of the routing cross-entropy against the category label.", ge=0.0)
    route_train: Literal["label", "router"] = f("router", "Routing in training: by the label (teacher forcing) "
                                                         "or by the router's own top-1.")


class TaskRouter(Router):
    """Sequence-level classifier router; see the module docstring."""

    name = "task"
    Config = TaskRouterConfig
    label_aligned = True
    supports_global = True
    library_state = "fitted"

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts
        s = self.settings(cfg)
        self.top_k = min(s.top_k, dims.num_experts)
        self.eta, self.route_train = s.eta, s.route_train
        self.norm = nn.LayerNorm(dims.hidden_size)
        self.proj = small_init(nn.Linear(dims.hidden_size, dims.num_experts))

    @classmethod
    def validate(cls, cfg: MixtureConfig, rank: int = 1) -> None:
        super().validate(cfg, rank)
        if cls.settings(cfg).route_train == "label":
            check_experts_cover_labels(cls.name, cfg, "with route_train='label' sends label t to expert t")

    def load_library_state(self, key: str, library: Any) -> None:
        self.load_state_dict(library.fitted(key, list(self.state_dict())))

    def features(self, hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
        """(B, H) what the router reads from the hidden states entering its layer."""
        return pool_prompt(hidden, mask)

    def logits(self, pooled: Tensor) -> Tensor:
        """(B, E) float32 logits from ``features`` (B, H)."""
        return self.proj(self.norm(pooled.to(self.proj.weight.dtype))).float()

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        logits = self.logits(self.features(hidden, mask))
        aux: dict[str, Tensor] = {}
        if task_ids is not None and self.eta > 0:
            task_ids = task_ids.to(logits.device).long()
            if int(task_ids.max()) < self.num_experts:
                aux["routing_ce"] = self.eta * F.cross_entropy(logits, task_ids)
        if self.training and self.route_train == "label":
            return one_hot_route(need_labels(self.name, task_ids, self.num_experts, logits.device),
                                 self.num_experts, aux, logits)
        if self.top_k == 1:
            return one_hot_route(logits.argmax(dim=-1), self.num_experts, aux, logits)
        w = top_k_weights(logits.softmax(-1), self.top_k)
        return RouteWeights(weights=w.to(hidden.dtype), logits=logits, aux=aux)
