"""Router pre-training: train only the label-aligned routers (MoP's gate, MoA's task routers) on category labels,
with the experts frozen, before the experts train (MoP) or before MoA's stage 2.

What a router reads does not change while only routers train, so its features are computed once per example
of the train and validation splits and every step is one small update on cached tensors:

* a router reading the frozen base (MoP's gate below the prompts, a global router's routing pre-pass) reads
  the base's hidden states at its layer;
* a per-layer router (the MoA paper's layout) reads its layer's input with the experts below it run as
  ``mixture.gate_pretrain_experts`` says: ``label`` forces every layer's experts to the example's label (as
  stage 2 runs once routing is right), ``uniform`` averages every expert, ``none`` runs the frozen base. Under
  ``label`` the label reaches the features through the experts below, so a router above the first can learn
  to read which expert ran rather than the domain, and its validation accuracy on these cached features
  overstates what it does when the routers below decide (bench/router_pretrain.py measures both).

Training cycles the whole train split in shuffled batches, validates after every epoch, stops once validation
cross-entropy has not improved by ``min_delta`` (relative) for ``patience`` epochs (or at the step cap) and
keeps the best weights: once every validation example is routed right, the cross-entropy keeps falling a little
each epoch as the logits sharpen, which buys no routing and cost minutes per run without the threshold. Without
this, stage 2 starts from routers whose random top-1 sends every input of a layer to one expert, and its
first validation can only keep that start or lose to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.arch import decoder, reading_layer_inputs
from mixroute.config import PRETRAIN_EXPERTS


@dataclass
class PretrainResult:
    """What ``pretrain_router`` did: steps and epochs run, the epoch kept, and its measures."""

    steps: int = 0
    epochs: int = 0
    best_epoch: int = 0                       # 0 = the start (no epoch improved validation)
    train_examples: int = 0
    first_ce: Optional[float] = None          # training cross-entropy of the first batch, before any update
    val_ce: Optional[float] = None            # of the kept weights, mean over routers
    val_accuracy: Optional[float] = None      # of the kept weights, mean over routers
    val_accuracy_per_router: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl line (losses left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


def trainable_label_routers(mix: nn.Module) -> list[str]:
    """Label-aligned routers with ``features`` and ``logits`` and trainable weights."""
    return [k for k, r in mix.routers.items() if r.label_aligned and hasattr(r, "logits") and hasattr(r, "features")
            and any(p.requires_grad for p in r.parameters())]


def label_aligned_keys(mix: nn.Module) -> list[str]:
    """Routers that pre-training fits: ``trainable_label_routers`` with an expert for every label (a MoP gate
    over fewer experts than categories has no label to fit)."""
    return [k for k in trainable_label_routers(mix) if mix.routers[k].num_experts >= mix.cfg.num_tasks]


@torch.no_grad()
def router_inputs(mix: nn.Module, batches: Sequence[dict], keys: Sequence[str],
                  experts: Optional[str] = None) -> dict[str, Tensor]:
    """{key: (N, H)} what each router reads for every example of ``batches`` (collator dicts on the model's
    device: input_ids, attention_mask, task_ids, optional prompt_mask), the experts below a per-layer router
    run as ``experts`` says (label, uniform, none; default ``mix.cfg.gate_pretrain_experts``); see the module
    docstring."""
    experts = experts or mix.cfg.gate_pretrain_experts
    if experts not in PRETRAIN_EXPERTS:
        raise ValueError(f"router_inputs: experts={experts!r}; valid: {', '.join(PRETRAIN_EXPERTS)}")
    prepass = [k for k in keys if k in mix.prepass_routers]
    hooked = [k for k in keys if k not in prepass]
    got: dict[str, list[Tensor]] = {k: [] for k in keys}
    now: dict[str, Tensor] = {}
    by_layer: dict[int, list[str]] = {}
    for k in hooked:
        by_layer.setdefault(mix.routers[k].read_layer, []).append(k)

    def grab(layer: int, args: tuple, kwargs: dict) -> None:
        for k in by_layer[layer]:
            got[k].append(mix.routers[k].features(args[0].float(), now["mask"]).cpu())

    num_experts = next(iter(mix.routers.values())).num_experts if mix.routers else 1
    with reading_layer_inputs(mix.model, grab, by_layer):
        for b in batches:
            mask = b["attention_mask"].bool()
            if b.get("prompt_mask") is not None:
                mask = mask & b["prompt_mask"].bool()
            now["mask"] = mask
            call = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            for k in prepass:
                hidden = mix.frozen_layer_input(mix.routers[k].read_layer, kwargs=call)
                got[k].append(mix.routers[k].features(hidden.float(), mask).cpu())
            if not hooked:
                continue
            if experts == "none":
                with mix.frozen():
                    decoder(mix.model)(**call, use_cache=False)
                continue
            labels = b["task_ids"].long().clamp_max(num_experts - 1)
            weights = (F.one_hot(labels, num_experts).float() if experts == "label"
                       else torch.full((len(labels), num_experts), 1.0 / num_experts))
            mix.force(weights)
            try:
                with mix.context.inputs(b["task_ids"], b.get("prompt_mask")):
                    decoder(mix.model)(**call, use_cache=False)
            finally:
                mix.force(None)
    return {k: torch.cat(v) for k, v in got.items()}


def _check_labels(batches: Sequence[dict], num_experts: int, split: str) -> None:
    for i, b in enumerate(batches):
        if b.get("task_ids") is None:
            raise ValueError(f"router pre-training: {split} batch {i} has no task_ids (category labels are required)")
        if int(b["task_ids"].max()) >= num_experts:
            raise ValueError(f"router pre-training: {split} batch {i} holds task id {int(b['task_ids'].max())} but "
                             f"the router has num_experts={num_experts}; labels must be in [0, {num_experts})")


def _measure(mix: nn.Module, keys: Sequence[str], x: dict[str, Tensor], y: Tensor) -> tuple[float, dict[str, float]]:
    """Mean cross-entropy over routers, and each router's accuracy, on cached features."""
    with torch.no_grad():
        ces, accs = [], {}
        for k in keys:
            router = mix.routers[k]
            logits = router.logits(x[k].to(next(router.parameters()).device)).cpu()
            ces.append(float(F.cross_entropy(logits, y)))
            accs[k] = float((logits.argmax(-1) == y).float().mean())
    return sum(ces) / len(ces), accs


