"""What travels between server and clients: the adapter state only (experts + routers/gates), as a Flower
``ArrayRecord``, never a base-model tensor; and its size in bytes (logged per round)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

ROUTER_PREFIX = "routers."
EXPERT_PREFIX = "experts."


class BaseTensorLeak(RuntimeError):
    """A payload held a tensor of the frozen base model."""


def check_adapter_only(state: dict[str, Tensor]) -> None:
    """Refuse any key that is not an expert or router tensor (base-model keys start with ``model.``)."""
    bad = [k for k in state if not (k.startswith(EXPERT_PREFIX) or k.startswith(ROUTER_PREFIX))]
    if bad:
        raise BaseTensorLeak(f"refusing to send non-adapter tensors: {', '.join(bad[:5])}")


def to_record(state: dict[str, Tensor]) -> Any:
    """An ``ArrayRecord`` of an adapter state dict (checked: no base-model tensor)."""
    from flwr.app import ArrayRecord

    check_adapter_only(state)
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: Any) -> dict[str, Tensor]:
    return dict(record.to_torch_state_dict())


def num_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of the tensors' data (what a round moves per client and direction, without framing)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def is_router(key: str) -> bool:
    return key.startswith(ROUTER_PREFIX)


def expert_slices(ax: tuple[int, int], experts: Sequence[int], ndim: int) -> list[tuple]:
    """Index tuples of each of ``experts``' slices in a tensor of ``ndim`` dims stacked along ``ax`` = (dim, block)."""
    dim, block = ax
    out = []
    for e in experts:
        sl = [slice(None)] * ndim
        sl[dim] = slice(e * block, (e + 1) * block)
        out.append(tuple(sl))
    return out


def trim_experts(state: dict[str, Tensor], experts: Sequence[int],
                 axis: Callable[[str, tuple], Optional[tuple[int, int]]]) -> dict[str, Tensor]:
    """Only the slices of ``experts`` (in that order) of every per-expert tensor; tensors shared by the experts
    are kept whole. What a client sends for the experts it trained (``expand_experts`` undoes it); nothing when
    it trained none."""
    if not experts:
        return {}
    out = {}
    for key, t in state.items():
        ax = axis(key, tuple(t.shape))
        out[key] = t if ax is None else torch.cat([t[s] for s in expert_slices(ax, experts, t.dim())], dim=ax[0])
    return out


def expand_experts(trimmed: dict[str, Tensor], experts: Sequence[int], previous: dict[str, Tensor],
                   axis: Callable[[str, tuple], Optional[tuple[int, int]]]) -> dict[str, Tensor]:
    """The full tensors of ``previous`` with the slices of ``experts`` replaced by those ``trim_experts`` kept."""
    out = {}
    for key, prev in previous.items():
        if key not in trimmed:
            continue
        ax = axis(key, tuple(prev.shape))
        if ax is None:
            out[key] = trimmed[key]
            continue
        full = prev.clone()
        got = trimmed[key].split(ax[1], dim=ax[0])
        if len(got) != len(experts):
            raise ValueError(f"{key}: {len(got)} expert slices received for experts {list(experts)}")
        for s, part in zip(expert_slices(ax, experts, prev.dim()), got):
            full[s] = part
        out[key] = full
    return out
