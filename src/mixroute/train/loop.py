"""One optimisation step, the building block of every recipe (its held-out counterpart is
``mixroute.evaluate.held_out_pass``).

``train_step`` runs the micro-batches of one optimizer step (gradient accumulation), with the LM head only at
label positions (``logits_for="labels"``), clipping per parameter group and a finite-loss check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN / inf; the message names the step and the last good checkpoint."""


@dataclass
class StepStats:
    """What one optimizer step measured (averaged over its micro-batches)."""

    loss: float
    lm_loss: float
    aux_loss: float
    tokens: int
    grad_norm: float                       # the experts' (before clipping)
    router_grad_norm: Optional[float] = None   # the routers' (before clipping), when they train


def train_step(mix: nn.Module, micro_batches: list[dict[str, Tensor]], optimizer: Any, scheduler: Any,
               accelerator: Any, clip_grad: float, step: int) -> StepStats:
    """Forward + backward over the micro-batches, clip, optimizer and scheduler step, SMoRA balancing.

    Raises ``TrainingDiverged`` before touching the weights when a loss or the gradient norm is not finite.
    """
    n = len(micro_batches)
    loss_sum = lm_sum = aux_sum = 0.0
    tokens = 0
    for batch in micro_batches:
        out = mix(**batch, logits_for="labels")
        loss = out.loss
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"loss is {loss.item()} at step {step}")
        accelerator.backward(loss / n)
        loss_sum += loss.item()
        lm_sum += out.lm_loss.item()
        aux_sum += sum(v.item() for v in out.aux_losses.values())
        tokens += int(batch["attention_mask"].sum())
    # each parameter group (experts, routers) is clipped on its own: a router's cross-entropy gradient can be
    # 100x the experts' early on, and one joint norm would then rescale every expert update by it
    norms = {}
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            continue
        if clip_grad > 0:
            norms[g.get("name", "params")] = float(accelerator.clip_grad_norm_(params, clip_grad))
        else:
            norms[g.get("name", "params")] = float(torch.norm(torch.stack([p.grad.norm() for p in params])))
    grad_norm = norms.get("experts", next(iter(norms.values()), 0.0))
    if not all(math.isfinite(v) for v in norms.values()):
        grad_norm = next(v for v in norms.values() if not math.isfinite(v))
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    unwrapped = accelerator.unwrap_model(mix)
    if hasattr(unwrapped, "update_balancing"):
        unwrapped.update_balancing()
    return StepStats(loss_sum / n, lm_sum / n, aux_sum / n, tokens, grad_norm, norms.get("routers"))


def train_mode(mix: nn.Module) -> None:
    """Experts and routers in training mode, the frozen base model in eval mode (no base dropout)."""
    mix.train()
    base = getattr(mix, "model", None)
    if base is not None:
        base.eval()

