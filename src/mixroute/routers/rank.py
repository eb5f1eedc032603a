"""``rank`` router (SMoRA): every one of the E*r ranks of the stacked LoRA bank is an expert.

Per token a linear router scores all R = E*r ranks with a sigmoid; the top ``rank_top_k`` are kept,
normalised to sum 1 and rescaled by k, and the bank computes ``B diag(g) A x``. It declares ``level='rank'``:
its weights are already in the bank's rank layout (B, T, R). Load balancing needs no auxiliary loss: a
per-rank bias (a buffer, never trained) is added to the scores for the top-k choice only, and after each
optimizer step ``update_balancing()`` nudges it by ``sign(mean load - load) * rate``. One router per layer:
its gates are shared by all the layer's LoRA projections (rank i of every projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from mixroute.config import ConfigError, MixtureConfig, f
from mixroute.routers.base import Router, RouterDims, RouteWeights, small_init


@dataclass
class RankRouterConfig:
    rank_top_k: int = f(8, "Ranks kept per token out of num_experts * rank.", ge=1)
    bias_update_rate: float = f(1e-5, "Step of the per-rank load-balancing bias.", ge=0.0)


class RankRouter(Router):
    """Per-token sigmoid top-k over single ranks with loss-free bias balancing; see the module docstring."""

    name = "rank"
    Config = RankRouterConfig
    level = "rank"

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_ranks = dims.num_experts * dims.rank
        s = self.settings(cfg)
        self.top_k = s.rank_top_k
        self.rate = s.bias_update_rate
        # normalised input: raw residual-stream scales differ by 100x between sink and ordinary tokens
        self.norm = nn.LayerNorm(dims.hidden_size)
        self.proj = small_init(nn.Linear(dims.hidden_size, self.num_ranks, bias=False), std=0.02)
        self.register_buffer("balance_bias", torch.zeros(self.num_ranks))
        self.register_buffer("load", torch.zeros(self.num_ranks), persistent=False)

    @classmethod
    def validate(cls, cfg: MixtureConfig, rank: int = 1) -> None:
        super().validate(cfg, rank)
        k = cls.settings(cfg).rank_top_k
        if k > cfg.num_experts * rank:
            raise ConfigError(f"mixture.routers.rank.rank_top_k={k} exceeds the {cfg.num_experts * rank} ranks "
                              f"(num_experts * rank = {cfg.num_experts} * {rank})")

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        scores = torch.sigmoid(self.proj(self.norm(hidden.to(self.proj.weight.dtype))).float())    # (B, T, R)
        idx = (scores + self.balance_bias).topk(self.top_k, dim=-1).indices
        vals = scores.gather(-1, idx)
        g = torch.zeros_like(scores).scatter(-1, idx, vals / vals.sum(-1, keepdim=True) * self.top_k)
        if self.training:
            with torch.no_grad():
                chosen = torch.zeros_like(scores).scatter(-1, idx, 1.0)
                if mask is not None:
                    chosen = chosen * mask.to(chosen.dtype).unsqueeze(-1)
                self.load += chosen.sum((0, 1))
        return RouteWeights(weights=g.to(hidden.dtype), level="rank")

    @torch.no_grad()
    def update_balancing(self) -> None:
        """After optimizer.step(): move the bias towards equal load, then reset the load counter."""
        if self.load.sum() > 0:
            self.balance_bias += torch.sign(self.load.mean() - self.load) * self.rate
        self.load.zero_()
