"""Fixed routers with no parameters: ``single`` (one plain LoRA), ``uniform`` (average of all experts) and
``oracle`` (route each sequence to the expert of its task label)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mixroute.config import MixtureConfig
from mixroute.routers.base import Route, dense_route, index_route


class SingleRouter(nn.Module):
    """E = 1: every token uses the one expert (plain LoRA)."""

    level = "sequence"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts, self.rank = num_experts, cfg.rank

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Route:
        index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        return Route(weights=torch.ones(hidden.shape[0], 1, device=hidden.device), index=index, shared_index=0)


class UniformRouter(nn.Module):
    """Every expert with weight 1/E (an output average; two dense matmuls over the stacked bank)."""

    level = "sequence"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts, self.rank = num_experts, cfg.rank

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Route:
        w = torch.full((hidden.shape[0], self.num_experts), 1.0 / self.num_experts, device=hidden.device,
                       dtype=hidden.dtype)
        return dense_route(w, self.rank, "sequence")


class OracleRouter(nn.Module):
    """Route sequence b to expert ``task_ids[b]`` (needs task ids; num_experts >= number of labels)."""

    level = "sequence"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        if num_experts < cfg.num_tasks:
            raise ValueError(f"router 'oracle' routes each of num_tasks={cfg.num_tasks} labels to its own expert, "
                             f"but num_experts={num_experts}; set mixture.num_experts >= {cfg.num_tasks}")
        self.num_experts, self.rank = num_experts, cfg.rank

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Route:
        if task_ids is None:
            raise ValueError("router 'oracle' needs task_ids (pass task_ids= to Mixture.forward / generate)")
        task_ids = task_ids.to(hidden.device).long()
        if int(task_ids.max()) >= self.num_experts or int(task_ids.min()) < 0:
            raise ValueError(f"router 'oracle': task id {int(task_ids.max())} has no expert "
                             f"(num_experts={self.num_experts}); labels must be in [0, {self.num_experts})")
        return index_route(task_ids, self.num_experts, self.rank)
