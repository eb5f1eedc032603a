"""The stacked LoRA expert bank: E experts of rank r on one frozen linear layer (``nn.Linear`` or GPT-2's
``Conv1D``).

All experts live in two matrices, A (E*r, in) and B (out, E*r), so any routing is a few dense matmuls with no
Python loop over experts (METHODS.md section 5): this is the one part no library provides (PEFT keeps one
module per adapter and loops over adapters for mixed batches), hence written by hand.

Routers hand over weights per expert (``RouteWeights``); the bank expands them to its own layout. Paths:

* one expert for every sequence (``index`` all equal, or E = 1): ``addmm(out, x A_e^T, B_e^T)`` - one LoRA;
* one expert per sequence (mixed batch): gather each sequence's A_e, B_e and ``baddbmm`` - one LoRA of work;
* soft / token top-k weights: repeated over each expert's r ranks, ``(x A^T * w) B^T`` over the whole stack;
  rank-level weights (SMoRA) are already in that layout;
* task-level weights (Poly/MHR): mix parameters per example (A = sum_s w_s A_s, ...) then ``bmm``, as PEFT.

The base output is never recomputed: the LoRA term is added into it with a fused add-matmul.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.config import f
from mixroute.experts.base import ExpertKind
from mixroute.routers.base import RouteWeights


@dataclass
class LoraExpertConfig:
    """The settings of LoRA (and DoRA) experts: ``mixture.experts.lora``."""

    rank: int = f(8, "LoRA rank r of each expert.", ge=1)
    alpha: float = f(16.0, "LoRA alpha; the update is scaled by alpha / r.", gt=0.0)
    dropout: float = f(0.0, "Dropout on the LoRA input.", ge=0.0, lt=1.0)
    target_modules: Union[list, str] = f(
        ["all-linear"], "Projections of each decoder layer that get LoRA experts, matched as PEFT does (a module "
                        "name or its dotted suffix: q_proj, mlp.c_proj), or all-linear (every linear layer of the "
                        "decoder layers, the default) or peft-default (PEFT's default targets for the "
                        "architecture), alone or as a one-item list. `mixroute model info` lists a model's names; "
                        "docs/models.md.")
    mlp_only: bool = f(False, "Put experts on the MLP projections only (LLaVA-MoLE): the targets outside each "
                              "layer's attention module.")
    allow_partial: bool = f(False, "Attach to the target_modules a model has and skip the names it lacks (by "
                                   "default a name that matches nothing in a layer is an error).")


class LoraBank(nn.Module, ExpertKind):
    """E stacked LoRA experts for one linear layer: ``A`` (E*r, in), ``B`` (out, E*r), scaling alpha / r."""

    levels = ("sequence", "token", "rank", "task")   # the routing levels this bank can apply
    Config: ClassVar[type] = LoraExpertConfig
    settings_name: ClassVar[str] = "lora"            # its key in mixture.experts (DoRA reads LoRA's settings)

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank = num_experts, rank
        self.scaling = alpha / rank
        self.dropout = dropout
        self.A = nn.Parameter(torch.empty(num_experts * rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, num_experts * rank))
        # PEFT's LoRA init: kaiming-uniform(a=sqrt(5)) on each expert's (r, in) A (fan_in = in for the whole
        # stack too, so one call gives every expert the same distribution), B = 0 (the mixture starts as base).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @classmethod
    def for_module(cls, module: nn.Module, num_experts: int, rank: int, alpha: float,
                   dropout: float = 0.0) -> "LoraBank":
        """A bank for the frozen linear ``module`` (``nn.Linear`` or ``Conv1D``)."""
        from mixroute.arch import in_out_features

        return cls(*in_out_features(module), num_experts, rank, alpha, dropout)

    def expert_axes(self) -> dict[str, tuple[int, int]]:
        return {"A": (0, self.rank), "B": (1, self.rank)}   # each expert's r rows of A, r columns of B

    def expert(self, e: int) -> tuple[Tensor, Tensor]:
        """Views (A_e (r, in), B_e (out, r)) of expert ``e``."""
        r = self.rank
        return self.A[e * r:(e + 1) * r], self.B[:, e * r:(e + 1) * r]

    def add_into(self, out: Tensor, x: Tensor, route: RouteWeights, slot: int = 0) -> Tensor:
        """Return ``out + LoRA(x)`` for the given route (``slot``: this module's index in a Poly route)."""
        if self.dropout > 0.0 and self.training:
            x = F.dropout(x, self.dropout, training=True)
        # ``out`` is the fresh output of F.linear, which autograd does not save (linear's backward needs only
        # x and W), so the LoRA term is accumulated in place: a fused BLAS add-matmul with no extra pass over
        # (and no new copy of) the (tokens, out) output; measured ~10% faster per projection than out + lora.
        # Autocast does not cast the operands of in-place ops: they are brought to ``out``'s dtype (bf16/fp16
        # under autocast; otherwise the parameters' own dtype, and ``.to`` is a no-op)
        s, dt = self.scaling, out.dtype
        out2 = out.view(-1, out.shape[-1])
        if route.index is not None:
            shared = route.shared_index()
            if shared is not None:
                a, b = self.expert(shared)
                out2.addmm_((x.reshape(-1, x.shape[-1]) @ a.T).to(dt), b.T.to(dt), alpha=s)
                return out
            a, b = route.reused(("gather", id(self)), lambda: self._gather(route.index))
            h = torch.bmm(x, a.transpose(1, 2))                            # (B, T, r)
            return out.baddbmm_(h.to(dt), b.to(dt), alpha=s)
        if route.level == "task":
            return self._poly(out, x, route.weights[:, slot])
        h = (x @ self.A.T) * route.per_rank(self.rank, x.dtype)                     # (B, T, E*r)
        out2.addmm_(h.reshape(-1, h.shape[-1]).to(dt), self.B.T.to(dt), alpha=s)
        return out

    def _gather(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Each sequence's expert: A (B, r, in) and B^T (B, r, out)."""
        e, r = self.num_experts, self.rank
        return self.A.view(e, r, -1)[index], self.B.view(-1, e, r).permute(1, 2, 0)[index]

    def _poly(self, out: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """Poly/MHR: per-example parameter mix. ``w`` (B, S, E): weights of each skill per input split."""
        e, r, s = self.num_experts, self.rank, w.shape[1]
        a = torch.einsum("bse,ersd->brsd", w, self.A.view(e, r, s, -1)).reshape(w.shape[0], r, -1)
        b = torch.einsum("bse,soer->bsor", w, self.B.view(s, -1, e, r)).reshape(w.shape[0], -1, r)
        h = torch.bmm(x, a.transpose(1, 2))
        return out.baddbmm_(h.to(out.dtype), b.transpose(1, 2).to(out.dtype), alpha=self.scaling)


RouteGetter = Callable[[], Optional[RouteWeights]]


def patch_linear(linear: nn.Module, bank: LoraBank, get_route: RouteGetter, slot: int = 0) -> None:
    """Make ``linear`` (an ``nn.Linear`` or a ``Conv1D``) add the bank's LoRA term, by overriding its instance
    ``forward``.

    We patch the instance instead of wrapping it in a new module so the base model's module tree and
    ``state_dict`` keys stay exactly as they were (``save_pretrained`` and weight tying keep working) and
    ``unpatch_linear`` restores it exactly. The base output comes from the layer's own class ``forward``, so a
    ``Conv1D`` (weight stored as (in, out), PEFT's fan_in_fan_out) or a ``Linear`` subclass computes exactly
    what it did before; the LoRA term is the same (r, in) / (out, r) pair either way, as in PEFT.
    """
    base_forward = type(linear).forward

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        out = base_forward(self, x)
        route = get_route()
        if route is None:
            return out
        bsz = route.weights.shape[0]
        if x.dim() == 2 and x.shape[0] % bsz == 0:
            # OPT runs its MLP on (B*T, H) rows: routes are per sequence, so the batch dimension is restored
            return bank.add_into(out.view(bsz, -1, out.shape[-1]), x.view(bsz, -1, x.shape[-1]), route,
                                 slot).view(out.shape)
        return bank.add_into(out, x, route, slot)

    linear.forward = types.MethodType(forward, linear)  # type: ignore[method-assign]


def unpatch_linear(linear: nn.Module) -> None:
    """Undo ``patch_linear``."""
    linear.__dict__.pop("forward", None)


# ---------------------------------------------------------------------------------------------------- PEFT I/O
MAGNITUDE = ".lora_magnitude_vector"   # PEFT's key suffix of a DoRA magnitude (out,)


def read_peft_adapters(adapter_dirs: list[str]) -> tuple[list[dict[str, tuple]], dict]:
    """Read PEFT LoRA (or DoRA) adapter directories: per adapter {module name: (lora_A (r, in), lora_B (out, r),
    DoRA magnitude (out,) or None)}, and the shared settings {r, lora_alpha, targets, use_dora}. Different
    ranks, alphas, targets or kinds are a clear error."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    if not adapter_dirs:
        raise ValueError("from_peft needs at least one adapter directory")
    experts, first, first_dir = [], None, None
    for d in adapter_dirs:
        path = Path(d)
        if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a PEFT adapter: it needs adapter_config.json and "
                                    "adapter_model.safetensors (as written by PeftModel.save_pretrained)")
        conf = json.loads((path / "adapter_config.json").read_text())
        if conf.get("peft_type") != "LORA":
            raise ValueError(f"{path}: peft_type {conf.get('peft_type')!r}; only LORA adapters can be imported")
        if conf.get("use_rslora"):
            raise ValueError(f"{path}: use_rslora=true is not supported (LoRA or DoRA only)")
        if conf.get("rank_pattern") or conf.get("alpha_pattern"):
            raise ValueError(f"{path}: per-module rank/alpha patterns are not supported")
        targets = conf.get("target_modules") or []
        targets = sorted([targets] if isinstance(targets, str) else targets)
        settings = {"r": conf["r"], "lora_alpha": conf["lora_alpha"], "targets": targets,
                    "use_dora": bool(conf.get("use_dora"))}
        if first is None:
            first, first_dir = settings, path
        elif settings != first:
            diff = [f"{k}: {first[k]} in {first_dir} vs {settings[k]} in {path}" for k in first
                    if first[k] != settings[k]]
            raise ValueError("PEFT adapters must share rank, alpha, target modules and use_dora to be experts "
                             "of one bank; " + "; ".join(diff))
        tensors = load_file(str(path / "adapter_model.safetensors"))
        weights: dict[str, tuple] = {}
        for key, value in tensors.items():
            if key.endswith(".lora_A.weight"):
                stem = key[: -len(".lora_A.weight")]
                weights[stem.removeprefix("base_model.model.")] = (
                    value, tensors[key.replace(".lora_A.", ".lora_B.")], tensors.get(stem + MAGNITUDE))
        if settings["use_dora"] and any(w[2] is None for w in weights.values()):
            raise ValueError(f"{path}: use_dora=true but a module has no {MAGNITUDE.lstrip('.')}")
        experts.append(weights)
    assert first is not None
    return experts, first


def write_peft_adapter(weights: dict[str, tuple], cfg, base_name: Optional[str],
                       out_dir: str, targets: Optional[list[str]] = None, fan_in_fan_out: bool = False) -> None:
    """Write {module name: (A (r, in), B (out, r)[, DoRA magnitude (out,)])} (``cfg``: a ``LoraExpertConfig``,
    its rank, alpha and dropout) as a PEFT LoRA adapter that
    PeftModel.from_pretrained loads (the config is written by PEFT's own LoraConfig, so it stays in step with
    PEFT's format); with magnitudes it is a DoRA adapter (use_dora=true).

    ``targets``: PEFT target names that select exactly these modules (default: their last name part);
    ``fan_in_fan_out``: the modules are ``Conv1D`` (GPT-2), as PEFT records it for them."""
    from pathlib import Path

    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = targets or sorted({name.rsplit(".", 1)[-1] for name in weights})
    dora = any(len(w) > 2 and w[2] is not None for w in weights.values())
    conf = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type="CAUSAL_LM", base_model_name_or_path=base_name, fan_in_fan_out=fan_in_fan_out,
                      use_dora=dora)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(out_dir)
    tensors = {}
    for name, (a, b, *m) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().cpu()
        if dora:
            tensors[f"base_model.model.{name}{MAGNITUDE}"] = m[0].detach().contiguous().cpu()
    save_file(tensors, str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
