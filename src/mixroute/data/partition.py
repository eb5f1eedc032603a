"""Partition a train split among federated clients: ``iid``, ``dirichlet(alpha)`` over categories, ``mop_skew``.

``mop_skew`` follows the MoP paper's appendix A: draw ``total`` samples (5,000) from all categories, split each
category's samples into N partitions (N = clients) of unequal size, one partition ``skew_factor`` (15) times
larger than each of the others, and give every client one partition of every category at random.

Every scheme is a pure function of (task ids, clients, seed): the same arguments give the same partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

SCHEMES = ("iid", "dirichlet", "mop_skew")


@dataclass
class Partition:
    """``clients[k]`` = indices (into the partitioned list) held by client k, sorted."""

    scheme: str
    clients: list[list[int]]
    num_categories: int
    task_ids: list[int]

    def counts(self) -> list[list[int]]:
        """clients x categories example counts."""
        out = [[0] * self.num_categories for _ in self.clients]
        for k, idx in enumerate(self.clients):
            for i in idx:
                out[k][self.task_ids[i]] += 1
        return out

    def table(self, categories: list[str]) -> dict:
        """The JSON-ready table written to the run directory (``partition.json``)."""
        return {"scheme": self.scheme, "categories": list(categories),
                "clients": [f"client {k}" for k in range(len(self.clients))], "counts": self.counts()}


def _shares(n: int, weights: np.ndarray) -> list[int]:
    """Split ``n`` items by ``weights`` into integers summing to ``n`` (largest remainder)."""
    raw = n * weights / weights.sum()
    base = np.floor(raw).astype(int)
    rest = n - int(base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return base.tolist()


def partition(task_ids: list[int], num_clients: int, scheme: str = "mop_skew", seed: int = 0,
              alpha: float = 0.5, total: Optional[int] = 5000, skew_factor: float = 15.0,
              num_categories: Optional[int] = None) -> Partition:
    """Assign the examples with these category ids to ``num_clients`` clients (see the module docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"partition scheme {scheme!r} is not valid; expected one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    ncat = num_categories if num_categories is not None else (max(task_ids) + 1 if task_ids else 0)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    everything = np.arange(len(task_ids))
    if scheme == "iid":
        perm = rng.permutation(everything)
        for k, part in enumerate(np.array_split(perm, num_clients)):
            clients[k] = part.tolist()
    else:
        pool = everything
        if scheme == "mop_skew" and total is not None and total < len(pool):
            pool = np.sort(rng.choice(pool, size=total, replace=False))
        tids = np.asarray(task_ids)[pool] if len(pool) else np.zeros(0, dtype=int)
        for c in range(ncat):
            idx = rng.permutation(pool[tids == c])
            if scheme == "dirichlet":
                sizes = _shares(len(idx), rng.dirichlet([alpha] * num_clients))
                owners = list(range(num_clients))
            else:  # mop_skew: one large share, N-1 small ones; partitions handed to clients at random
                sizes = _shares(len(idx), np.array([skew_factor] + [1.0] * (num_clients - 1)))
                owners = rng.permutation(num_clients).tolist()
            start = 0
            for owner, size in zip(owners, sizes):
                clients[owner] += idx[start:start + size].tolist()
                start += size
    return Partition(scheme, [sorted(int(i) for i in c) for c in clients], ncat, [int(t) for t in task_ids])


def format_table(table: dict) -> str:
    """The clients x categories counts table as plain text (with totals)."""
    cats, counts = table["categories"], table["counts"]
    width = max([len(c) for c in cats] + [6])
    head = f"{'':<10}" + "".join(f"{c[:width]:>{width + 1}}" for c in cats) + f"{'total':>8}"
    lines = [head]
    for name, row in zip(table["clients"], counts):
        lines.append(f"{name:<10}" + "".join(f"{n:>{width + 1}}" for n in row) + f"{sum(row):>8}")
    tot = [sum(r[c] for r in counts) for c in range(len(cats))]
    lines.append(f"{'total':<10}" + "".join(f"{n:>{width + 1}}" for n in tot) + f"{sum(tot):>8}")
    return "\n".join(lines)


def partition_train(fed: object, task_ids: list[int], num_categories: int) -> Partition:
    """The partition a ``FederatedConfig`` describes, over a train split's category ids."""
    return partition(task_ids, fed.clients, fed.partition, seed=fed.partition_seed,  # type: ignore[attr-defined]
                     alpha=fed.dirichlet_alpha, total=fed.partition_total,  # type: ignore[attr-defined]
                     skew_factor=fed.skew_factor, num_categories=num_categories)  # type: ignore[attr-defined]
