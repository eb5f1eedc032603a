"""``poly`` router (Poly, Ponti et al.; MHR, Caccia et al.): per-task allocation over an inventory of skills.

Each task owns allocation logits over the E skills, per LoRA module and per input split (``n_splits`` > 1 is
MHR), as in PEFT's ``PolyRouter``: relaxed-Bernoulli samples while training, sigmoid at evaluation,
normalised over skills. It declares ``level='task'``: the LoRA bank then mixes *parameters* per example
(A = sum w_s A_s, B = sum w_s B_s) instead of outputs. One router per decoder layer holds the logits of all
its M LoRA modules, so routing is computed once per layer: weights (B, M, n_splits, E).
``poly_mode='mu'`` has no allocation (every skill 1/E: the average adapter, no label needed); ``'z'`` trains
only the allocation (the skills stay frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from mixroute.config import MixtureConfig, f
from mixroute.routers.base import Router, RouterDims, RouteWeights, need_labels

EPS = 1e-12  # as PEFT


@dataclass
class PolyConfig:
    n_splits: int = f(1, "Heads splitting the input dimension; > 1 is MHR.", ge=1)
    poly_mode: Literal["full", "z", "mu"] = f("full", "Train skills + allocation (full), allocation only (MHR-z), "
                                                    "or one averaged adapter (MHR-mu).")


class PolyRouter(Router):
    """Task-indexed skill allocation for the M LoRA modules of one layer; see the module docstring."""

    name = "poly"
    Config = PolyConfig
    level = "task"
    label_aligned = False

    @classmethod
    def check_target(cls, cfg: MixtureConfig, path: str, fan_in: int, fan_out: int) -> None:
        n = cls.settings(cfg).n_splits
        if fan_in % n or fan_out % n:
            raise ValueError(f"mixture.routers.poly.n_splits={n} must divide {path}'s in/out features "
                             f"({fan_in}, {fan_out})")

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        s = self.settings(cfg)
        self.num_tasks, self.n_splits, self.num_experts = cfg.num_tasks, s.n_splits, dims.num_experts
        self.num_modules, self.mode = dims.num_modules, s.poly_mode
        self.needs_task_ids = self.mode != "mu"
        self.trains_experts = self.mode != "z"
        if self.mode != "mu":
            self.module_logits = nn.Parameter(torch.empty(dims.num_modules, cfg.num_tasks, s.n_splits,
                                                          dims.num_experts))
            nn.init.uniform_(self.module_logits, -1e-3, 1e-3)  # PEFT PolyRouter.reset

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        bsz = hidden.shape[0]
        if self.mode == "mu":
            w = torch.full((bsz, self.num_modules, self.n_splits, self.num_experts), 1.0 / self.num_experts,
                           device=hidden.device, dtype=hidden.dtype)
            return RouteWeights(weights=w, level="task")
        task_ids = need_labels(self.name, task_ids, self.num_tasks, self.module_logits.device)
        logits = self.module_logits[:, task_ids].transpose(0, 1)                 # (B, M, S, E)
        if self.training:
            logits = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            logits = torch.sigmoid(logits)
        w = (logits / (logits.sum(dim=-1, keepdim=True) + EPS)).to(hidden.dtype)
        return RouteWeights(weights=w, level="task")
