"""Aggregation rules: pure functions over state dicts, registered by name in ``RULES`` (hand-checked in
tests/federated/test_federated_aggregate.py). ``federated.aggregation`` names one.

- ``fedavg``: every tensor = sum_k n_k w_k / sum_k n_k.
- ``fedprox``: the same average on the server; each client adds (mu/2)||w - w_global||^2 to its loss
  (the rule is registered with ``proximal=True``).
- ``usage``: the slice of expert e in every per-expert tensor = sum_k n_k u_ke w_ke / sum_k n_k u_ke, where u_ke is
  client k's measured routing mass on expert e; when no client used expert e (sum 0) it keeps its previous global
  value. Tensors shared by the experts and routers/gates are averaged by examples.
- MoA's stage 1 (``per_category_average``, whatever the rule): expert e = sum_k c_ke w_ke / sum_k c_ke over the
  clients that trained it, c_ke = client k's training examples of category e; an expert no client trained keeps
  its previous value.
- ``personalize_router``: router tensors are not averaged into the client's model; each client keeps its own
  (``personal_routers``), the global router is still the example-weighted average (for the global test split).

A new rule is one function::

    @register("median")
    def median(r: Survivors) -> dict[str, Tensor]:
        return {k: torch.stack([s[k] for s in r.states]).median(0).values for k in r.previous}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mixroute.config import ConfigError
from mixroute.federated.payload import expert_slices

Axis = Callable[[str, tuple], Optional[tuple[int, int]]]


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    acc = sum(t.to(torch.float64) * wi for t, wi in zip(tensors, w))
    return (acc / w.sum()).to(tensors[0].dtype)


def fedavg(states: Sequence[dict[str, Tensor]], examples: Sequence[int]) -> dict[str, Tensor]:
    """Example-weighted average of every tensor."""
    if not states:
        raise ValueError("fedavg needs at least one client state")
    return {k: weighted_mean([s[k] for s in states], examples) for k in states[0]}


def usage_average(previous: dict[str, Tensor], states: Sequence[dict[str, Tensor]], examples: Sequence[int],
                  usage: Sequence[Sequence[float]], axis: Axis) -> dict[str, Tensor]:
    """Mixture-aware FedAvg: expert slices weighted by n_k * u_ke (previous value when unused), the rest by n_k."""
    if not states:
        raise ValueError("usage aggregation needs at least one client state")
    out = {}
    for key, prev in previous.items():
        ax = axis(key, tuple(prev.shape))
        if ax is None:
            out[key] = weighted_mean([s[key] for s in states], examples)
            continue
        new = prev.clone()
        for e, sl in enumerate(expert_slices(ax, range(prev.shape[ax[0]] // ax[1]), prev.dim())):
            weights = [n * float(u[e]) for n, u in zip(examples, usage)]
            if sum(weights) <= 0:
                continue  # no client routed to expert e: keep its previous value
            new[sl] = weighted_mean([s[key][sl] for s in states], weights)
        out[key] = new
    return out


@dataclass(frozen=True)
class Survivors:
    """What a rule aggregates: the previous global state and the replies of the clients that succeeded, in
    partition order (``usage[k][e]``: client k's routing mass on expert e; ``axis(key, shape)``: where a tensor's
    expert slices lie, None for tensors shared by the experts)."""

    previous: dict[str, Tensor]
    states: Sequence[dict[str, Tensor]]
    examples: Sequence[int]
    usage: Optional[Sequence[Sequence[float]]] = None
    axis: Optional[Axis] = None


@dataclass(frozen=True)
class Rule:
    fn: Callable[[Survivors], dict[str, Tensor]]
    proximal: bool = False   # clients add FedProx's proximal term to their loss


RULES: dict[str, Rule] = {}


def register(name: str, proximal: bool = False) -> Callable:
    """Register ``fn(Survivors) -> state`` as ``federated.aggregation: name``."""
    def deco(fn: Callable[[Survivors], dict[str, Tensor]]) -> Callable:
        if name in RULES:
            raise ValueError(f"aggregation rule {name!r} is already registered")
        RULES[name] = Rule(fn, proximal)
        return fn
    return deco


def rule_for(name: str) -> Rule:
    if name not in RULES:
        raise ConfigError(f"federated.aggregation: {name!r} is not valid; expected one of {', '.join(RULES)}")
    return RULES[name]


@register("fedavg")
def _fedavg(r: Survivors) -> dict[str, Tensor]:
    return fedavg(r.states, r.examples)


register("fedprox", proximal=True)(_fedavg)   # FedProx's server side is FedAvg; its clients add the proximal term


@register("usage")
def _usage(r: Survivors) -> dict[str, Tensor]:
    if r.usage is None or r.axis is None:
        raise ValueError("usage aggregation needs per-client usage and the expert layout")
    return usage_average(r.previous, r.states, r.examples, r.usage, r.axis)


def aggregate(name: str, previous: dict[str, Tensor], states: Sequence[dict[str, Tensor]],
              examples: Sequence[int], usage: Optional[Sequence[Sequence[float]]] = None,
              axis: Optional[Axis] = None) -> dict[str, Tensor]:
    """The new global state by rule ``name``; an empty ``states`` (no survivors) keeps ``previous``."""
    rule = rule_for(name)
    if not states:
        return {k: v.clone() for k, v in previous.items()}
    return rule.fn(Survivors(previous, states, examples, usage, axis))


def per_category_average(previous: dict[str, Tensor], states: Sequence[dict[str, Tensor]],
                         experts: Sequence[Sequence[int]], counts: Sequence[Sequence[int]], num_experts: int,
                         axis: Axis) -> dict[str, Tensor]:
    """MoA's stage 1: each client sent the slices of the experts it trained (``experts[k]``, with its examples
    of each category in ``counts[k]``; ``payload.trim_experts``); expert e becomes the example-weighted average
    over the clients that trained it, the others keep ``previous``. Tensors no client sent (the routers) are
    kept."""
    from mixroute.federated.payload import expand_experts

    sent = [(s, ex, c) for s, ex, c in zip(states, experts, counts) if ex]
    if not sent:
        return {k: v.clone() for k, v in previous.items()}
    full = [expand_experts(s, ex, previous, axis) for s, ex, _ in sent]
    keys = [k for k in previous if k in full[0]]
    examples = [sum(c) for _, _, c in sent]
    usage = []
    for (_, ex, c), n in zip(sent, examples):
        u = [0.0] * num_experts
        for e, ce in zip(ex, c):
            u[e] = ce / n
        usage.append(u)
    new = usage_average({k: previous[k] for k in keys}, full, examples, usage, axis)
    return {**{k: v.clone() for k, v in previous.items()}, **new}


def split_routers(state: dict[str, Tensor], is_router: Callable[[str], bool]) -> tuple[dict, dict]:
    """(experts and other tensors, router tensors)."""
    return ({k: v for k, v in state.items() if not is_router(k)}, {k: v for k, v in state.items() if is_router(k)})


def client_state(global_state: dict[str, Tensor], personal: Optional[dict[str, Tensor]]) -> dict[str, Tensor]:
    """What client k starts a round from: the global state with its own router when it has one."""
    return {**global_state, **(personal or {})}
