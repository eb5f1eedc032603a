"""``rank`` router (SMoRA): every one of the E*r ranks of the stacked bank is an expert.

Per token a linear router scores all R = E*r ranks with a sigmoid; the top ``rank_top_k`` are kept,
normalised to sum 1 and rescaled by k, and the bank computes ``B diag(g) A x``. Load balancing needs no
auxiliary loss: a per-rank bias (a buffer, never trained) is added to the scores for the top-k choice only,
and after each optimizer step ``update_balancing()`` nudges it by ``sign(mean load - load) * rate``.
One router per layer: its gates are shared by all the layer's LoRA projections (rank i of every projection).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mixroute.config import MixtureConfig
from mixroute.routers.base import Route


class RankRouter(nn.Module):
    """Per-token sigmoid top-k over single ranks with loss-free bias balancing; see the module docstring."""

    level = "token"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_ranks = num_experts * cfg.rank
        if cfg.rank_top_k > self.num_ranks:
            raise ValueError(f"rank_top_k={cfg.rank_top_k} exceeds the {self.num_ranks} ranks "
                             f"(num_experts * rank = {num_experts} * {cfg.rank})")
        self.top_k = cfg.rank_top_k
        self.rate = cfg.bias_update_rate
        self.proj = nn.Linear(hidden_size, self.num_ranks, bias=False)
        self.register_buffer("balance_bias", torch.zeros(self.num_ranks))
        self.register_buffer("load", torch.zeros(self.num_ranks), persistent=False)

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Route:
        scores = torch.sigmoid(self.proj(hidden.to(self.proj.weight.dtype)).float())    # (B, T, R)
        idx = (scores + self.balance_bias).topk(self.top_k, dim=-1).indices
        vals = scores.gather(-1, idx)
        g = torch.zeros_like(scores).scatter(-1, idx, vals / vals.sum(-1, keepdim=True) * self.top_k)
        if self.training:
            with torch.no_grad():
                chosen = torch.zeros_like(scores).scatter(-1, idx, 1.0)
                if mask is not None:
                    chosen = chosen * mask.to(chosen.dtype).unsqueeze(-1)
                self.load += chosen.sum((0, 1))
        g = g.to(hidden.dtype)
        return Route(weights=g, level="token", expanded=g)

    @torch.no_grad()
    def update_balancing(self) -> None:
        """After optimizer.step(): move the bias towards equal load, then reset the load counter."""
        if self.load.sum() > 0:
            self.balance_bias += torch.sign(self.load.mean() - self.load) * self.rate
        self.load.zero_()
