"""``poly`` router (Poly, Ponti et al.; MHR, Caccia et al.): per-task allocation over an inventory of skills.

Each task owns allocation logits over the E skills, per LoRA module and per input split (``n_splits`` > 1 is
MHR), as in PEFT's ``PolyRouter``: relaxed-Bernoulli samples while training, sigmoid at evaluation,
normalised over skills. The bank then mixes *parameters* (A = sum w_s A_s, B = sum w_s B_s) per example.
One router per decoder layer holds the logits of all its M LoRA modules, so routing is computed once per
layer: logits (M, num_tasks, n_splits, E). ``poly_mode='mu'`` has no allocation: every skill has weight 1/E
(the average adapter).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from mixroute.config import MixtureConfig
from mixroute.routers.base import Route

EPS = 1e-12  # as PEFT


class PolyRouter(nn.Module):
    """Task-indexed skill allocation for the M LoRA modules of one layer; see the module docstring."""

    level = "sequence"

    def __init__(self, cfg: MixtureConfig, hidden_size: int, num_experts: int, num_modules: int) -> None:
        super().__init__()
        self.num_tasks, self.n_splits, self.num_experts = cfg.num_tasks, cfg.n_splits, num_experts
        self.num_modules, self.mode = num_modules, cfg.poly_mode
        if self.mode != "mu":
            self.module_logits = nn.Parameter(torch.empty(num_modules, cfg.num_tasks, cfg.n_splits, num_experts))
            nn.init.uniform_(self.module_logits, -1e-3, 1e-3)  # PEFT PolyRouter.reset

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> Route:
        bsz = hidden.shape[0]
        if self.mode == "mu":
            w = torch.full((self.num_modules, bsz, self.n_splits, self.num_experts), 1.0 / self.num_experts,
                           device=hidden.device, dtype=hidden.dtype)
            return Route(weights=w.mean(0), level="sequence", poly=w)
        if task_ids is None:
            raise ValueError("router 'poly' needs task_ids (pass task_ids= to Mixture.forward / generate)")
        task_ids = task_ids.to(self.module_logits.device).long()
        if int(task_ids.max()) >= self.num_tasks:
            raise ValueError(f"router 'poly': task id {int(task_ids.max())} >= num_tasks={self.num_tasks}")
        logits = self.module_logits[:, task_ids]                                  # (M, B, S, E)
        if self.training:
            logits = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            logits = torch.sigmoid(logits)
        w = (logits / (logits.sum(dim=-1, keepdim=True) + EPS)).to(hidden.dtype)
        return Route(weights=w.mean(0), level="sequence", poly=w)
