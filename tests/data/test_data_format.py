"""Templates, label masking, the prompt-prefix property and truncation accounting."""

import copy

import pytest

from mixroute.config import DataConfig
from mixroute.data import (DataError, Record, build_datasets, format_example, generation_batch, prompt_ids,
                           tokenize_records)

REC = Record(instruction="Who wrote the note?", context="Ada wrote the note in 1843.", response="Ada.",
             category="qa")
NO_CTX = Record(instruction="Add 2 and 3.", context="", response="5", category="math")
CATS = ["math", "qa"]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_labels_mask_exactly_the_prompt(tok, template):
    out = tokenize_records([REC, NO_CTX], tok, CATS, template)
    assert out.truncated == 0 and out.dropped == 0
    for rec, ex in zip([REC, NO_CTX], out.examples):
        n = ex["prompt_len"]
        prompt, completion = format_example(rec, tok, template)
        assert ex["input_ids"][:n] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert ex["labels"][:n] == [-100] * n
        assert ex["labels"][n:] == ex["input_ids"][n:] and -100 not in ex["labels"][n:]
        assert ex["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(ex["input_ids"][n:], skip_special_tokens=True).strip() == rec.response
        assert ex["task_id"] == CATS.index(rec.category)
        assert prompt_ids(rec, tok, template=template) == ex["input_ids"][:n]
        assert prompt_ids(rec.to_dict(), tok, template=template) == ex["input_ids"][:n]  # a plain dict works


def test_chat_prompt_is_a_prefix_of_the_jointly_tokenised_conversation(tok):
    user = [{"role": "user", "content": "Who wrote the note?\n\nAda wrote the note in 1843."}]
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "Ada."}], tokenize=False)
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    ex = tokenize_records([REC], tok, CATS, "chat").examples[0]
    joint = tok(full, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:ex["prompt_len"]] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert joint[:ex["prompt_len"]] == ex["input_ids"][:ex["prompt_len"]]
    assert joint[:len(ex["input_ids"])] == ex["input_ids"]  # the template's own tokens, up to its EOS


def test_chat_user_message_holds_instruction_and_context(tok):
    prompt, completion = format_example(REC, tok, "chat")
    assert "Who wrote the note?\n\nAda wrote the note in 1843." in prompt
    assert completion == "Ada." + tok.eos_token
    assert "\n\n" not in format_example(NO_CTX, tok, "chat")[0].split("user\n")[1]


def test_plain_template_text(tok):
    assert format_example(REC, tok, "plain") == (
        "### Instruction:\nWho wrote the note?\n\n### Context:\nAda wrote the note in 1843.\n\n### Response:\n", "Ada.")
    assert format_example(NO_CTX, tok, "plain")[0] == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"


def test_no_chat_template_is_a_clear_error(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(DataError, match="no chat template.*plain"):
        format_example(REC, t, "chat")


def test_long_context_is_truncated_first_and_counted(tok):
    long = Record(instruction="What year is named?", context=" ".join(["filler words here"] * 200) + " 1843.",
                  response="The year 1843 is named in the text.", category="qa")
    out = tokenize_records([long, NO_CTX], tok, CATS, "chat", max_length=96)
    assert out.truncated == 1 and out.response_truncated == 0 and out.dropped == 0
    ex = out.examples[0]
    assert len(ex["input_ids"]) <= 96
    full_response = tok(format_example(long, tok, "chat")[1], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][ex["prompt_len"]:] == full_response  # the response is whole
    prompt = tok.decode(ex["input_ids"][:ex["prompt_len"]])
    assert "What year is named?" in prompt and "filler" in prompt and "1843." not in prompt
    assert out.raw_lengths[0][0] > 96  # the untruncated length is kept for statistics


def test_long_response_keeps_a_quarter_and_is_counted(tok):
    long = Record(instruction=" ".join(["Explain"] * 150), context="", response=" ".join(["word"] * 300),
                  category="qa")
    out = tokenize_records([long], tok, CATS, "plain", max_length=64)
    ex = out.examples[0]
    assert out.truncated == 1 and out.response_truncated == 1
    assert len(ex["input_ids"]) == 64
    n_response = sum(x != -100 for x in ex["labels"])
    assert n_response == 64 - ex["prompt_len"] >= 16  # at least max_length // 4 response tokens
    assert ex["prompt_len"] >= 40  # the prompt still holds most of its budget


def test_no_room_for_a_response_is_dropped_and_counted(tok):
    out = tokenize_records([REC, NO_CTX], tok, CATS, "chat", max_length=20)  # chat frame alone is ~35 tokens
    assert out.dropped == 2 and out.examples == [] and out.records == []
    assert "category 'qa'" in out.dropped_where[0]
    with pytest.raises(DataError, match="all .* examples were dropped.*max_length"):
        build_datasets(DataConfig(max_length=20, synthetic_per_task=3), tok)


def test_generation_batch_left_pads_prompt_ids(tok):
    a, b = prompt_ids(REC, tok), prompt_ids(NO_CTX, tok)
    batch = generation_batch([a, b], tok)
    ids, am = batch["input_ids"], batch["attention_mask"]
    t = max(len(a), len(b))
    assert ids.shape == am.shape == (2, t)
    short = 1 if len(b) < len(a) else 0
    n = len([a, b][short])
    assert ids[short, t - n:].tolist() == [a, b][short] and am[short].tolist() == [0] * (t - n) + [1] * n
    assert (ids[short, :t - n] == tok.pad_token_id).all()
    assert batch["prompts"][0].startswith(tok.decode(a)[:20])
    from_records = generation_batch([REC, NO_CTX], tok, template="chat")
    assert from_records["input_ids"].tolist() == ids.tolist()
    assert from_records["prompts"][1] == format_example(NO_CTX, tok, "chat")[0]


def test_build_datasets_aligns_records_examples_and_reports(tok):
    cfg = DataConfig(synthetic_per_task=10, template="plain", seed=3)
    b = build_datasets(cfg, tok)
    assert b.categories == sorted(b.categories) and len(b.categories) >= 6
    for s in ("train", "validation", "test"):
        assert len(b.records[s]) == len(b.examples[s]) > 0
        for rec, ex in zip(b.records[s], b.examples[s]):
            assert b.categories[ex["task_id"]] == rec.category
            assert ex["input_ids"][:ex["prompt_len"]] == prompt_ids(rec, tok, cfg)
    r = b.report
    assert r["loaded"] == 10 * len(b.categories) and r["splits"] == {"train": 64, "validation": 8, "test": 8}
    assert r["per_category"]["train"] == {c: 8 for c in b.categories}
    assert "loaded 80 records" in r.summary() and "train 64" in r.summary()
    import json
    assert json.loads(json.dumps(r))["splits"]["test"] == 8  # the report is JSON as it is


def test_build_datasets_from_file_with_filter(tok, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "mini.jsonl"
    b = build_datasets(DataConfig(path=str(path), categories=["closed_qa", "classification"],
                                  val_fraction=0.25, test_fraction=0.25), tok)
    assert b.categories == ["classification", "closed_qa"]
    assert b.report["filtered"] == 4 and b.report["splits"] == {"train": 4, "validation": 2, "test": 2}
