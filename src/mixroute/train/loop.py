"""One optimisation step and one held-out pass: the two building blocks of every recipe.

``train_step`` runs the micro-batches of one optimizer step (gradient accumulation), with the LM head only at
label positions (``logits_for="labels"``), clipping and a finite-loss check. ``held_out_pass`` runs the frozen
model (or a mixture) over held-out batches without gradients and returns per-example sums from which
perplexity, gate statistics, router accuracy and the classifier baseline are computed (``mixroute.evaluate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "prompt_mask", "task_ids")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN / inf; the message names the step and the last good checkpoint."""


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Tensor]:
    """The batch-dict tensors (docs/architecture.md, "Batches") on ``device``."""
    return {k: batch[k].to(device) for k in BATCH_KEYS if k in batch and batch[k] is not None}


@dataclass
class StepStats:
    """What one optimizer step measured (averaged over its micro-batches)."""

    loss: float
    lm_loss: float
    aux_loss: float
    tokens: int
    grad_norm: float


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
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if clip_grad > 0:
        norm = accelerator.clip_grad_norm_(params, clip_grad)
    else:
        norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    grad_norm = float(norm)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    unwrapped = accelerator.unwrap_model(mix)
    if hasattr(unwrapped, "update_balancing"):
        unwrapped.update_balancing()
    return StepStats(loss_sum / n, lm_sum / n, aux_sum / n, tokens, grad_norm)


@dataclass
class HeldOut:
    """Per-example results of ``held_out_pass`` (N examples, concatenated over batches)."""

    nll: Tensor                                   # (N,) summed NLL of the response tokens
    tokens: Tensor                                # (N,) response tokens
    task_ids: Tensor                              # (N,)
    routing: dict[str, Tensor] = field(default_factory=dict)       # key -> (N, E) weights per example
    router_probs: dict[str, Tensor] = field(default_factory=dict)  # key -> (N, E) softmax of router logits
    pooled: Optional[Tensor] = None               # (N, H) pooled hidden states read at ``capture_layer``


def _per_example(weights: Tensor, token_level: bool, token_mask: Optional[Tensor]) -> Tensor:
    """Reduce observable routing weights to one vector per example: (B, E) as is; (B, T, E) / (B, T, R) mean
    over attended tokens; Poly (B, S, E) mean over splits."""
    w = weights.detach().float()
    if w.dim() == 2:
        return w
    if token_level and token_mask is not None and token_mask.shape[1] == w.shape[1]:
        m = token_mask.to(w.dtype).unsqueeze(-1)
        return (w * m).sum(1) / m.sum(1).clamp_min(1.0)
    return w.mean(1)


@torch.no_grad()
def held_out_pass(model: nn.Module, mix: Optional[nn.Module], batches: Iterable[dict[str, Tensor]],
                  device: torch.device | str = "cpu", capture_layer: Optional[int] = None) -> HeldOut:
    """Teacher-forced pass over held-out batches: response-token NLL per example, routing per example and,
    with ``capture_layer``, the hidden states entering that decoder layer mean-pooled over the prompt tokens
    (what a sequence-level router reads)."""
    from mixroute.routers.base import masked_mean

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    was_training = mix.training if mix is not None else model.training
    (mix or model).eval()
    nll, toks, tasks, pooled = [], [], [], []
    routing: dict[str, list[Tensor]] = {}
    probs: dict[str, list[Tensor]] = {}
    captured: list[Tensor] = []
    handle = None
    if capture_layer is not None:
        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
        handle = decoder.layers[capture_layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for raw in batches:
            b = to_device(raw, device)
            captured.clear()
            ctx = mix.context.inputs(b.get("task_ids"), b.get("prompt_mask")) if mix is not None else _null()
            with ctx:
                hidden = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 use_cache=False).last_hidden_state
            target = b["labels"][:, 1:]
            keep = target != -100
            logits = head(hidden[:, :-1][keep]).float()
            tok_nll = F.cross_entropy(logits, target[keep], reduction="none")
            row = keep.nonzero()[:, 0]
            nll.append(torch.zeros(len(target), device=tok_nll.device).index_add_(0, row, tok_nll).cpu())
            toks.append(keep.sum(1).cpu())
            tasks.append(b["task_ids"].cpu())
            if captured:
                mask = b["attention_mask"].bool()
                if "prompt_mask" in b:
                    mask = mask & b["prompt_mask"].bool()
                pooled.append(masked_mean(captured[0].float(), mask).cpu())
            if mix is not None:
                for key, w in mix.context.routing.items():
                    level = getattr(mix.routers[key], "level", "sequence") if key in mix.routers else "sequence"
                    vec = _per_example(w, level == "token", b["attention_mask"].bool())
                    routing.setdefault(key, []).append(vec.cpu())
                for key, lg in mix.context.router_logits.items():
                    probs.setdefault(key, []).append(lg.detach().float().softmax(-1).cpu())
    finally:
        if handle is not None:
            handle.remove()
        if was_training and mix is not None:
            train_mode(mix)
    return HeldOut(
        nll=torch.cat(nll) if nll else torch.zeros(0), tokens=torch.cat(toks) if toks else torch.zeros(0),
        task_ids=torch.cat(tasks) if tasks else torch.zeros(0, dtype=torch.long),
        routing={k: torch.cat(v) for k, v in routing.items()}, router_probs={k: torch.cat(v) for k, v in probs.items()},
        pooled=torch.cat(pooled) if pooled else None,
    )


def train_mode(mix: nn.Module) -> None:
    """Experts and routers in training mode, the frozen base model in eval mode (no base dropout)."""
    mix.train()
    base = getattr(mix, "model", None)
    if base is not None:
        base.eval()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
