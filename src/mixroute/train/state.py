"""Checkpoints without pickle: mixture weights, optimizer, scheduler and RNG states as safetensors + JSON.

A checkpoint directory ``checkpoints/step-N/`` holds

* ``mixture.safetensors`` + ``mixture.json`` (``Mixture.save``),
* ``trainer_state.safetensors``: the optimizer's per-parameter tensors (``opt.<i>.<name>``) and the torch /
  numpy RNG states as uint8 / uint32 tensors,
* ``trainer.json``: step, optimizer param groups, scheduler state, python / numpy RNG scalars, data position.

It is written into a temporary sibling and renamed into place (``fileio.atomic_dir``), so a killed run never
leaves half a checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mixroute.fileio import atomic_dir
from mixroute.rundir import CHECKPOINTS, checkpoint_dir

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer.json"


# ------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch / numpy / python RNG states as (tensors, JSON-able values)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"python": [version, list(internal), gauss],
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------ optimizer / scheduler
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW (any torch optimizer with tensor/number state) as tensors + JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """LambdaLR state without its lambdas (rebuilt from the config): counters and learning rates."""
    sd = scheduler.state_dict()
    return {k: v for k, v in sd.items() if k != "lr_lambdas" and _jsonable(v)}


def load_scheduler_state(scheduler: Any, meta: dict[str, Any]) -> None:
    sd = dict(meta)
    sd["lr_lambdas"] = [None] * len(getattr(scheduler, "lr_lambdas", [None]))
    scheduler.load_state_dict(sd)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir: Path, step: int, mix: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    extra: Optional[dict[str, Any]] = None, keep: int = 2) -> Path:
    """Write ``checkpoints/step-<step>`` atomically; keep the newest ``keep`` checkpoints."""
    target = checkpoint_dir(run_dir, step)
    with atomic_dir(target) as tmp:
        mix.save(str(tmp))
        opt_t, opt_m = optimizer_state(optimizer)
        rng_t, rng_m = rng_state()
        save_file({**opt_t, **rng_t}, str(tmp / STATE_TENSORS), metadata={"format": "mixroute.trainer"})
        meta = {"step": step, "optimizer": opt_m, "scheduler": scheduler_state(scheduler), "rng": rng_m,
                **(extra or {})}
        (tmp / STATE_JSON).write_text(json.dumps(meta))
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old[1], ignore_errors=True)
    return target


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file():
            try:
                found.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns trainer.json (step, data position...)."""
    tensors = load_file(str(Path(ckpt) / STATE_TENSORS))
    meta = json.loads((Path(ckpt) / STATE_JSON).read_text())
    load_optimizer_state(optimizer, tensors, meta["optimizer"])
    load_scheduler_state(scheduler, meta["scheduler"])
    set_rng_state(tensors, meta["rng"])
    return meta
