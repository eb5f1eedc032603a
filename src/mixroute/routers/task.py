"""``task`` router (MoA, Feng et al. 2024): one sequence-level decision per input.

A linear classifier reads the hidden states entering its decoder layer, mean-pooled over the prompt tokens,
and scores the E experts. Training adds ``eta * CE(logits, task_ids)`` (``routing_ce``); the LoRAs follow the
label (``route_train='label'``, teacher forcing) or the router's own top-k. Inference keeps the top-k
(top-1 by default: the cost of one LoRA). One router per layer is shared by the layer's attention and MLP
LoRAs (``router_scope='layer'``), or one router reads the first layer's input (``'global'``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.config import MixtureConfig
from mixroute.routers.base import Route, dense_route, index_route, masked_mean


class TaskRouter(nn.Module):
    """Sequence-level classifier router; see the module docstring."""

    level = "sequence"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts, self.rank = num_experts, cfg.rank
        self.top_k = min(cfg.top_k, num_experts)
        self.eta, self.route_train = cfg.eta, cfg.route_train
        self.proj = nn.Linear(hidden_size, num_experts)
        if cfg.route_train == "label" and num_experts < cfg.num_tasks:
            raise ValueError(f"router 'task' with route_train='label' sends label t to expert t, but "
                             f"num_experts={num_experts} < num_tasks={cfg.num_tasks}")

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Route:
        pooled = masked_mean(hidden, mask)
        logits = self.proj(pooled.to(self.proj.weight.dtype)).float()
        aux: dict[str, Tensor] = {}
        if task_ids is not None and self.eta > 0:
            task_ids = task_ids.to(logits.device).long()
            if int(task_ids.max()) < self.num_experts:
                aux["routing_ce"] = self.eta * F.cross_entropy(logits, task_ids)
        if self.training and self.route_train == "label":
            if task_ids is None:
                raise ValueError("router 'task' with route_train='label' needs task_ids while training")
            route = index_route(task_ids.to(logits.device).long(), self.num_experts, self.rank, aux)
            route.logits = logits
            return route
        if self.top_k == 1:
            route = index_route(logits.argmax(dim=-1), self.num_experts, self.rank, aux)
        else:
            vals, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
            w = torch.zeros_like(logits).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
            route = dense_route(w.to(hidden.dtype), self.rank, "sequence", aux)
        route.logits = logits
        return route
