"""The LoRA bank turns per-expert routing weights into its rank layout in the right order: checked against a
per-expert reference with distinct, non-uniform weights over distinct experts (a swapped or tiled expansion
would pass with uniform weights or identical experts)."""

from __future__ import annotations

import pytest
import torch

from mixroute.experts.lora import LoraBank
from mixroute.routers import RouteWeights


def bank(num_experts: int = 3, rank: int = 2) -> LoraBank:
    torch.manual_seed(0)
    b = LoraBank(6, 5, num_experts, rank, alpha=4.0)
    with torch.no_grad():
        b.B.normal_()  # every expert different (B starts at zero)
    return b


def reference(b: LoraBank, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_e w[..., e] * scale * B_e A_e x, one expert at a time."""
    out = torch.zeros(*x.shape[:-1], b.out_features)
    for e in range(b.num_experts):
        a, bb = b.expert(e)
        out += w[..., e:e + 1] * (x @ a.T @ bb.T) * b.scaling
    return out


@pytest.mark.parametrize("level", ["sequence", "token"])
@torch.no_grad()
def test_per_expert_weights_reach_their_own_ranks(level):
    b = bank()
    x = torch.randn(2, 4, 6)
    w = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]])
    if level == "token":
        w = torch.softmax(torch.randn(2, 4, 3), -1)
    got = b.add_into(torch.zeros(2, 4, 5), x, RouteWeights(weights=w, level=level))
    torch.testing.assert_close(got, reference(b, x, w if level == "token" else w[:, None, :]))


@torch.no_grad()
def test_rank_level_weights_are_used_as_they_are():
    b = bank()
    x = torch.randn(2, 4, 6)
    g = torch.rand(2, 4, 6)                              # one weight per single rank (E * r = 6)
    got = b.add_into(torch.zeros(2, 4, 5), x, RouteWeights(weights=g, level="rank"))
    want = ((x @ b.A.T) * g) @ b.B.T * b.scaling
    torch.testing.assert_close(got, want)


@torch.no_grad()
def test_one_hot_index_paths_equal_the_dense_path():
    b = bank()
    x = torch.randn(3, 4, 6)
    for idx in (torch.tensor([2, 0, 1]), torch.tensor([1, 1, 1])):  # mixed batch, then one shared expert
        w = torch.nn.functional.one_hot(idx, 3).float()
        gathered = b.add_into(torch.zeros(3, 4, 5), x, RouteWeights(weights=w, index=idx))
        torch.testing.assert_close(gathered, reference(b, x, w[:, None, :]))


def test_gathered_experts_are_reused_only_without_autograd():
    """Decode steps keep the prefill's decision: the bank's gathered A/B are derived once and reused then, but
    never kept while training (a kept graph would go stale when the weights change)."""
    b = bank()
    x = torch.randn(3, 1, 6)
    idx = torch.tensor([2, 0, 1])
    route = RouteWeights(weights=torch.nn.functional.one_hot(idx, 3).float(), index=idx)
    b.add_into(torch.zeros(3, 1, 5), x, route)
    assert not route._derived.get(("gather", id(b)))
    with torch.no_grad():
        first = b.add_into(torch.zeros(3, 1, 5), x, route)
        cached = route._derived[("gather", id(b))]
        again = b.add_into(torch.zeros(3, 1, 5), x, route)
    assert route._derived[("gather", id(b))] is cached
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, reference(b, x, route.weights[:, None, :]))
