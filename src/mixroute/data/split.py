"""Deterministic, stratified train / validation / test split.

Each category is split on its own with the given fractions, so every split holds every category in the same
proportions. Within a category, records are ordered by a seeded hash of their content (not by their position),
so the split depends only on (records as a set, fractions, seed): the same seed gives the same split whatever
the input order.
"""

from __future__ import annotations

from typing import Sequence

from mixroute.data.records import DataError, Record, stable_key

SPLITS = ("train", "validation", "test")


def held(n: int, fraction: float) -> int:
    """Records of a category of ``n`` held out for a split: ``n * fraction`` rounded half up, and at least one
    when ``fraction > 0`` and the category has 3 records or more (small data sets still evaluate every
    category)."""
    k = int(n * fraction + 0.5)
    return max(k, 1) if fraction > 0 and n >= 3 else k


def split_records(records: Sequence[Record], val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, list[Record]]:
    """Split records into ``{"train", "validation", "test"}``, stratified by category.

    A category of n records gives ``held(n, test_fraction)`` test and ``held(n, val_fraction)`` validation
    records; the rest is train. Records in each split are grouped by category (sorted names), in hash order.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be < 1 (no training data otherwise), got "
                        f"{val_fraction} + {test_fraction}")
    by_cat: dict[str, list[Record]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for cat in sorted(by_cat):
        group = sorted(by_cat[cat], key=lambda r: stable_key(r, f"split-{seed}"))
        n_test, n_val = held(len(group), test_fraction), held(len(group), val_fraction)
        out["test"] += group[:n_test]
        out["validation"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    return out
