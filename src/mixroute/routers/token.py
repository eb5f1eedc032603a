"""``token_topk`` router (MoE-LoRA, LLaVA-MoLE, MixLoRA): every token picks its top-k experts.

A linear router on the token's hidden state (the input of its decoder layer, normalised by a LayerNorm: raw
residual-stream scales differ by 100x between sink and ordinary tokens; one router per layer, shared by the
layer's projections) gives a softmax over experts; the top-k are kept and renormalised. The Switch
Transformers load-balancing loss ``E * sum_e f_e p_e`` (f = fraction of routed token slots sent to e, p =
mean router probability of e, over attended tokens) is returned as ``load_balance`` weighted by
``load_balance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from mixroute.config import ConfigError, MixtureConfig, f
from mixroute.routers.base import Router, RouterDims, RouteWeights, small_init


@dataclass
class TokenTopKConfig:
    top_k: int = f(1, "Experts kept per token.", ge=1)
    load_balance: float = f(0.01, "Weight of the Switch load-balancing loss.", ge=0.0)


class TokenTopKRouter(Router):
    """Per-token softmax top-k router; see the module docstring."""

    name = "token_topk"
    Config = TokenTopKConfig
    level = "token"

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts
        s = self.settings(cfg)
        self.top_k = min(s.top_k, dims.num_experts)
        self.lb_weight = s.load_balance
        self.norm = nn.LayerNorm(dims.hidden_size)
        self.proj = small_init(nn.Linear(dims.hidden_size, dims.num_experts, bias=False), std=0.02)

    @classmethod
    def validate(cls, cfg: MixtureConfig, rank: int = 1) -> None:
        super().validate(cfg, rank)
        if cls.settings(cfg).top_k > cfg.num_experts:
            raise ConfigError(f"mixture.routers.{cls.name}.top_k={cls.settings(cfg).top_k} exceeds "
                              f"mixture.num_experts={cfg.num_experts}")

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        probs = self.proj(self.norm(hidden.to(self.proj.weight.dtype))).float().softmax(dim=-1)   # (B, T, E)
        vals, idx = probs.topk(self.top_k, dim=-1)
        w = torch.zeros_like(probs).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
        aux: dict[str, Tensor] = {}
        if self.training and self.lb_weight > 0:
            m = torch.ones(probs.shape[:2], device=probs.device) if mask is None else mask.to(probs.dtype)
            n = m.sum().clamp_min(1.0)
            chosen = torch.zeros_like(probs).scatter(-1, idx, 1.0)
            f = (chosen * m.unsqueeze(-1)).sum((0, 1)) / (n * self.top_k)
            p = (probs * m.unsqueeze(-1)).sum((0, 1)) / n
            aux["load_balance"] = self.lb_weight * self.num_experts * (f * p).sum()
        return RouteWeights(weights=w.to(hidden.dtype), level="token", aux=aux)
