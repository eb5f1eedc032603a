"""Stratified split, collator, length-grouped batches and the synthetic suite."""

import random
from collections import Counter

import pytest
import torch

from mixroute.data import (FAMILIES, Collator, DataError, Record, batch_indices, make_batches, split_records,
                           synthetic_suite, tokenize_records)


def records(n_per_cat: dict[str, int]) -> list[Record]:
    return [Record(instruction=f"{c} question {i}", response=f"answer {i}", category=c)
            for c, n in n_per_cat.items() for i in range(n)]


def test_split_is_stratified_by_category():
    recs = records({"a": 100, "b": 40, "c": 7})
    s = split_records(recs, val_fraction=0.1, test_fraction=0.2, seed=0)
    counts = {k: Counter(r.category for r in v) for k, v in s.items()}
    assert counts["test"] == {"a": 20, "b": 8, "c": 1}
    assert counts["validation"] == {"a": 10, "b": 4, "c": 1}
    assert counts["train"] == {"a": 70, "b": 28, "c": 5}
    together = s["train"] + s["validation"] + s["test"]
    assert sorted(together, key=str) == sorted(recs, key=str)  # disjoint and complete


def test_split_is_deterministic_and_independent_of_input_order():
    recs = records({"a": 50, "b": 30})
    shuffled = list(recs)
    random.Random(5).shuffle(shuffled)
    a = split_records(recs, 0.1, 0.1, seed=7)
    assert a == split_records(recs, 0.1, 0.1, seed=7)
    assert a == split_records(shuffled, 0.1, 0.1, seed=7)
    assert a["test"] != split_records(recs, 0.1, 0.1, seed=8)["test"]


def test_small_categories_still_hold_out_one_record():
    s = split_records(records({"a": 5, "b": 2, "c": 25}), 0.1, 0.1, seed=0)
    counts = {k: Counter(r.category for r in v) for k, v in s.items()}
    assert counts["test"] == counts["validation"] == {"a": 1, "c": 3}  # 2.5 rounds half up; b is too small
    assert counts["train"] == {"a": 3, "b": 2, "c": 19}


def test_split_rejects_fractions_leaving_no_train():
    with pytest.raises(DataError, match="must be < 1"):
        split_records(records({"a": 10}), 0.5, 0.5)


def test_collator_pads_right_and_masks(tok):
    recs = [Record(instruction="Add 2 and 3.", response="5", category="m"),
            Record(instruction="Sort 3, 1, 2 in ascending order please.", response="1, 2, 3", category="s")]
    ex = tokenize_records(recs, tok, ["m", "s"], "chat").examples
    b = Collator(tok)(ex)
    assert set(b) == {"input_ids", "attention_mask", "labels", "prompt_mask", "task_ids"}
    lens = [len(e["input_ids"]) for e in ex]
    t = max(lens)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == b["prompt_mask"].shape == (2, t)
    assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long
    assert b["prompt_mask"].dtype == torch.bool and b["task_ids"].tolist() == [0, 1]
    for i, e in enumerate(ex):
        k, p = lens[i], e["prompt_len"]
        assert b["input_ids"][i, :k].tolist() == e["input_ids"]
        assert (b["input_ids"][i, k:] == tok.pad_token_id).all()
        assert b["attention_mask"][i].tolist() == [1] * k + [0] * (t - k)
        assert b["prompt_mask"][i].tolist() == [True] * p + [False] * (t - p)
        labels = b["labels"][i]
        assert ((labels == -100) == (~b["prompt_mask"][i] & b["attention_mask"][i].bool()).logical_not()).all()
    assert Collator(tok, pad_to_multiple_of=8)(ex)["input_ids"].shape[1] % 8 == 0


def test_collated_batch_gives_a_response_only_loss(tiny):
    model, tok = tiny
    recs = synthetic_suite(per_task=1, seed=0)[:4]
    ex = tokenize_records(recs, tok, sorted({r.category for r in recs}), "chat").examples
    b = Collator(tok)(ex)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert torch.isfinite(out.loss)
    n_loss = int((b["labels"][:, 1:] != -100).sum())  # HF shifts labels by one
    assert n_loss == sum(len(e["input_ids"]) - e["prompt_len"] for e in ex)


def test_length_grouping_reduces_padding_and_is_seeded():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(256)]
    plain = batch_indices(lengths, 8, shuffle=True, seed=1)
    grouped = batch_indices(lengths, 8, shuffle=True, seed=1, length_grouped=True)
    assert grouped == batch_indices(lengths, 8, shuffle=True, seed=1, length_grouped=True)
    assert grouped != batch_indices(lengths, 8, shuffle=True, seed=2, length_grouped=True)
    for bs in (plain, grouped):
        assert sorted(i for b in bs for i in b) == list(range(256))
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa
    assert pad(grouped) < pad(plain) / 3
    ordered = batch_indices(lengths, 8, length_grouped=True)  # no shuffle: globally sorted
    flat = [lengths[i] for b in ordered for i in b]
    assert flat == sorted(flat)
    assert batch_indices(lengths, 10, drop_last=True)[-1] == list(range(240, 250))


def test_make_batches_yields_collated_batches(tok):
    recs = synthetic_suite(per_task=3, seed=0)
    cats = sorted(FAMILIES)
    ex = tokenize_records(recs, tok, cats, "plain").examples
    batches = list(make_batches(ex, Collator(tok), batch_size=5, shuffle=True, seed=0, length_grouped=True))
    assert sorted(b["input_ids"].shape[0] for b in batches) == [4] + [5] * 4  # batches are shuffled
    assert sorted(t for b in batches for t in b["task_ids"].tolist()) == sorted(e["task_id"] for e in ex)


def test_synthetic_suite_is_deterministic_with_distinct_families(tok):
    a = synthetic_suite(per_task=30, seed=0)
    assert a == synthetic_suite(per_task=30, seed=0)
    assert a != synthetic_suite(per_task=30, seed=1)
    counts = Counter(r.category for r in a)
    assert len(counts) >= 6 and set(counts.values()) == {30} and set(counts) == set(FAMILIES)
    assert len({(r.category, r.instruction, r.context) for r in a}) == len(a)  # unique per family
    resp_tokens = [len(tok(r.response, add_special_tokens=False)["input_ids"]) for r in a]
    assert max(resp_tokens) <= 24  # short responses, learnable on CPU
    by_family = {c: next(r for r in a if r.category == c) for c in counts}
    assert by_family["arithmetic"].response.lstrip("-").isdigit()
    assert by_family["kv_extract"].context and "=" in by_family["kv_extract"].context
    with pytest.raises(DataError, match="unknown synthetic task families"):
        synthetic_suite(families=["poetry"])


def test_synthetic_answers_are_correct():
    for r in synthetic_suite(per_task=20, seed=3):
        if r.category == "arithmetic":
            expr = r.instruction.removeprefix("Compute ").removesuffix(".")
            assert str(eval(expr)) == r.response  # noqa: S307 (our own generated expression)
        elif r.category == "list_sort":
            order, nums = r.instruction.split(" order: ")
            xs = [int(x) for x in nums.split(", ")]
            assert r.response == ", ".join(map(str, sorted(xs, reverse=order.endswith("descending"))))
        elif r.category == "word_count":
            assert int(r.response) == len(r.context.split())
