"""``Library``: open, create, add, remove, list, route, export; the Python face of ``mixroute library``.

One mixture at a time is attached to the library's base model (``mixture()``): building another detaches the
previous one, since both would patch the same Linear layers.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mixroute.fileio import atomic_dir
from mixroute.library import manifest as mf
from mixroute.library.build import library_routers, materialise, read_adapter
from mixroute.library.data import Examples, progress as progress_bar, read_prompts
from mixroute.library.features import layer_features, prompt_batches
from mixroute.library.manifest import Expert, LibraryError, Manifest
from mixroute.routers import router_class


class Library:
    """An expert library directory (docs/library.md) bound to its base model (loaded on first use)."""

    def __init__(self, path: str | Path, model: Optional[nn.Module] = None, tok: Any = None,
                 progress: bool = False) -> None:
        self.path = Path(path)
        self.man = mf.read_manifest(self.path)
        self._model, self._tok = model, tok
        self.progress = progress
        self.mix = None
        self._built: Optional[tuple] = None       # (router, cost_weight, expert names) of self.mix
        self._adapters: dict[str, dict] = {}      # expert name -> its checked weights (read once)
        if model is not None:
            self._check_base(model)

    # ------------------------------------------------------------------ creating
    @classmethod
    def create(cls, path: str | Path, model_name: Optional[str] = None, dtype: str = "float32",
               template: str = "chat", max_length: int = 256, max_rank: int = 64, router: str = "centroid",
               model: Optional[nn.Module] = None, tok: Any = None, progress: bool = False,
               router_layer: Optional[int] = None) -> "Library":
        """An empty library for ``model_name`` (or an already loaded ``model``, whose name it records);
        ``router_layer``: the decoder layer global routers read (None: the middle layer)."""
        from mixroute.config import ModelConfig
        from mixroute.mixture import base_fingerprint
        from mixroute.rundir import load_model

        path = Path(path)
        if (path / mf.MANIFEST).exists():
            raise LibraryError(f"{path} already holds a library; add experts with `mixroute library add`")
        if path.exists() and any(path.iterdir()):
            raise LibraryError(f"{path} exists and is not empty; choose a new directory for the library")
        check_router(router)
        if model is None:
            model, tok = load_model(ModelConfig(name=model_name, dtype=dtype))
        man = Manifest(base={"model": model_name, "dtype": dtype, "fingerprint": base_fingerprint(model)},
                       template=template, max_length=max_length, max_rank=max_rank, router=router,
                       router_layer=router_layer)
        _global_layer(man, model)   # an out-of-range layer is refused before anything is written
        path.mkdir(parents=True, exist_ok=True)
        mf.write_manifest(path, man)
        return cls(path, model, tok, progress=progress)

    @classmethod
    def from_run(cls, path: str | Path, run_dir: str | Path, max_rank: int = 64, router: str = "centroid",
                 examples_per_expert: int = 32, progress: bool = False) -> "Library":
        """A library holding every LoRA expert of a trained run (``library.runs.from_run``)."""
        from mixroute.library.runs import from_run

        return from_run(cls, path, run_dir, max_rank, router, examples_per_expert, progress)

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> nn.Module:
        if self._model is None:
            from mixroute.config import ModelConfig
            from mixroute.rundir import load_model

            base = self.man.base
            self._model, self._tok = load_model(ModelConfig(name=base.get("model"), dtype=base.get("dtype", "float32")))
            self._check_base(self._model)
        return self._model

    @property
    def tok(self) -> Any:
        self.model  # noqa: B018 - loads both
        return self._tok

    def _check_base(self, model: nn.Module) -> None:
        from mixroute.mixture import base_fingerprint

        have, want = base_fingerprint(model), self.man.base.get("fingerprint", {})
        diff = [f"{k}: library {v!r}, model {have.get(k)!r}" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise LibraryError(f"{self.path}/{mf.MANIFEST} was made for a different base model: " + "; ".join(diff))

    # ------------------------------------------------------------------ experts
    def adapters(self) -> list[dict]:
        """Every expert's checked weights, in manifest order (checksums verified on first read)."""
        out = []
        for e in self.man.experts:
            if e.name not in self._adapters:
                mf.verify(self.path, e)
                self._adapters[e.name] = read_adapter(self.path / e.path, e.name, self.model, self.man.max_rank)[0]
            out.append(self._adapters[e.name])
        return out

    def add(self, name: str, adapter_dir: str | Path, examples: Optional[Examples] = None,
            cost: Optional[float] = None, description: str = "") -> Expert:
        """Add a PEFT LoRA adapter as expert ``name`` (cost defaults to its rank); ``examples`` (prompts of its
        domain) give it a centroid prototype. Nothing else changes: the other experts are copied as they are."""
        return self.add_many([(name, adapter_dir, examples, cost, description)])[0]

    def add_many(self, items: Sequence[tuple]) -> list[Expert]:
        man = copy.deepcopy(self.man)
        new: list[Expert] = []
        for name, adapter_dir, _examples, cost, description in items:
            mf.check_name(name, man)
            if name in [e.name for e in new]:
                raise LibraryError(f"expert {name!r} is given twice")
            weights, settings = read_adapter(adapter_dir, name, self.model, man.max_rank)
            e = Expert(name=name, path=f"{mf.EXPERTS}/{name}", rank=settings["r"],
                       cost=float(settings["r"] if cost is None else cost), description=description,
                       checksum=mf.checksum(adapter_dir))
            self._adapters[name] = weights
            new.append(e)
            man.experts.append(e)
        try:
            for e, (_, adapter_dir, *_rest) in zip(new, items):
                with atomic_dir(self.path / e.path) as tmp:
                    for f in mf.ADAPTER_FILES:
                        shutil.copy2(Path(adapter_dir) / f, tmp / f)
            with_examples = [(e, ex) for e, (_, _, ex, *_r) in zip(new, items) if ex is not None]
            if with_examples:
                self._centroids(man, with_examples)
        except BaseException:   # the manifest was not written: the library is as it was, minus our files
            for e in new:
                shutil.rmtree(self.path / e.path, ignore_errors=True)
                self._adapters.pop(e.name, None)
            raise
        # a fitted router or calibration covers the experts it was fitted on: still listed, marked stale
        self.man = man
        mf.write_manifest(self.path, man)
        self._built = None
        return new

    def _centroids(self, man: Manifest, items: list[tuple[Expert, Examples]]) -> None:
        """Each expert's prototypes: pooled prompt features at every layer with its own expert active below
        (``layer_<i>``, per-layer routing) and of the frozen base (``base_<i>``, global routing)."""
        old = self.man
        self.man = man
        try:
            mix = self._attach("uniform", 0.0)
            n = len(man.experts)
            with progress_bar("centroid prototypes", len(items), self.progress) as advance:
                for e, examples in items:
                    prompts = read_prompts(examples, man, self.tok)
                    batches = prompt_batches(prompts, self.tok)
                    onehot = torch.zeros(n)
                    onehot[man.names().index(e.name)] = 1.0
                    feats = layer_features(mix, batches, [onehot.expand(len(b["input_ids"]), n) for b in batches])
                    base = layer_features(mix, batches, frozen=True)
                    save_file({**{f"layer_{i}": f.mean(0).contiguous() for i, f in feats.items()},
                               **{f"base_{i}": f.mean(0).contiguous() for i, f in base.items()}},
                              str(self.path / e.path / mf.CENTROID))
                    e.examples = len(prompts)
                    advance()
        finally:
            self.man = old
            self._built = None

    def remove(self, name: str) -> None:
        """Remove expert ``name``; fitted router state drops its row (still valid for the others)."""
        e = self.man.get(name)
        man = copy.deepcopy(self.man)
        idx = man.names().index(name)
        man.experts.pop(idx)
        old_files = []
        for kind, st in list(man.router_state.items()):
            if name in st["experts"]:
                tensors = load_file(str(self.path / mf.ROUTER / st["file"]))
                keep = [i for i, x in enumerate(st["experts"]) if x != name]
                tensors = _expert_rows(tensors, keep)
                old_files.append(st["file"])
                man.router_state[kind] = self._state_file(kind, tensors, [st["experts"][i] for i in keep],
                                                          {k: v for k, v in st.items() if k not in ("file", "experts")})
        mf.write_manifest(self.path, man)
        self.man = man
        self._adapters.pop(name, None)
        self._built = None
        shutil.rmtree(self.path / e.path, ignore_errors=True)
        for f in old_files:
            (self.path / mf.ROUTER / f).unlink(missing_ok=True)

    def export(self, name: str, out_dir: str | Path) -> Path:
        """Copy expert ``name``'s PEFT adapter (checksum verified) to ``out_dir``: PeftModel.from_pretrained
        loads it."""
        e = self.man.get(name)
        mf.verify(self.path, e)
        with atomic_dir(out_dir) as tmp:
            for f in mf.ADAPTER_FILES:
                shutil.copy2(self.path / e.path / f, tmp / f)
        return Path(out_dir)

    # ------------------------------------------------------------------ router state
    def _state_file(self, kind: str, tensors: dict[str, Tensor], experts: list[str], extra: dict) -> dict:
        """Write router state under a content-derived name (a new file never replaces one the manifest names)."""
        from safetensors.torch import save

        payload = save({k: v.contiguous() for k, v in tensors.items()})
        name = mf.content_name(kind, payload + "\n".join(experts).encode())
        folder = self.path / mf.ROUTER
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(payload)
        tmp.replace(folder / name)
        return {"file": name, "experts": list(experts), **extra}

    def _write_state(self, kind: str, tensors: dict[str, Tensor], experts: list[str], extra: dict) -> None:
        old = self.man.router_state.get(kind, {}).get("file")
        self.man.router_state[kind] = self._state_file(kind, tensors, experts, extra)
        mf.write_manifest(self.path, self.man)
        if old and old != self.man.router_state[kind]["file"]:
            (self.path / mf.ROUTER / old).unlink(missing_ok=True)
        self._built = None

    def stale(self, kind: str) -> Optional[str]:
        """Why router state ``kind`` (task, calibration) cannot be used now, or None when it can."""
        st = self.man.router_state.get(kind)
        if st is None:
            return "not fitted"
        new = [n for n in self.man.names() if n not in st["experts"]]
        return f"stale: fitted without {', '.join(new)}" if new else None

    def _state(self, kind: str) -> Optional[dict[str, Tensor]]:
        """Router state ``kind`` with rows in manifest order, or None when absent or stale."""
        if self.stale(kind) is not None:
            return None
        st = self.man.router_state[kind]
        tensors = load_file(str(self.path / mf.ROUTER / st["file"]))
        return _expert_rows(tensors, [st["experts"].index(n) for n in self.man.names()])

    # ------------------------------------------------------------------ routing
    def global_layer(self) -> int:
        """The decoder layer whose frozen-base input global routers read."""
        return _global_layer(self.man, self.model)

    def _attach(self, router: str, cost_weight: float, use_calibration: bool = False, scope: str = "layer"):
        if self.mix is not None:
            self.mix.detach()
            self.mix = None
        fitted = router_class(router).library_state == "fitted"
        kind, calib = mf.state_kind(router, scope), mf.state_kind("calibration", scope)
        state = {router: self._state(kind) if fitted else None,
                 "calibration": self._state(calib) if use_calibration else None}
        state = {k: v for k, v in state.items() if v is not None}
        if fitted and router not in state:
            why = self.stale(kind)
            flag = "" if scope == "layer" else f" --scope {scope}"
            raise LibraryError(f"the {router} router{'' if scope == 'layer' else ' (' + scope + ' routing)'} is "
                               f"{why}; run `mixroute library fit-router {self.path} --data FILE{flag}` (it "
                               "trains the router only, the experts stay frozen), or use --router centroid")
        overrides = {"route_cost_weight": cost_weight, "router_scope": scope}
        if scope == "global":
            overrides["router_layer"] = self.global_layer()
        self.mix = materialise(self.model, self.path, self.man, router, self.adapters(), overrides, state)
        return self.mix

    def mixture(self, router: Optional[str] = None, cost_weight: Optional[float] = None, scope: str = "layer"):
        """The library as a ``Mixture`` on its base model, routed by ``router`` (default: the manifest's);
        cost-aware with ``cost_weight`` (lambda) and, once calibrated, predicted losses. ``scope``: ``layer``
        (a decision in every layer, the experts applied below) or ``global`` (one decision per sequence from the
        frozen base at ``global_layer()``, applied at every layer: what ``--engine vllm`` serves)."""
        router = router or self.man.router
        check_router(router)
        if _scope(scope) == "global" and not router_class(router).supports_global:
            raise LibraryError(f"the {router} router routes per {router_class(router).level} and has no global "
                               "form; global routing takes centroid or task")
        lam = float(cost_weight or 0.0)
        if lam < 0:
            raise LibraryError(f"route_cost_weight must be >= 0, got {lam}")
        level = router_class(router).level
        if lam > 0 and level != "sequence":
            raise LibraryError(f"route_cost_weight applies to sequence-level routers "
                               f"({', '.join(library_routers('sequence'))}); {router} routes per {level}, mixing "
                               "experts")
        key = (router, lam, tuple(self.man.names()), scope)
        if self.mix is None or self._built != key:
            self._attach(router, lam, use_calibration=level == "sequence", scope=scope)
            self._built = key
        return self.mix

    def route(self, prompt: str, router: Optional[str] = None, cost_weight: Optional[float] = None,
              scope: str = "layer") -> dict:
        """What the router picks for ``prompt`` and why (``library.explain.route``)."""
        from mixroute.library.explain import route

        return route(self, prompt, router, cost_weight, scope)

    def notes(self) -> list[str]:
        out = []
        fitted = [name for name in library_routers() if router_class(name).library_state == "fitted"]
        for base in (*fitted, "calibration"):
            for scope in mf.SCOPES:
                kind = mf.state_kind(base, scope)
                why = self.stale(kind)
                if why is not None and why != "not fitted":
                    cmd = "calibrate" if base == "calibration" else "fit-router"
                    flag = "" if scope == "layer" else f" --scope {scope}"
                    out.append(f"{kind} {why}: run `mixroute library {cmd} {self.path} --data FILE{flag}`")
        missing = [e.name for e in self.man.experts if e.examples == 0]
        if missing:
            out.append(f"centroid cannot route {', '.join(missing)} (no example prompts)")
        old = [e.name for e in self.man.experts if e.examples and not _has_base_prototype(self.path / e.path)]
        if old:
            out.append(f"centroid cannot route {', '.join(old)} globally (prototypes written before global routing "
                       "existed): add them again with --examples")
        return out

    def rows(self) -> list[dict]:
        """The manifest's experts as table rows."""
        return [{k: v for k, v in asdict(e).items() if k != "path"} for e in self.man.experts]

    def fit_router(self, data: str | Path, steps: int = 300, lr: float = 1e-2, batch_size: int = 8,
                   max_examples: Optional[int] = None, scope: str = "layer") -> dict:
        from mixroute.library.fit import fit_task_router

        return fit_task_router(self, data, steps, lr, batch_size, max_examples, _scope(scope))

    def calibrate(self, data: str | Path, batch_size: int = 8, ridge: float = 1.0,
                  max_examples: Optional[int] = None, scope: str = "layer") -> dict:
        from mixroute.library.fit import calibrate

        return calibrate(self, data, batch_size, ridge, max_examples, _scope(scope))


def check_router(router: str) -> None:
    valid = library_routers()
    if router not in valid:
        raise LibraryError(f"router {router!r} cannot route a library; valid: {', '.join(valid)}")


def _expert_rows(tensors: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """Router state with its per-expert rows taken in ``rows`` order; a router's LayerNorm ("<key>.norm.*") is
    per feature and kept whole."""
    return {k: v if ".norm." in k else v[rows].contiguous() for k, v in tensors.items()}


def _scope(scope: str) -> str:
    if scope not in mf.SCOPES:
        raise LibraryError(f"scope must be one of {', '.join(mf.SCOPES)}, got {scope!r}")
    return scope


def _global_layer(man: Manifest, model: nn.Module) -> int:
    from mixroute.arch import decoder_layers
    from mixroute.config import ConfigError, MixtureConfig
    from mixroute.mixture import global_router_layer

    try:
        return global_router_layer(MixtureConfig(router_layer=man.router_layer), len(decoder_layers(model)))
    except ConfigError as e:
        raise LibraryError(f"router_layer: {e}") from None


def _has_base_prototype(expert_dir: Path) -> bool:
    from safetensors import safe_open

    path = expert_dir / mf.CENTROID
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return "base_0" in f.keys()
