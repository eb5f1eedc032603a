"""What every router returns, and small helpers shared by the routers.

A router is a small module with ``forward(hidden, mask, task_ids) -> Route``. The expert banks only read a
``Route``: they never know which router made it, so adding a router never touches the banks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

Level = Literal["sequence", "token"]


@dataclass
class Route:
    """Routing decision of one router for one forward.

    Exactly one of ``index``, ``expanded`` or ``poly`` drives the expert bank (checked in that order):

    * ``index`` (B,) long: top-1 expert per sequence -> the bank gathers that expert's A/B (cost of one LoRA).
      ``shared_index`` is set when every sequence uses the same expert (a plain 2-D LoRA matmul).
    * ``expanded`` (B, 1, E*r) or (B, T, E*r): weight of every rank of the stacked bank (expert weights
      repeated over each expert's r ranks, or SMoRA's per-rank gates) -> two dense matmuls.
    * ``poly`` (M, B, n_splits, E): per-module, per-example parameter-mixing weights (Poly/MHR).

    ``weights`` is what users observe (MixtureOutput.routing): (B, E), (B, T, E), (B, T, R) or (B, S, E).
    """

    weights: Tensor
    level: Level = "sequence"
    index: Optional[Tensor] = None
    shared_index: Optional[int] = None
    expanded: Optional[Tensor] = None
    poly: Optional[Tensor] = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    logits: Optional[Tensor] = None  # (B, E) router logits of label-aligned routers (router accuracy)

    def select(self, rows: Tensor) -> "Route":
        """This route restricted to some batch rows (used when generate() expands the batch)."""
        return Route(
            weights=self.weights[rows], level=self.level,
            index=None if self.index is None else self.index[rows], shared_index=self.shared_index,
            expanded=None if self.expanded is None else self.expanded[rows],
            poly=None if self.poly is None else self.poly[:, rows],
            logits=None if self.logits is None else self.logits[rows],
        )


def masked_mean(hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is true; all positions if None."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def index_route(index: Tensor, num_experts: int, rank: int, aux: dict | None = None) -> Route:
    """A top-1-per-sequence route: one-hot observable weights plus the gather fast path."""
    weights = torch.nn.functional.one_hot(index, num_experts).float()
    shared = int(index[0]) if index.numel() > 0 and bool((index == index[0]).all()) else None
    return Route(weights=weights, level="sequence", index=index, shared_index=shared, aux=aux or {})


def dense_route(weights: Tensor, rank: int, level: Level, aux: dict | None = None) -> Route:
    """A soft / sparse route over experts: (B, E) or (B, T, E) weights expanded over each expert's r ranks."""
    exp = weights.repeat_interleave(rank, dim=-1)
    if exp.dim() == 2:
        exp = exp.unsqueeze(1)
    return Route(weights=weights, level=level, expanded=exp, aux=aux or {})
