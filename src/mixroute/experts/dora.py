"""DoRA experts (Liu et al. 2024, PEFT's ``use_dora``): each expert e is a LoRA (A_e, B_e) plus a magnitude
vector m_e, and replaces the frozen weight W by

    W'_e = m_e * (W + s B_e A_e) / ||W + s B_e A_e||_row

(the norm of each output row, treated as a constant in the backward pass, as the paper's section 4.3 and PEFT
do). With g_e = m_e / ||W + s B_e A_e||_row the layer's output is ``base + (g_e - 1) * xW^T + g_e * s x A_e^T
B_e^T``: PEFT's formula, so the same weights give PEFT's logits (tests/test_peft_equivalence.py).

Routed, the output is the routing-weighted sum of the experts' outputs (sum_e w_e = 1):
``base + (sum_e w_e g_e - 1) * xW^T + s x (A^T * w) (B * g)^T`` - the stacked bank's one pair of matmuls with
each expert's B columns scaled by its g_e. That covers routers that weight experts per sequence or per token;
rank-level (SMoRA) and task-level (Poly) routers mix parameters inside an expert, where DoRA's per-expert
norm has no meaning, and are refused by ``validate_mixture``.

A plain LoRA expert is the DoRA expert with m_e = ||W + s B_e A_e||_row (g_e = 1), which is how a DoRA bank
also holds plain LoRA experts (an expert library mixing both kinds).

No library implements a stacked, routed DoRA bank (PEFT's DoRA layer holds one adapter at a time), hence
written here on top of ``LoraBank``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute.arch import dense_weight, in_out_features
from mixroute.experts.lora import LoraBank
from mixroute.routers.base import RouteWeights


class DoraBank(LoraBank):
    """E stacked DoRA experts on one linear layer: ``A`` (E*r, in), ``B`` (out, E*r), magnitudes ``m`` (E, out)."""

    levels = ("sequence", "token")

    def __init__(self, module: nn.Module, in_features: int, out_features: int, num_experts: int, rank: int,
                 alpha: float, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, num_experts, rank, alpha, dropout)
        self._base = [module]   # a list: the frozen layer is read, not registered as this bank's submodule
        # PEFT's init: m = ||W + s B A||_row with B = 0, so every expert starts as the base layer
        norm = torch.linalg.vector_norm(dense_weight(module).detach().float(), dim=1)
        self.m = nn.Parameter(norm.repeat(num_experts, 1))
        self._norms: tuple = ((), None)

    @classmethod
    def for_module(cls, module: nn.Module, num_experts: int, rank: int, alpha: float,
                   dropout: float = 0.0) -> "DoraBank":
        return cls(module, *in_out_features(module), num_experts, rank, alpha, dropout)

    def expert_axes(self) -> dict[str, tuple[int, int]]:
        return {**super().expert_axes(), "m": (0, 1)}   # one magnitude row per expert

    def norms(self, dtype: torch.dtype) -> Tensor:
        """(E, out) ||W + s B_e A_e||_row, detached; recomputed only when W, A or B changed (decode steps and
        every projection of an evaluation reuse it).

        Expanded as ||W||^2 + 2s <W, B_e A_e> + s^2 ||B_e A_e||^2 per row, from W A^T (out, E*r) and the
        experts' Gram matrices A_e A_e^T (E, r, r): forming every W + s B_e A_e would cost an (E, out, in)
        tensor per projection at each training step (bench/dora_norms.py: 1.7 s a step for 8 experts on
        SmolLM2 that way, 0.5 s this way). The sum runs in float32 whatever the weights' dtype, so the
        cancellation between its terms costs no half-precision rounding."""
        w = dense_weight(self._base[0])
        key = (self.A._version, self.B._version, w._version, dtype, self.A.data_ptr(), self.B.data_ptr())
        if self._norms[0] != key:
            e, r, s = self.num_experts, self.rank, self.scaling
            with torch.no_grad():
                w32, a, b = w.float(), self.A.float(), self.B.float().view(-1, e, r)              # b: (out, E, r)
                cross = ((w32 @ a.T).view(-1, e, r) * b).sum(-1)                                   # (out, E)
                ae = a.view(e, r, -1)
                gram = torch.bmm(ae, ae.transpose(1, 2))                                           # (E, r, r)
                lora_sq = torch.einsum("oer,ers,oes->oe", b, gram, b)                              # (out, E)
                sq = w32.pow(2).sum(1, keepdim=True) + 2 * s * cross + s * s * lora_sq
                self._norms = (key, sq.clamp_min(0).sqrt().T.contiguous().to(dtype))
        return self._norms[1]

    def match_plain_lora(self, e: int) -> None:
        """Set m_e so that expert e acts as the plain LoRA it holds (g_e = 1)."""
        with torch.no_grad():
            self.m[e].copy_(self.norms(self.m.dtype)[e])

    def add_into(self, out: Tensor, x: Tensor, route: RouteWeights, slot: int = 0) -> Tensor:
        if route.level not in self.levels:
            raise ValueError(f"DoRA experts take expert weights per sequence or per token, not per {route.level}")
        module = self._base[0]
        dt = out.dtype
        if self.dropout > 0.0 and self.training:
            # PEFT scales the base term of the dropped-out input: recompute it from that input
            x = F.dropout(x, self.dropout, training=True)
            base = F.linear(x, dense_weight(module).to(x.dtype))
        else:
            base = (out - module.bias).to(dt) if getattr(module, "bias", None) is not None else out
        g = (self.m / self.norms(self.m.dtype)).to(dt)                                          # (E, out)
        e, r, s = self.num_experts, self.rank, self.scaling
        if route.index is not None:    # one expert per sequence: gather it, one LoRA of work
            idx = route.index
            a = self.A.view(e, r, -1)[idx]                                                       # (B, r, in)
            b = self.B.view(-1, e, r).permute(1, 2, 0)[idx]                                      # (B, r, out)
            gb = g[idx].unsqueeze(1)                                                             # (B, 1, out)
            lora = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)
            return (out + (gb - 1) * base + gb * (s * lora).to(dt)).to(dt)
        w = route.weights.to(dt)
        w = w.unsqueeze(1) if w.dim() == 2 else w                                               # (B, 1|T, E)
        scale = w @ g - w.sum(-1, keepdim=True)                                                 # sum_e w_e (g_e - 1)
        h = (x @ self.A.T) * route.per_rank(r, x.dtype)                                          # (B, T, E*r)
        b_scaled = self.B * g.repeat_interleave(r, dim=0).T.to(self.B.dtype)                    # (out, E*r)
        return (out + scale * base + (s * (h @ b_scaled.T)).to(dt)).to(dt)   # autocast: the layer's own dtype
