"""Gate pre-training (MoP): train only a label-aligned sequence router on category labels, before the experts.

The frozen model runs only up to the layer the router reads, once per distinct batch: the pooled features do
not depend on anything trained, so they are cached and every step is one small MLP update.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.routers import masked_mean


class _Reached(Exception):
    """Stops a forward once the router's layer has been reached: nothing above it is needed."""


@torch.no_grad()
def router_features(mix: nn.Module, key: str, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    prompt_mask: Optional[Tensor] = None) -> Tensor:
    """(B, H) what router ``key`` reads: the hidden states entering its layer, mean-pooled over the attended
    prompt tokens."""
    from mixroute.arch import decoder_layers

    layer = decoder_layers(mix.model)[mix.routers[key].read_layer]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if prompt_mask is not None:
        mask = mask & prompt_mask.bool()
    got: list[Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append(masked_mean(args[0] if args else kwargs["hidden_states"], mask))
        raise _Reached

    # prepended: runs before the mixture's own router hook on that layer
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        mix.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"router_features: the layer router {key!r} reads was not reached")
    return got[0]


def pretrain_gate(mix: nn.Module, batches: Iterable[dict], steps: int, lr: float = 1e-3,
                  key: str = "gate") -> list[float]:
    """Train only router ``key`` (it needs a ``logits(pooled)`` method: the MoP gate, the task router) on
    category labels (cross-entropy vs ``task_ids``). ``batches``: collator dicts with ``input_ids``,
    ``attention_mask``, ``task_ids`` and optionally ``prompt_mask``, cycled until ``steps`` optimizer steps.
    Returns the loss of every step."""
    router = mix.routers[key] if key in mix.routers else None
    if router is None or not router.label_aligned or not hasattr(router, "logits"):
        raise ValueError(f"pretrain_gate needs a label-aligned router with logits at key {key!r} (router='gate' "
                         "or 'task'); this mixture has "
                         + ", ".join(f"{k}: {type(r).name}" for k, r in mix.routers.items()))
    num_experts = router.num_experts
    data: Sequence[dict] = batches if isinstance(batches, Sequence) else list(batches)
    if steps <= 0 or not data:
        return []
    for i, b in enumerate(data):
        if b.get("task_ids") is None:
            raise ValueError(f"pretrain_gate: batch {i} has no task_ids (category labels are required)")
        if int(b["task_ids"].max()) >= num_experts:
            raise ValueError(f"pretrain_gate: batch {i} holds task id {int(b['task_ids'].max())} but the router has "
                             f"num_experts={num_experts}; labels must be in [0, {num_experts})")
    feats: dict[int, Tensor] = {}
    opt = torch.optim.AdamW([p for p in router.parameters() if p.requires_grad], lr=lr)
    was_training, losses = router.training, []
    router.train()
    for _, i in zip(range(steps), itertools.cycle(range(len(data)))):
        if i not in feats:
            b = data[i]
            feats[i] = router_features(mix, key, b["input_ids"], b.get("attention_mask"), b.get("prompt_mask"))
        loss = F.cross_entropy(router.logits(feats[i]), data[i]["task_ids"].to(feats[i].device).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    router.train(was_training)
    return losses
