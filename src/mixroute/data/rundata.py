"""A run's data as the recipes see it: training batches reproducible from (seed, micro-batch index), held-out
batches and generation prompts.

``RunData.build(cfg, tokenizer)`` calls ``build_datasets`` and keeps the bundle. The training order is a pure
function of (seed, micro-batch index): epoch ``e`` is ``batch_indices`` of the train pool with the seed
``epoch_seed(seed, e)`` (shuffled, length-grouped when ``train.length_grouped``), so a resumed run reads exactly
the batches an uninterrupted run would have read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import Tensor

from mixroute.data.batching import Collator, batch_indices
from mixroute.data.bundle import build_datasets
from mixroute.data.format import Example, prompt_ids
from mixroute.data.records import Record
from mixroute.data.split import SPLITS

if TYPE_CHECKING:
    from mixroute.config import RunConfig


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order: distinct for every (seed, epoch) pair in practice."""
    return seed * 1_000_003 + epoch


@dataclass
class RunData:
    """Tokenised examples and records per split plus the collator; see the module docstring."""

    categories: list[str]
    examples: dict[str, list[Example]]             # split -> examples (input_ids, labels, task_id, ...)
    records: dict[str, list[Record]]               # split -> records; records[s][i] is the record of examples[s][i]
    collate: Collator                              # list[example] -> batch dict (docs/architecture.md)
    prompt_ids: Callable[[Any], list[int]]         # record (or a dict of its fields) -> prompt token ids
    report: dict[str, Any] = field(default_factory=dict)
    length_grouped: bool = False
    max_eval: Optional[int] = None
    _epoch: dict[tuple, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: "RunConfig", tokenizer: Any) -> "RunData":
        bundle = build_datasets(cfg.data, tokenizer)
        return cls(categories=list(bundle.categories), examples={s: list(bundle.examples[s]) for s in SPLITS},
                   records={s: list(bundle.records[s]) for s in SPLITS}, collate=Collator(tokenizer),
                   prompt_ids=lambda rec: prompt_ids(rec, tokenizer, cfg.data), report=bundle.report,
                   length_grouped=cfg.train.length_grouped, max_eval=cfg.eval.max_eval)

    # ------------------------------------------------------------------ training order
    def _pool(self, category: Optional[int]) -> list[int]:
        """Train-split indices of ``category`` (all of them for None)."""
        pool = [i for i, e in enumerate(self.examples["train"]) if category is None or e["task_id"] == category]
        if not pool:
            name = "the train split" if category is None else f"category {self.categories[category]!r}"
            raise ValueError(f"no training examples in {name}; lower data.val_fraction/test_fraction or add data")
        return pool

    def train_size(self, category: Optional[int] = None) -> int:
        """Examples in the train split (of ``category`` only, when given)."""
        return len(self._pool(category))

    def epoch_batches(self, seed: int, epoch: int, batch_size: int, category: Optional[int] = None) -> list[list[int]]:
        """Train-split indices of every batch of one epoch, in order."""
        key = (seed, epoch, batch_size, category)
        if key not in self._epoch:
            pool = self._pool(category)
            lengths = [len(self.examples["train"][i]["input_ids"]) for i in pool]
            order = batch_indices(lengths, batch_size, shuffle=True, seed=epoch_seed(seed, epoch),
                                  length_grouped=self.length_grouped)
            self._epoch = {key: [[pool[j] for j in b] for b in order]}  # one epoch cached at a time
        return self._epoch[key]

    def train_batch(self, k: int, batch_size: int, seed: int, category: Optional[int] = None) -> dict[str, Tensor]:
        """Micro-batch number ``k`` (0-based, counted over the whole run) of the seeded training order."""
        per_epoch = -(-len(self._pool(category)) // batch_size)
        batch = self.epoch_batches(seed, k // per_epoch, batch_size, category)[k % per_epoch]
        return self.collate([self.examples["train"][i] for i in batch])

    # ------------------------------------------------------------------ held-out
    def held_out_indices(self, split: str, max_per_category: Optional[int] = None,
                         category: Optional[int] = None) -> list[int]:
        """Indices of ``split`` with at most ``max_per_category`` (default ``eval.max_eval``) per category
        (only ``category``'s when given)."""
        cap = max_per_category if max_per_category is not None else self.max_eval
        seen: dict[int, int] = {}
        keep = []
        for i, e in enumerate(self.examples[split]):
            c = e["task_id"]
            if category is not None and c != category:
                continue
            if cap is None or seen.get(c, 0) < cap:
                seen[c] = seen.get(c, 0) + 1
                keep.append(i)
        return keep

    def batches(self, split: str, batch_size: int, max_per_category: Optional[int] = None,
                category: Optional[int] = None) -> list[dict[str, Tensor]]:
        """Held-out batches in a fixed order, sorted by length (less padding); only ``category``'s when given."""
        ex = self.examples[split]
        idx = self.held_out_indices(split, max_per_category, category)
        order = batch_indices([len(ex[i]["input_ids"]) for i in idx], batch_size, length_grouped=True)
        return [self.collate([ex[idx[j]] for j in b]) for b in order]

    def generation_examples(self, split: str, max_per_category: Optional[int]) -> list[dict[str, Any]]:
        """The first ``max_per_category`` held-out examples of each category as prompts + references."""
        out = []
        seen: dict[int, int] = {}
        for rec, ex in zip(self.records[split], self.examples[split]):
            c = ex["task_id"]
            if max_per_category is not None and seen.get(c, 0) >= max_per_category:
                continue
            seen[c] = seen.get(c, 0) + 1
            out.append({"prompt_ids": self.prompt_ids(rec), "task_id": c, "reference": rec.response,
                        "prompt": rec.instruction})
        return out
