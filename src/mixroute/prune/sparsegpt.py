"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS reconstruction, one layer at a time.

Written by hand because no installed library implements it. For a linear layer W (rows x cols) and its inputs
X, SparseGPT minimises ||W X - W' X||^2 over sparse W'. With H = 2 X^T X / n (the layer Hessian, cols x cols):

1. Dead inputs (zero Hessian diagonal: the feature was never active) get H_jj = 1 and their weights are zeroed.
2. Dampening: H += percdamp * mean(diag(H)) * I, so H is safely positive definite.
3. U = upper Cholesky factor of H^-1. Its rows give the OBS updates of the columns to the right, in order.
4. Columns are processed in blocks of ``blocksize``. The mask of a block is chosen by the OBS saliency
   w^2 / U_jj^2 (adaptive mask selection): lowest over the whole block (unstructured) or lowest M-N in each
   row group of M columns (N:M). Then column by column: zero the pruned weights, and spread the error
   (w - q) / U_jj over the remaining columns of the block with row j of U; after the block, the accumulated
   errors update all later columns at once (lazy batch updates).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mixroute.prune.masks import NMPattern, PatternLike, PruneError, check_nm_width, mask_from_scores, \
    resolve_target


class HessianAccumulator:
    """Running H = 2 X^T X / n over calibration tokens (float32, as in the paper) plus ||X_j||_2^2 for Wanda."""

    def __init__(self, width: int, hessian: bool = True, device: torch.device | str = "cpu"):
        self.width = width
        self.tokens = 0
        self.sq_norm = torch.zeros(width, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(width, width, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: Tensor) -> None:
        """Add a (tokens, width) batch of layer inputs."""
        x = x.detach().reshape(-1, self.width).to(self.sq_norm.device, torch.float32)
        self.tokens += x.shape[0]
        self.sq_norm += x.double().pow(2).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    @property
    def hessian(self) -> Tensor:
        if self.xtx is None:
            raise RuntimeError("this accumulator was created without a Hessian")
        return self.xtx * (2.0 / max(self.tokens, 1))

    @property
    def act_norm(self) -> Tensor:
        """||X_j||_2 over every calibration token (the Wanda input-feature norm)."""
        return self.sq_norm.sqrt().float()


def inverse_cholesky(hessian: Tensor, percdamp: float = 0.01, max_tries: int = 6) -> Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 with damp = percdamp * mean(diag H).

    If H is still not positive definite (rare: float32 round-off on nearly singular inputs) the dampening is
    raised tenfold and retried; the paper's code would stop with an error there.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = torch.diag(hessian).mean().clamp_min(1e-12)
    damp = percdamp
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        damp = max(damp * 10, 1e-4)
    raise PruneError(f"the layer Hessian is not positive definite even with dampening {damp / 10:g}; the "
                     "calibration data may be degenerate (too few or repeated tokens)")


def sparsegpt_prune_layer(weight: Tensor, hessian: Tensor, sparsity: Optional[float] = None,
                          pattern: Optional[PatternLike] = None, blocksize: int = 128,
                          percdamp: float = 0.01) -> Tensor:
    """Prune one linear weight (rows x cols) with SparseGPT given its input Hessian (cols x cols).

    Returns the pruned and OBS-updated weight (same dtype); zeros are exact. ``blocksize`` is rounded down to a
    multiple of M for N:M patterns so that groups never straddle two blocks.
    """
    sparsity, pat = resolve_target(sparsity, pattern)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise PruneError(f"Hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols}) for a {rows}x{cols} "
                         "weight")
    if pat is not None:
        check_nm_width(pat, cols, f"a {rows}x{cols} weight")
        blocksize = max(pat.m, blocksize // pat.m * pat.m)
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_cholesky(h, percdamp)
    for start in range(0, cols, blocksize):
        _prune_block(w, hinv, start, min(start + blocksize, cols), sparsity, pat)
    return w.to(weight.dtype)


def _prune_block(w: Tensor, hinv: Tensor, start: int, end: int, sparsity: Optional[float],
                 pat: Optional[NMPattern]) -> None:
    """Prune columns [start, end) of ``w`` in place and propagate their error to the columns after ``end``."""
    block = w[:, start:end].clone()
    hblock = hinv[start:end, start:end]
    diag = torch.diag(hblock)
    pruned = torch.zeros_like(block)
    errors = torch.zeros_like(block)
    if pat is None:
        mask = mask_from_scores(block.pow(2) / diag.pow(2).reshape(1, -1), sparsity=sparsity, per_row=False)
    else:
        mask = torch.zeros_like(block, dtype=torch.bool)
    for i in range(end - start):
        if pat is not None and i % pat.m == 0:  # choose the group's mask with the weights updated so far
            group = block[:, i:i + pat.m].pow(2) / diag[i:i + pat.m].pow(2).reshape(1, -1)
            mask[:, i:i + pat.m] = mask_from_scores(group, pattern=pat)
        col = block[:, i]
        kept = col.masked_fill(mask[:, i], 0.0)
        err = (col - kept) / diag[i]
        block[:, i:].sub_(err.unsqueeze(1) * hblock[i, i:].unsqueeze(0))
        pruned[:, i] = kept
        errors[:, i] = err
    w[:, start:end] = pruned
    w[:, end:].sub_(errors @ hinv[start:end, end:])
