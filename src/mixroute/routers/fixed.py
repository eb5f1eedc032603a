"""Fixed routers with no parameters: ``single`` (one expert: plain LoRA / plain prompt tuning), ``uniform``
(every expert with weight 1/E) and ``oracle`` (each sequence to the expert of its task label)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mixroute.config import MixtureConfig
from mixroute.routers.base import (Router, RouterDims, RouteWeights, check_experts_cover_labels, need_labels,
                                   one_hot_route)


class SingleRouter(Router):
    """E = 1: every token uses the one expert."""

    name = "single"
    supports_global = True

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()

    @classmethod
    def experts_for(cls, cfg: MixtureConfig) -> int:
        return 1

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        return one_hot_route(torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device), 1)


class UniformRouter(Router):
    """Every expert with weight 1/E (an average of the experts' outputs)."""

    name = "uniform"
    supports_global = True

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        w = torch.full((hidden.shape[0], self.num_experts), 1.0 / self.num_experts, device=hidden.device,
                       dtype=hidden.dtype)
        return RouteWeights(weights=w)


class OracleRouter(Router):
    """Route sequence b to expert ``task_ids[b]`` (labels needed at inference too)."""

    name = "oracle"
    label_aligned = True
    needs_task_ids = True
    supports_global = True

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts

    @classmethod
    def validate(cls, cfg: MixtureConfig, rank: int = 1) -> None:
        super().validate(cfg, rank)
        check_experts_cover_labels(cls.name, cfg, "routes each label to its own expert")

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        return one_hot_route(need_labels(self.name, task_ids, self.num_experts, hidden.device), self.num_experts)
