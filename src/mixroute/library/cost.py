"""Cost-aware selection (Tryage, arXiv 2308.11601): pick argmax over experts of predicted quality - lambda *
cost(e).

``CostAware`` wraps a sequence-level router of a library's mixture. Predicted quality is the inner router's
probability (softmax of its logits), or, once the library is calibrated, minus a linear estimate of each
expert's loss on the prompt read from the same pooled features. With lambda = 0 and no calibration it passes
the inner router's decision through unchanged. ``row_cost_weight`` lets a server give each row of a batch its
own lambda (NaN rows use the default).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mixroute.routers.base import Router, RouteWeights, one_hot_route, pool_prompt


class CostAware(Router):
    """A sequence-level router whose top-1 choice trades predicted quality against per-expert costs."""

    name = "cost_aware"   # not in the registry: built only by the library around a registered router
    level = "sequence"

    def __init__(self, inner: Router, costs: Tensor, cost_weight: float,
                 quality: Optional[nn.Linear] = None) -> None:
        super().__init__()
        self.inner = inner
        self.read_layer = inner.read_layer
        self.label_aligned, self.needs_task_ids = inner.label_aligned, inner.needs_task_ids
        self.register_buffer("costs", costs.float())
        self.cost_weight = cost_weight
        self.quality = quality                  # pooled (B, H) -> predicted loss per expert (B, E)
        self.row_cost_weight: Optional[Tensor] = None
        self.last: dict[str, Tensor] = {}       # quality and score of the last decision (``library route``)

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        route = self.inner(hidden, mask, task_ids)
        lam = torch.full((hidden.shape[0],), float(self.cost_weight), device=hidden.device)
        if self.row_cost_weight is not None:
            row = self.row_cost_weight.to(hidden.device).float()
            lam = torch.where(row.isnan(), lam, row)
        if self.quality is None and not bool((lam > 0).any()):
            self.last = {}
            return route
        if self.quality is not None:
            pooled = pool_prompt(hidden, mask).to(self.quality.weight.dtype)
            q = -self.quality(pooled).float()
        elif route.logits is not None:
            q = route.logits.float().softmax(-1)
        else:
            q = route.weights.float()
        score = q - lam[:, None] * self.costs.to(q.device)
        self.last = {"quality": q.detach(), "score": score.detach()}
        return one_hot_route(score.argmax(-1), score.shape[-1], route.aux, route.logits)
