"""Batches: the collator (dynamic right padding, the batch dict of docs/architecture.md), seeded batch order
with optional length grouping (the one implementation: training order and held-out batches use it), and
left-padded prompt batches for generation."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mixroute.data.format import Example, Template, format_example, prompt_ids
from mixroute.data.records import Record


BATCH_KEYS = ("input_ids", "attention_mask", "labels", "prompt_mask", "task_ids")


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (what ``load_base_model`` sets as pad)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pid)


class Collator:
    """``list[Example] -> batch dict``, right-padded to the longest example of the batch.

    Keys: input_ids (B, T) long, attention_mask (B, T) long, labels (B, T) long (-100 on prompt and padding),
    prompt_mask (B, T) bool (True on prompt tokens), task_ids (B,) long.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_id = pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        n, t = len(examples), max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        labels = torch.full((n, t), -100, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        prompt_mask = torch.zeros((n, t), dtype=torch.bool)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
            prompt_mask[i, :e["prompt_len"]] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "prompt_mask": prompt_mask, "task_ids": torch.tensor([e["task_id"] for e in examples],
                                                                      dtype=torch.long)}


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Tensor]:
    """The batch-dict tensors on ``device`` (other keys, e.g. generation prompt strings, are left out)."""
    return {k: batch[k].to(device) for k in BATCH_KEYS if k in batch and batch[k] is not None}


def batch_indices(lengths: Sequence[int], batch_size: int, shuffle: bool = False, seed: int = 0,
                  length_grouped: bool = False, group_batches: int = 16, drop_last: bool = False) -> list[list[int]]:
    """Index batches over ``len(lengths)`` examples.

    ``shuffle``: a seeded permutation. ``length_grouped``: within windows of ``group_batches`` batches, examples
    are sorted by length (less padding), then the batches are shuffled (seeded) when ``shuffle`` is on;
    without ``shuffle`` all examples are sorted by length. Same arguments -> same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist() if shuffle else list(range(len(lengths)))
    if length_grouped:
        window = len(order) if not shuffle else batch_size * group_batches
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: (lengths[i], i))]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if length_grouped and shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def make_batches(examples: Sequence[Example], collator: Collator, batch_size: int, shuffle: bool = False,
                 seed: int = 0, length_grouped: bool = False, drop_last: bool = False) -> Iterator[dict[str, Tensor]]:
    """Collated batches of ``examples`` in the order of :func:`batch_indices` (one pass, lazily)."""
    lengths = [len(e["input_ids"]) for e in examples]
    for idx in batch_indices(lengths, batch_size, shuffle, seed, length_grouped, drop_last=drop_last):
        yield collator([examples[i] for i in idx])


def generation_batch(prompts: Sequence[Union[Sequence[int], Record]], tokenizer: Any, template: Template = "chat",
                     max_length: Optional[int] = None) -> dict[str, Any]:
    """Left-padded prompt-only batch for batched greedy generation.

    ``prompts`` are token id lists (e.g. from :func:`prompt_ids`) or Records (rendered with ``template`` and
    truncated like training prompts when ``max_length`` is given). Returns ``input_ids`` (B, T) long,
    ``attention_mask`` (B, T) long (0 on the left padding) and ``prompts`` (the prompt strings).
    """
    if not prompts:
        raise ValueError("generation_batch needs at least one prompt")
    ids_list, texts = [], []
    for p in prompts:
        if isinstance(p, Record):
            ids = prompt_ids(p, tokenizer, template=template, max_length=max_length)
            texts.append(format_example(p, tokenizer, template)[0] if max_length is None else tokenizer.decode(ids))
        else:
            ids = [int(x) for x in p]
            texts.append(tokenizer.decode(ids))
        ids_list.append(ids)
    n, t = len(ids_list), max(len(x) for x in ids_list)
    input_ids = torch.full((n, t), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    for i, ids in enumerate(ids_list):
        if ids:
            input_ids[i, t - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, t - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompts": texts}
