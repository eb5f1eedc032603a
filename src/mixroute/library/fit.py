"""Fitting on frozen experts: the task router (``library fit-router``) and per-expert loss estimates
(``library calibrate``). Both read pooled prompt features once (one pass over the data) and fit small linear
heads on them: minutes on a CPU, and no expert weight changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mixroute.config import MixtureConfig
from mixroute.library.data import labelled_batches, progress
from mixroute.library.features import layer_features
from mixroute.library.manifest import state_kind
from mixroute.routers import RouterDims
from mixroute.routers.task import TaskRouter


def _key_features(lib, mix, batches: list[dict], weights: list[Tensor], scope: str) -> dict[str, Tensor]:
    """{router key: (N, H) the features that router reads}: per layer with ``weights`` fixing the experts
    applied below, or (global) the frozen base's at the library's global layer, under the global router's key."""
    if scope == "global":
        layer = lib.global_layer()
        return {"global": layer_features(mix, batches, frozen=True)[layer]}
    feats = layer_features(mix, batches, weights)
    return {key: feats[r.read_layer] for key, r in mix.routers.items()}


def _scope_extra(lib, scope: str) -> dict:
    return {"router_layer": lib.global_layer()} if scope == "global" else {}


def fit_task_router(lib, data: str | Path, steps: int = 300, lr: float = 1e-2, batch_size: int = 8,
                    max_examples: Optional[int] = None, scope: str = "layer") -> dict:
    """Train only the task router (one linear classifier per layer, MoA) to pick each record's expert (its
    ``category`` names the expert). Features are read with the label's expert active in the layers below, as
    MoA's stage 2 trains with teacher forcing; with ``scope='global'`` one router on the frozen base's
    features at the library's global layer."""
    batches, names = labelled_batches(data, lib.man, lib.tok, batch_size, need_labels=True,
                                      max_examples=max_examples)
    mix = lib._attach("uniform", 0.0)
    n = len(names)
    labels = torch.cat([b["task_ids"] for b in batches])
    state, acc = {}, {}
    keys = _key_features(lib, mix, batches, [F.one_hot(b["task_ids"], n).float() for b in batches], scope)
    with progress("fit task router", len(keys), lib.progress) as advance:
        for key, x in keys.items():
            # the router itself (LayerNorm + linear, as MoA's stage 2 uses it), trained on its cached features
            router = TaskRouter(MixtureConfig(num_experts=n, num_tasks=n), RouterDims(x.shape[1], n))
            opt = torch.optim.AdamW(router.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(router.logits(x), labels).backward()
                opt.step()
            with torch.no_grad():
                acc[key] = float((router.logits(x).argmax(-1) == labels).float().mean())
            state.update({f"{key}.{name}": t.detach().float() for name, t in router.state_dict().items()})
            advance()
    mean_acc = sum(acc.values()) / len(acc)
    lib._write_state(state_kind(TaskRouter.name, scope), state, names,
                     {"examples": int(len(labels)), "train_accuracy": round(mean_acc, 4), **_scope_extra(lib, scope)})
    return {"examples": int(len(labels)), "train_accuracy": mean_acc}


@torch.no_grad()
def expert_losses(mix, batches: list[dict], num_experts: int, advance=lambda n=1: None) -> Tensor:
    """(N, E): each example's mean response NLL with each expert forced alone."""
    from mixroute.evaluate import held_out_pass

    cols = []
    for e in range(num_experts):
        w = torch.zeros(num_experts)
        w[e] = 1.0
        mix.force(w)
        try:
            held = held_out_pass(mix.model, mix, batches)
        finally:
            mix.force(None)
        cols.append(held.nll / held.tokens.clamp_min(1))
        advance()
    return torch.stack(cols, dim=1)


def calibrate(lib, data: str | Path, batch_size: int = 8, ridge: float = 1.0,
              max_examples: Optional[int] = None, scope: str = "layer") -> dict:
    """Fit, per router layer, a ridge regression from pooled prompt features to each expert's loss on the
    prompt's response. Cost-aware routing then uses minus the predicted loss as predicted quality. The
    features are read with every expert at weight 1/E below (the routing a prompt will get is unknown); with
    ``scope='global'``, one regression on the frozen base's features at the library's global layer."""
    batches, _ = labelled_batches(data, lib.man, lib.tok, batch_size, need_labels=False, max_examples=max_examples)
    n = len(lib.man.experts)
    mix = lib._attach("uniform", 0.0)
    keys = _key_features(lib, mix, batches, [torch.full((len(b["input_ids"]), n), 1.0 / n) for b in batches], scope)
    with progress("expert losses", n, lib.progress) as advance:
        y = expert_losses(mix, batches, n, advance)
    state = {}
    best_hit = []
    for key, x in keys.items():
        xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        reg = ridge * torch.eye(xb.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0.0    # the bias is not shrunk
        w = torch.linalg.solve(xb.T @ xb + reg, xb.T @ y.double())    # (H+1, E)
        state[f"{key}.weight"], state[f"{key}.bias"] = w[:-1].T.float().contiguous(), w[-1].float().contiguous()
        best_hit.append(float(((xb @ w).argmin(-1) == y.argmin(-1)).double().mean()))
    names = lib.man.names()
    oracle = float(y.min(1).values.mean())
    lib._write_state(state_kind("calibration", scope), state, names,
                     {"examples": int(len(y)), "ridge": ridge, **_scope_extra(lib, scope)})
    return {"examples": int(len(y)), "best_expert_accuracy": sum(best_hit) / len(best_hit),
            "mean_loss": {nm: float(y[:, i].mean()) for i, nm in enumerate(names)}, "oracle_loss": oracle}
