"""Materialise a ``Mixture`` from a library: N PEFT adapters stacked into one LoRA bank, router state installed.

Experts may differ in rank, alpha and target modules: the bank takes the largest rank and the union of the
targets, with alpha = rank (scaling 1), and each expert's update B A * (alpha_e / r_e) is copied in exactly
(the scaling folded into B, unused ranks and modules left at zero). Adding or removing an expert is therefore a
rebuild with N +- 1 experts and a copy: nothing is retrained. When any expert is a DoRA adapter the bank is a
DoRA bank: DoRA experts bring their magnitudes, and every other expert (and module an expert does not adapt)
gets the magnitude that makes it act exactly as its plain LoRA (``DoraBank.match_plain_lora``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mixroute.arch import layers_path
from mixroute.config import MixtureConfig
from mixroute.experts.lora import MAGNITUDE, LoraExpertConfig
from mixroute.library.cost import CostAware
from mixroute.library.features import arrow_prototypes
from mixroute.library.manifest import CENTROID, LibraryError, Manifest, peft_settings
from mixroute.mixture import Mixture
from mixroute.routers import ROUTERS, router_class

# the sources of router state a library has (``Router.library_state``), in the order its routers are offered
STATE_SOURCES = ("examples", "lora", "fitted")


def library_routers(level: Optional[str] = None) -> list[str]:
    """The routers that can route a library (of ``level`` when given): those that declare where their state
    comes from."""
    return [cls.name for source in STATE_SOURCES for cls in ROUTERS.values()
            if cls.library_state == source and level in (None, cls.level)]


def read_adapter(adapter_dir: str | Path, name: str, model: nn.Module,
                 max_rank: int) -> tuple[dict[str, tuple], dict]:
    """{module name: (A (r, in), B (out, r) scaled by alpha / r, DoRA magnitude (out,) or None)} of a PEFT
    adapter, checked against the base ``model``: every module must be one of its Linear layers with matching
    shapes (else the adapter was trained on another base), and the file may hold only LoRA A/B weights (and a
    DoRA adapter's magnitudes)."""
    settings = peft_settings(adapter_dir, name, max_rank)
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    weights: dict[str, tuple] = {}
    scale = settings["lora_alpha"] / settings["r"]
    allowed = (".lora_A.weight", ".lora_B.weight") + ((MAGNITUDE,) if settings["use_dora"] else ())
    for key in tensors:
        if not key.endswith(allowed):
            raise LibraryError(f"expert {name!r}: {adapter_dir}/adapter_model.safetensors holds {key}, which is not a "
                               "LoRA A/B weight (or, with use_dora, a DoRA magnitude); biases and saved modules "
                               "are not supported")
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        lin = linears.get(module)
        if b is None:
            raise LibraryError(f"expert {name!r}: {key} has no matching lora_B weight")
        if lin is None or a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            have = "no such Linear" if lin is None else f"Linear {lin.in_features}->{lin.out_features}"
            raise LibraryError(f"expert {name!r} was trained on another base model: {module} is "
                               f"{a.shape[1]}->{b.shape[0]} in the adapter, the library's base has {have}")
        if a.shape[0] != settings["r"] or b.shape[1] != settings["r"]:
            raise LibraryError(f"expert {name!r}: {module} has rank {a.shape[0]}, adapter_config.json says "
                               f"r={settings['r']}")
        m = tensors.get(key[: -len(".lora_A.weight")] + MAGNITUDE)
        if settings["use_dora"] and (m is None or m.shape != (lin.out_features,)):
            raise LibraryError(f"expert {name!r}: use_dora=true but {module} has no magnitude of "
                               f"{lin.out_features} values")
        weights[module] = (a.float(), b.float() * scale, None if m is None else m.float())
    if not weights:
        raise LibraryError(f"expert {name!r}: {adapter_dir}/adapter_model.safetensors holds no LoRA weights")
    return weights, settings


def mixture_config(router: str, ranks: list[int], targets: list[str],
                   overrides: Optional[dict] = None, dora: bool = False) -> MixtureConfig:
    """The mixture a library builds: one bank of the largest rank (alpha = rank: each expert's own scaling is
    folded into its B) over the union of the targets; ``overrides``: shared ``MixtureConfig`` fields."""
    rank = max(ranks)
    cfg = MixtureConfig(expert="dora" if dora else "lora", router=router, num_experts=len(ranks),
                        num_tasks=len(ranks),
                        experts={"lora": LoraExpertConfig(rank=rank, alpha=float(rank), target_modules=targets)})
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    return cfg


def materialise(model: nn.Module, lib: Path, man: Manifest, router: str,
                adapters: list[dict[str, tuple[Tensor, Tensor]]], cfg_overrides: Optional[dict] = None,
                state: Optional[dict] = None) -> Mixture:
    """A mixture over the manifest's experts (``adapters`` in manifest order) with ``router`` installed.
    ``state``: {router name: {key: tensors} (a fitted router), "calibration": {key: tensors}}, already reordered
    to the experts."""
    if not man.experts:
        raise LibraryError(f"{lib}: the library has no experts; add one with `mixroute library add`")
    # targets relative to their decoder layer ("self_attn.q_proj", "mlp.c_proj"): a bare last name would also
    # match GPT-2's attn.c_proj where only mlp.c_proj was trained
    prefix = layers_path(model) + "."
    targets = sorted({m[len(prefix):].split(".", 1)[1] for w in adapters for m in w})
    dora = any(w[2] is not None for weights in adapters for w in weights.values())
    cfg = mixture_config(router, [e.rank for e in man.experts], targets, cfg_overrides, dora)
    mix = Mixture.attach(model, cfg)
    with torch.no_grad():
        for key, bank in mix.experts.items():
            bank.A.zero_()
            bank.B.zero_()
            for e, weights in enumerate(adapters):
                w = weights.get(mix.module_names[key])
                if w is not None:
                    a, b = bank.expert(e)
                    a[: w[0].shape[0]].copy_(w[0])
                    b[:, : w[1].shape[1]].copy_(w[1])
            for e, weights in enumerate(adapters) if dora else ():
                w = weights.get(mix.module_names[key])
                bank.match_plain_lora(e)   # after every A and B is in: the norms read them
                if w is not None and w[2] is not None:
                    bank.m[e].copy_(w[2])
        install_router(mix, lib, man, router, state or {})
    mix.eval()
    return mix


class LibraryState:
    """What a library holds for rebuilding its routers (``Router.load_library_state`` asks it), with the
    library's errors naming the command that supplies what is missing."""

    def __init__(self, mix: Mixture, lib: Path, man: Manifest, router: str, state: dict) -> None:
        self.mix, self.lib, self.man, self.router, self.state = mix, lib, man, router, state
        self._features: Optional[list[dict[str, Tensor]]] = None

    def prototypes(self, layer: int) -> Tensor:
        """(E, H) each expert's example features entering ``layer``: of the frozen base for a global router
        (it reads the frozen base), else of the mixture's layer."""
        if self._features is None:
            missing = [e.name for e in self.man.experts if e.examples == 0]
            if missing:
                raise LibraryError(f"the {self.router} router needs example prompts for every expert; none for "
                                   f"{', '.join(missing)} (add them again with --examples FILE, or route with "
                                   "arrow)")
            self._features = [load_file(str(self.lib / e.path / CENTROID)) for e in self.man.experts]
        prefix = "base" if self.mix.cfg.router_scope == "global" else "layer"
        old = [e.name for e, f in zip(self.man.experts, self._features) if f"{prefix}_0" not in f]
        if old:
            raise LibraryError(f"the centroid prototypes of {', '.join(old)} were written before global routing "
                               "existed (no frozen-base features); add those experts again with --examples FILE "
                               "(`mixroute library remove`, then `add`), or route per layer")
        return torch.stack([f[f"{prefix}_{layer}"] for f in self._features])

    def arrow(self, key: str) -> tuple[Tensor, Tensor]:
        """Arrow's prototypes and gain for router ``key``, from the experts' LoRA weights."""
        return arrow_prototypes(self.mix, key)

    def fitted(self, key: str, names: list[str]) -> dict[str, Tensor]:
        """Router ``key``'s tensors ``names`` as ``library fit-router`` stored them."""
        fitted = self.state.get(self.router)
        if fitted is None:
            raise LibraryError(f"the {self.router} router is not fitted for this library's experts; run "
                               "`mixroute library fit-router LIB --data FILE` (it trains the router only, the "
                               "experts stay frozen)")
        own = {name: fitted.get(f"{key}.{name}") for name in names}
        if any(t is None for t in own.values()):
            raise LibraryError(f"this library's {self.router} router was fitted for the routers before 2026-12 (no "
                               "LayerNorm on their features); run `mixroute library fit-router LIB --data FILE` "
                               "again")
        return own


def install_router(mix: Mixture, lib: Path, man: Manifest, router: str, state: dict) -> None:
    """Rebuild the routers from the library's state (each router's ``load_library_state``) and wrap
    sequence-level ones for cost-aware selection."""
    cls = router_class(router)
    library = LibraryState(mix, lib, man, router, state)
    for key, r in mix.routers.items():
        r.load_library_state(key, library)
    # cost-aware selection picks one expert per sequence: a router mixing experts per token is left as it is
    if cls.level != "sequence":
        return
    costs = torch.tensor([e.cost for e in man.experts])
    calib = state.get("calibration")
    for key in list(mix.routers):
        inner = mix.routers[key]
        quality = None
        if calib is not None:
            quality = nn.Linear(calib[f"{key}.weight"].shape[1], len(man.experts))
            quality.weight.data.copy_(calib[f"{key}.weight"])
            quality.bias.data.copy_(calib[f"{key}.bias"])
        device = next(inner.buffers(), next(mix.model.parameters())).device
        mix.routers[key] = CostAware(inner, costs, mix.cfg.route_cost_weight, quality).to(device)

