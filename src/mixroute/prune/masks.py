"""Sparsity targets (unstructured ratio or N:M pattern) and the score -> mask selection shared by every method.

Convention: a mask is a bool tensor shaped like the weight, ``True`` = this weight is pruned (set to zero).
N:M keeps N of every M consecutive *input* weights of each output row (the last dim of an ``nn.Linear``
weight), so 2:4 and 4:8 are 50% sparse, 3:4 is 25%, 1:4 is 75%. Unstructured targets prune
``round(sparsity * group_size)`` weights per comparison group (a whole layer, a row, or a SparseGPT block).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

NM_CONVENTION = (
    "N:M keeps N of every M consecutive input weights in each output row (every group of M consecutive weights "
    "along the input dimension has at least M-N zeros); 2:4 and 4:8 are 50% sparse, 3:4 is 25%, 1:4 is 75%."
)


class PruneError(ValueError):
    """A bad pruning request (sparsity, pattern, shapes, calibration data, output directory)."""


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive input weights per output row."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


PatternLike = Union[str, NMPattern, tuple]


def parse_pattern(pattern: PatternLike) -> NMPattern:
    """Parse ``"N:M"`` (or an ``(n, m)`` tuple / ``NMPattern``); valid when 1 <= N < M."""
    if isinstance(pattern, NMPattern):
        n, m = pattern.n, pattern.m
    elif isinstance(pattern, tuple) and len(pattern) == 2:
        n, m = pattern
    else:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not match:
            raise PruneError(f"pattern {pattern!r} does not parse: expected N:M with integers 1 <= N < M, "
                             f"e.g. 2:4 (50%), 4:8 (50%), 3:4 (25%), 1:4 (75%). {NM_CONVENTION}")
        n, m = int(match.group(1)), int(match.group(2))
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or n >= m:
        raise PruneError(f"pattern {n}:{m} is invalid: need integers 1 <= N < M (N = weights kept per group of M; "
                         f"N = M would prune nothing). {NM_CONVENTION}")
    return NMPattern(n, m)


def check_sparsity(sparsity: float) -> float:
    """Validate an unstructured sparsity ratio: a number strictly between 0 and 1."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PruneError(f"sparsity {sparsity!r} is not a number; give a fraction strictly between 0 and 1, "
                         "e.g. 0.5") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise PruneError(f"sparsity {sparsity!r} is outside (0, 1): give the fraction of weights to prune, strictly "
                         "between 0 and 1, e.g. 0.5 for 50%")
    return value


def resolve_target(sparsity: Optional[float], pattern: Optional[PatternLike]) -> tuple[Optional[float],
                                                                                      Optional[NMPattern]]:
    """Exactly one of ``sparsity`` (unstructured) and ``pattern`` (N:M) must be given; returns them validated."""
    if (sparsity is None) == (pattern is None):
        raise PruneError("give exactly one of sparsity (unstructured, e.g. 0.5) and pattern (N:M, e.g. 2:4)")
    if pattern is not None:
        return None, parse_pattern(pattern)
    return check_sparsity(sparsity), None


def check_nm_width(pattern: NMPattern, width: int, name: str) -> None:
    """N:M groups run along the input dimension, so M must divide it."""
    if width % pattern.m:
        raise PruneError(f"pattern {pattern}: M={pattern.m} does not divide the input width {width} of {name}; "
                         f"choose an M that divides {width} (e.g. 4 or 8 for most models)")


def num_pruned(sparsity: float, size: int) -> int:
    """Weights pruned in a comparison group of ``size`` weights: ``round(sparsity * size)``."""
    return min(size, max(0, int(round(sparsity * size))))


def smallest_mask(scores: Tensor, k: int, dim: int = -1) -> Tensor:
    """Mask of the ``k`` smallest entries along ``dim`` (exactly k per slice; ties broken by index order)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        # stable sort: deterministic, exactly k per slice even with ties (all-zero dead columns, equal scores)
        idx = torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)
        mask.scatter_(dim, idx, True)
    return mask


def mask_from_scores(scores: Tensor, sparsity: Optional[float] = None, pattern: Optional[PatternLike] = None,
                     per_row: bool = True) -> Tensor:
    """Prune the lowest scores: per group of M along each row (N:M), per row, or over the whole tensor."""
    sparsity, pat = resolve_target(sparsity, pattern)
    rows, cols = scores.shape
    if pat is not None:
        check_nm_width(pat, cols, f"a {rows}x{cols} weight")
        groups = scores.reshape(rows, cols // pat.m, pat.m)
        return smallest_mask(groups, pat.pruned_per_group).reshape(rows, cols)
    if per_row:
        return smallest_mask(scores, num_pruned(sparsity, cols))
    return smallest_mask(scores.reshape(-1), num_pruned(sparsity, scores.numel())).reshape(rows, cols)


def magnitude_mask(weight: Tensor, sparsity: Optional[float] = None,
                   pattern: Optional[PatternLike] = None) -> Tensor:
    """Magnitude pruning: lowest |W| under one per-layer threshold (unstructured) or per row group of M (N:M)."""
    return mask_from_scores(weight.detach().abs(), sparsity, pattern, per_row=False)


def wanda_mask(weight: Tensor, act_norm: Tensor, sparsity: Optional[float] = None,
               pattern: Optional[PatternLike] = None) -> Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row (or row group of M).

    ``act_norm[j]`` is the L2 norm of input feature j over all calibration tokens (any common scale works: the
    comparison is within a row).
    """
    if act_norm.shape != (weight.shape[1],):
        raise PruneError(f"act_norm has shape {tuple(act_norm.shape)}; expected ({weight.shape[1]},), one norm per "
                         "input feature")
    scores = weight.detach().abs().float() * act_norm.float().reshape(1, -1)
    return mask_from_scores(scores, sparsity, pattern, per_row=True)


def prune_magnitude(weight: Tensor, sparsity: Optional[float] = None,
                    pattern: Optional[PatternLike] = None) -> Tensor:
    """A copy of ``weight`` with the magnitude mask applied."""
    return weight.masked_fill(magnitude_mask(weight, sparsity, pattern), 0)


def prune_wanda(weight: Tensor, act_norm: Tensor, sparsity: Optional[float] = None,
                pattern: Optional[PatternLike] = None) -> Tensor:
    """A copy of ``weight`` with the Wanda mask applied (Wanda does not update the kept weights)."""
    return weight.masked_fill(wanda_mask(weight, act_norm, sparsity, pattern), 0)
