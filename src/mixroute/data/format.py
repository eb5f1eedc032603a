"""Templates, tokenisation, label masking and truncation.

An example is ``prompt tokens + completion tokens``. The prompt is the user turn rendered by the tokenizer's
chat template with ``add_generation_prompt=True`` (or the plain ``### Instruction`` template); the completion
is the rest of the rendered conversation: the response and the template's end-of-turn, ending with EOS.
Prompt and completion are tokenised separately and concatenated, so the prompt tokens are by construction a
prefix of the example, exactly the tokens a generation call sees; at the string level we check that the
template renders the prompt as a prefix of the full conversation (``DataError`` otherwise).

Labels are the completion tokens and -100 on the prompt, so the loss counts response tokens only.

Truncation to ``max_length`` (hand-written: no library truncates *inside* a chat template while keeping its
frame): the response keeps ``min(len, max(max_length - prompt, max_length // 4))`` tokens, i.e. at least a
quarter of ``max_length``; the prompt gets the rest by shortening the context text first, then the
instruction text, then re-rendering. An example whose response would keep zero tokens is dropped. Both are
counted (:class:`TokenizedRecords`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional, Sequence, TypedDict

from mixroute.data.records import FIELDS, DataError, Record

Template = Literal["chat", "plain"]


class Example(TypedDict):
    """One tokenised example (lists, not tensors: the collator pads a batch)."""

    input_ids: list[int]      # prompt + completion
    labels: list[int]         # -100 on the prompt, completion ids after it
    prompt_len: int           # number of prompt tokens at the start of input_ids
    task_id: int              # index of the record's category in the sorted category list


def user_message(record: Record) -> str:
    """The user turn: the instruction, then the context after a blank line when there is one."""
    ctx = record.context.strip()
    return record.instruction.strip() + (f"\n\n{ctx}" if ctx else "")


def as_record(record: Any) -> Record:
    """A Record from a Record or a Dolly-schema mapping (missing fields are empty)."""
    if isinstance(record, Record):
        return record
    return Record(**{f: str(record.get(f) or "") for f in FIELDS})


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_example(record: Record, tokenizer: Any, template: Template = "chat") -> tuple[str, str]:
    """(prompt text, completion text): prompt + completion is the full training text.

    ``chat``: the tokenizer's chat template (``add_generation_prompt=True`` for the prompt); the completion is
    what the template adds after the prompt for the assistant turn, cut after the EOS token.
    ``plain``: ``### Instruction:\\n...\\n\\n### Context:\\n...\\n\\n### Response:\\n`` + response (EOS is
    appended at tokenisation).
    """
    record = as_record(record)
    if template == "plain":
        ctx = record.context.strip()
        prompt = (f"### Instruction:\n{record.instruction.strip()}\n\n"
                  + (f"### Context:\n{ctx}\n\n" if ctx else "") + "### Response:\n")
        return prompt, record.response.strip()
    if template != "chat":
        raise DataError(f"unknown template {template!r}; expected 'chat' or 'plain'")
    if not _has_chat_template(tokenizer):
        raise DataError("the tokenizer has no chat template; use template 'plain' (data.template=plain)")
    user = [{"role": "user", "content": user_message(record)}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record.response.strip()}],
                                         tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the tokenizer's chat template does not render the prompt (add_generation_prompt=True) as "
                        "a prefix of the full conversation, so prompt tokens would not match training; use "
                        "template 'plain' (data.template=plain)")
    completion = full[len(prompt):]
    eos = tokenizer.eos_token
    if eos and eos in completion:  # drop what follows the end-of-turn (e.g. a trailing newline)
        completion = completion[:completion.rindex(eos) + len(eos)]
    return prompt, completion


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    return ids if ids and ids[-1] == eos else ids + [eos]


def fit_prompt(record: Record, tokenizer: Any, template: Template, budget: int,
               ids: Optional[list[int]] = None) -> Optional[list[int]]:
    """Prompt token ids of at most ``budget`` tokens, shortening the context first, then the instruction.

    ``ids`` are the record's untruncated prompt ids when already known. Returns None when even an empty
    context and instruction do not fit (the template's own tokens exceed the budget).
    """
    if ids is None:
        ids = _encode(tokenizer, [format_example(record, tokenizer, template)[0]])[0]
    for name in ("context", "instruction"):
        text = getattr(record, name)
        if len(ids) <= budget or not text:
            continue
        toks = _encode(tokenizer, [text])[0]
        keep = len(toks)
        for _ in range(8):  # each round cuts the field by the overshoot; a round or two settles boundary effects
            keep = max(0, keep - (len(ids) - budget) - 1)
            record = replace(record, **{name: tokenizer.decode(toks[:keep]) if keep else ""})
            ids = _encode(tokenizer, [format_example(record, tokenizer, template)[0]])[0]
            if len(ids) <= budget or keep == 0:
                break
    return ids if len(ids) <= budget else None


def min_response_tokens(max_length: int) -> int:
    """Response tokens an over-long example keeps at least (when its response is that long)."""
    return max(1, max_length // 4)


def prompt_ids(record: Record, tokenizer: Any, cfg: Any = None, template: Optional[Template] = None,
               max_length: Optional[int] = None) -> list[int]:
    """Prompt-only token ids for generation, truncated like training prompts (to ``max_length - max_length//4``).

    ``cfg`` is a DataConfig (its ``template`` and ``max_length`` are used); explicit keywords override it.
    """
    record = as_record(record)
    template = template or (cfg.template if cfg is not None else "chat")
    max_length = max_length if max_length is not None else (cfg.max_length if cfg is not None else None)
    if max_length is None:
        return _encode(tokenizer, [format_example(record, tokenizer, template)[0]])[0]
    ids = fit_prompt(record, tokenizer, template, max_length - min_response_tokens(max_length))
    if ids is None:
        raise DataError(f"max_length {max_length} is too small for the {template} template's own tokens")
    return ids


@dataclass
class TokenizedRecords:
    """Examples aligned with the records that were kept, plus the truncation accounting."""

    examples: list[Example]
    records: list[Record]
    truncated: int = 0                    # kept examples shortened to max_length (prompt and/or response)
    response_truncated: int = 0           # of those, examples whose response lost tokens (EOS included)
    dropped: int = 0                      # examples whose response would keep zero tokens
    dropped_where: list[str] = field(default_factory=list)
    raw_lengths: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) before truncation


def tokenize_records(records: Sequence[Record], tokenizer: Any, categories: Sequence[str],
                     template: Template = "chat", max_length: int = 256) -> TokenizedRecords:
    """Tokenise records into examples (see the module docstring for masking and truncation)."""
    cat_id = {c: i for i, c in enumerate(categories)}
    missing = sorted({r.category for r in records} - set(cat_id))
    if missing:
        raise DataError(f"categories {missing} are not in the category list {list(categories)}")
    pairs = [format_example(r, tokenizer, template) for r in records]
    prompts = _encode(tokenizer, [p for p, _ in pairs])  # one batched (fast, Rust) call per side
    completions = [_with_eos(c, tokenizer) for c in _encode(tokenizer, [c for _, c in pairs])]
    out = TokenizedRecords(examples=[], records=[])
    min_r = min_response_tokens(max_length)
    for i, (rec, p, c) in enumerate(zip(records, prompts, completions)):
        out.raw_lengths.append((len(p), len(c)))
        if len(p) + len(c) > max_length:
            r = min(len(c), max(max_length - len(p), min_r))
            if len(p) > max_length - r:
                p = fit_prompt(rec, tokenizer, template, max_length - r, p) or \
                    fit_prompt(rec, tokenizer, template, max_length - 1, p) or []
                r = max_length - len(p) if p else 0
            if r <= 0:
                out.dropped += 1
                if len(out.dropped_where) < 5:
                    out.dropped_where.append(f"record {i} (category {rec.category!r})")
                continue
            out.truncated += 1
            out.response_truncated += r < len(c)
            c = c[:r]
        out.examples.append(Example(input_ids=p + c, labels=[-100] * len(p) + c, prompt_len=len(p),
                                    task_id=cat_id[rec.category]))
        out.records.append(rec)
    return out
