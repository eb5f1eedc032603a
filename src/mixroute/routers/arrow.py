"""``arrow`` router (Ostapenko et al., ICML 2024; PEFT ``tuners/lora/arrow.py``): zero-shot token routing from
the LoRA weights alone.

Each expert's prototype in a layer is the top right singular vector v_e of its LoRA update B A (stacked over
the projections that read that layer's normalised input, so one vector per expert and layer: mixroute routes
per layer, shared by the layer's projections). Per token x: score_e = |cos(x, v_e)|, keep the top
``arrow_top_k``, softmax over them with ``arrow_temperature``. The sign of a singular vector is arbitrary,
hence the absolute value.

mixroute routers read the hidden states entering the decoder layer; the projections read them after RMSNorm,
whose per-channel gain ``gain`` is applied here so the cosine is taken in the projections' own input space
(RMSNorm's 1/rms factor does not change a cosine). The prototypes and gain are buffers computed from weights
(``mixroute.library.features.arrow_prototypes``), recomputed whenever experts change; at zero they give
every expert the same score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from mixroute.config import MixtureConfig, f
from mixroute.routers.base import Router, RouterDims, RouteWeights


@dataclass
class ArrowConfig:
    arrow_top_k: int = f(3, "Experts kept per token (capped at num_experts).", ge=1)
    arrow_temperature: float = f(1.0, "Softmax temperature over the kept experts' |cos| scores.", gt=0.0)


class ArrowRouter(Router):
    """Per-token |cos| top-k router over weight-derived prototypes; see the module docstring."""

    name = "arrow"
    Config = ArrowConfig
    level = "token"
    library_state = "lora"

    def __init__(self, cfg: MixtureConfig, dims: RouterDims) -> None:
        super().__init__()
        self.num_experts = dims.num_experts
        s = self.settings(cfg)
        self.top_k = min(s.arrow_top_k, dims.num_experts)
        self.temperature = s.arrow_temperature
        self.register_buffer("prototypes", torch.zeros(dims.num_experts, dims.hidden_size))
        self.register_buffer("gain", torch.ones(dims.hidden_size))

    def scores(self, hidden: Tensor) -> Tensor:
        """(B, T, E) |cos| between each token (after the gain) and each expert's prototype."""
        x = hidden.float() * self.gain.float()
        p = self.prototypes.float()
        dots = (x @ p.T).abs()
        return dots / (x.norm(dim=-1, keepdim=True) * p.norm(dim=-1)).clamp_min(1e-8)

    def load_library_state(self, key: str, library: Any) -> None:
        protos, gain = library.arrow(key)
        self.prototypes.copy_(protos)
        self.gain.copy_(gain)

    def forward(self, hidden: Tensor, mask: Optional[Tensor], task_ids: Optional[Tensor]) -> RouteWeights:
        vals, idx = self.scores(hidden).topk(self.top_k, dim=-1)
        w = torch.zeros(*hidden.shape[:2], self.num_experts, device=hidden.device)
        w = w.scatter(-1, idx, (vals / self.temperature).softmax(-1))
        return RouteWeights(weights=w.to(hidden.dtype), level="token")
