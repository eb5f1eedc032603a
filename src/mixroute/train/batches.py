"""The run's data, seen by the recipe: batches reproducible from (seed, step), held-out batches, prompts.

``RunData.build(cfg, tokenizer)`` calls ``mixroute.data.build_datasets`` and wraps the resulting bundle. The
training order is a pure function of (seed, micro-batch index): epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)`` (optionally length-grouped), so a resumed run reads exactly the batches
an uninterrupted run would have read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from mixroute.config import RunConfig


@dataclass
class RunData:
    """Tokenised examples per split plus the collator; see the module docstring."""

    categories: list[str]
    examples: dict[str, list[dict[str, Any]]]      # split -> examples (input_ids, labels, task_id, ...)
    records: dict[str, list[dict[str, Any]]]       # split -> records (instruction, context, response, category)
    collate: Any                                   # list[example] -> batch dict (docs/architecture.md)
    prompt_ids: Any                                # record -> prompt token ids (generation)
    report: dict[str, Any] = field(default_factory=dict)
    length_grouped: bool = False
    max_eval: Optional[int] = None
    _plans: dict[tuple, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer: Any) -> "RunData":
        from mixroute import data as D

        bundle = D.build_datasets(cfg.data, tokenizer)
        return cls(categories=list(bundle.categories), examples=_splits(bundle, "examples"),
                   records=_splits(bundle, "records"), collate=D.Collator(tokenizer),
                   prompt_ids=lambda rec: D.prompt_ids(rec, tokenizer, cfg.data),
                   report=getattr(bundle, "report", {}) or {}, length_grouped=cfg.train.length_grouped,
                   max_eval=cfg.eval.max_eval)

    # ------------------------------------------------------------------ training order
    def _pool(self, category: Optional[int]) -> list[int]:
        ex = self.examples["train"]
        return [i for i, e in enumerate(ex) if category is None or e["task_id"] == category]

    def _plan(self, seed: int, epoch: int, bs: int, category: Optional[int]) -> list[list[int]]:
        key = (seed, epoch, bs, category)
        if key not in self._plans:
            pool = self._pool(category)
            if not pool:
                name = "the train split" if category is None else f"category {self.categories[category]!r}"
                raise ValueError(f"no training examples in {name}; lower data.val_fraction/test_fraction or add data")
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
            if self.length_grouped:  # sort within mega-batches of 16 batches, then shuffle the batches
                mega = bs * 16
                lens = lambda i: len(self.examples["train"][i]["input_ids"])  # noqa: E731
                order = [i for s in range(0, len(order), mega) for i in sorted(order[s:s + mega], key=lens)]
            plan = [order[s:s + bs] for s in range(0, len(order), bs)]
            if self.length_grouped:
                plan = [plan[i] for i in torch.randperm(len(plan), generator=g).tolist()]
            self._plans = {key: plan}  # one epoch cached at a time
        return self._plans[key]

    def train_batch(self, k: int, batch_size: int, seed: int, category: Optional[int] = None) -> dict[str, Tensor]:
        """Micro-batch number ``k`` (0-based, counted over the whole run) of the seeded training order."""
        n = len(self._pool(category))
        per_epoch = max(1, -(-n // batch_size))
        plan = self._plan(seed, k // per_epoch, batch_size, category)
        return self.collate([self.examples["train"][i] for i in plan[k % per_epoch]])

    # ------------------------------------------------------------------ held-out
    def held_out_indices(self, split: str, max_per_category: Optional[int] = None) -> list[int]:
        """Indices of ``split`` with at most ``max_per_category`` (default ``eval.max_eval``) per category."""
        cap = max_per_category if max_per_category is not None else self.max_eval
        seen: dict[int, int] = {}
        keep = []
        for i, e in enumerate(self.examples[split]):
            c = e["task_id"]
            if cap is None or seen.get(c, 0) < cap:
                seen[c] = seen.get(c, 0) + 1
                keep.append(i)
        return keep

    def batches(self, split: str, batch_size: int, max_per_category: Optional[int] = None) -> list[dict[str, Tensor]]:
        """Held-out batches in a fixed order (sorted by length: less padding)."""
        ex = self.examples[split]
        idx = sorted(self.held_out_indices(split, max_per_category), key=lambda i: len(ex[i]["input_ids"]))
        return [self.collate([ex[i] for i in idx[s:s + batch_size]]) for s in range(0, len(idx), batch_size)]

    def generation_examples(self, split: str, max_per_category: Optional[int]) -> list[dict[str, Any]]:
        """The first ``max_per_category`` held-out examples of each category as prompts + references."""
        out = []
        seen: dict[int, int] = {}
        for rec, ex in zip(self.records[split], self.examples[split]):
            c = ex["task_id"]
            if max_per_category is not None and seen.get(c, 0) >= max_per_category:
                continue
            seen[c] = seen.get(c, 0) + 1
            out.append({"prompt_ids": self.prompt_ids(rec), "task_id": c, "reference": rec["response"],
                        "prompt": rec.get("instruction", "")})
        return out


def _splits(bundle: Any, attr: str) -> dict[str, list]:
    got = getattr(bundle, attr)
    return {s: list(got[s]) for s in ("train", "validation", "test")}