def _inputs_and_labels(mix: nn.Module, batches: Sequence[dict], keys: Sequence[str]) -> tuple[dict, Tensor]:
    return router_inputs(mix, batches, keys), torch.cat([b["task_ids"].long().cpu() for b in batches])


@torch.no_grad()
def measure_routers(mix: nn.Module, batches: Sequence[dict],
                    keys: Optional[Sequence[str]] = None) -> tuple[float, dict[str, float]]:
    """(mean cross-entropy, accuracy per router) of the label-aligned routers on the labels of ``batches``."""
    keys = list(keys) if keys is not None else label_aligned_keys(mix)
    return _measure(mix, keys, *_inputs_and_labels(mix, batches, keys))


def pretrain_router(mix: nn.Module, train_batches: Sequence[dict], steps: int, lr: float = 1e-3,
                    val_batches: Sequence[dict] = (), batch_size: int = 32, patience: int = 3,
                    min_delta: float = 0.01, seed: int = 0, keys: Optional[Sequence[str]] = None) -> PretrainResult:
    """Fit the label-aligned routers (``keys``, default all) of ``mix`` alone on the labels of ``train_batches``
    for at most ``steps`` optimizer steps; see the module docstring. Only router weights change."""
    keys = list(keys) if keys is not None else label_aligned_keys(mix)
    if not keys:
        raise ValueError("router pre-training needs a label-aligned router with logits (router='gate' or 'task'); "
                         "this mixture has " + ", ".join(f"{k}: {type(r).name}" for k, r in mix.routers.items()))
    num_experts = mix.routers[keys[0]].num_experts
    _check_labels(train_batches, num_experts, "train")
    _check_labels(val_batches, num_experts, "validation")
    result = PretrainResult()
    if steps <= 0 or not train_batches:
        return result
    # the features may be computed under the caller's autocast (the base's forward is most of the cost)
    x, y = _inputs_and_labels(mix, train_batches, keys)
    vx, vy = _inputs_and_labels(mix, val_batches, keys) if val_batches else (None, None)
    result.train_examples = len(y)
    routers = [mix.routers[k] for k in keys]
    params = [p for r in routers for p in r.parameters() if p.requires_grad]
    device = params[0].device
    # The fit itself runs in float32 with autocast off: inside one autocast region torch caches each
    # parameter's half-precision copy until the region ends, so every forward would read the weights as they
    # were before the first optimizer step and the router would never move (measured: bf16 kept the
    # cross-entropy at ln E and the accuracy at chance). On cached features it costs milliseconds a step.
    with torch.autocast(device_type=device.type, enabled=False):
        opt = torch.optim.AdamW(params, lr=lr)
        modes = [r.training for r in routers]
        gen = torch.Generator().manual_seed(seed)
        best = (_measure(mix, keys, vx, vy)[0] if vx is not None else float("inf"))
        best_state = {k: {n: t.detach().clone() for n, t in mix.routers[k].state_dict().items()} for k in keys}
        bad = 0
        for r in routers:
            r.train()
        try:
            while result.steps < steps:
                order = torch.randperm(len(y), generator=gen)
                for i in range(0, len(y), batch_size):
                    idx = order[i:i + batch_size]
                    target = y[idx].to(device)
                    loss = torch.stack([F.cross_entropy(mix.routers[k].logits(x[k][idx].to(device)), target)
                                        for k in keys]).mean()
                    if result.first_ce is None:
                        result.first_ce = loss.item()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    result.losses.append(loss.item())
                    result.steps += 1
                    if result.steps >= steps:
                        break
                result.epochs += 1
                if vx is None:
                    continue
                ce, _ = _measure(mix, keys, vx, vy)
                if ce < best:
                    if ce < best * (1 - min_delta):
                        bad = 0
                    else:
                        bad += 1
                    best, result.best_epoch = ce, result.epochs
                    best_state = {k: {n: t.detach().clone() for n, t in mix.routers[k].state_dict().items()}
                                  for k in keys}
                else:
                    bad += 1
                if bad >= patience:
                    break
            if vx is not None:
                for k in keys:
                    mix.routers[k].load_state_dict(best_state[k])
                result.val_ce, accs = _measure(mix, keys, vx, vy)
                result.val_accuracy_per_router = accs
                result.val_accuracy = sum(accs.values()) / len(accs)
            else:
                result.best_epoch = result.epochs
        finally:
            # the last batch's gradient must not outlive the fit: the next stage's first optimizer step adds to
            # whatever .grad holds, and Adam's first step moves every weight by ~lr in its sign whatever its size
            # (measured: with MoA's routing loss off in stage 2, a layer-0 router that reads only the frozen
            # embeddings went from 85% to 80% validation accuracy in that one step)
            for p in params:
                p.grad = None
            for r, m in zip(routers, modes):
                r.train(m)
    return result
