"""``Library.from_run``: a library from a trained run's final mixture."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from torch import Tensor

from mixroute.library.manifest import LibraryError, state_kind
from mixroute.routers import router_class


def from_run(cls: type, path: str | Path, run_dir: str | Path, max_rank: int = 64, router: str = "centroid",
             examples_per_expert: int = 32, progress: bool = False):
    """A library holding every LoRA expert of a trained run's final mixture, named after the run's
    categories when its router is label-aligned (else expert-<i>), with centroid prototypes from the run's
    training prompts of each category and, for MoA runs, its trained task router (per layer, or global: then
    the library's global routing reads the run's router layer)."""
    from mixroute.rundir import load_run

    run = load_run(run_dir)
    mix = run.mix
    if mix is None or mix.cfg.expert not in ("lora", "dora"):
        raise LibraryError(f"{run_dir}: method {run.cfg.train.method!r} has no LoRA or DoRA experts to put in a "
                           "library")
    n = next(iter(mix.experts.values())).num_experts
    cats = list(run.data.categories)
    aligned = any(r.label_aligned for r in mix.routers.values()) and n == len(cats)
    names = [cats[i] if aligned else f"expert-{i}" for i in range(n)]
    names = [safe_name(x) for x in names]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            mix.export_peft(i, f"{tmp}/{i}")
        # a run's trained routers carry over as the library's state of the same scope: per layer, or one global
        # router read at the run's router layer (which the library's global routing then reads too)
        carried = router_class(mix.cfg.router).library_state == "fitted"
        fitted = _fitted_state(mix) if carried else None
        scope = mix.cfg.router_scope
        layer = mix.routers["global"].read_layer if scope == "global" else None
        mix.detach()
        lib = cls.create(path, run.cfg.model.name, run.cfg.model.dtype, run.cfg.data.template,
                         run.cfg.data.max_length, max_rank, router, run.model, run.tok, progress,
                         router_layer=layer)
        examples: list[Optional[list]] = [None] * n
        if aligned:
            for rec in run.data.records["train"]:
                i = cats.index(rec.category)
                examples[i] = examples[i] or []
                if len(examples[i]) < examples_per_expert:
                    examples[i].append(rec)
        lib.add_many([(names[i], f"{tmp}/{i}", examples[i], None, f"from {Path(run_dir).name}")
                      for i in range(n)])
    if fitted is not None:
        extra = {"source": str(run_dir), **({"router_layer": layer} if scope == "global" else {})}
        lib._write_state(state_kind(mix.cfg.router, scope), fitted, names, extra)
    return lib


def safe_name(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:64]
    return out if out and out[0].isalnum() else f"x{out}"[:64]


def _fitted_state(mix) -> dict[str, Tensor]:
    """Every trained router's tensors (the task router's LayerNorm and projection), keyed ``<router key>.<name>``."""
    return {f"{key}.{name}": t.detach().float().cpu() for key, r in mix.routers.items()
            for name, t in r.state_dict().items()}
