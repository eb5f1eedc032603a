"""What the library reads from users: example prompts (centroid prototypes) and labelled records (fit-router,
calibrate), tokenised with the library's own prompt template; and a small progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mixroute.data import Collator, Record, load_records, make_batches, prompt_ids, tokenize_records
from mixroute.library.manifest import LibraryError, Manifest
from mixroute.progress import steps

Examples = Union[str, Path, Sequence[str], Sequence[Record]]


def read_prompts(examples: Examples, man: Manifest, tok: Any) -> list[list[int]]:
    """Prompt token ids from a .txt file (one prompt per line), a records file (Dolly schema: instruction and
    context are used), or a list of strings / Records."""
    if isinstance(examples, (str, Path)):
        path = Path(examples)
        if not path.is_file():
            raise LibraryError(f"examples file {path} does not exist")
        if path.suffix == ".txt":
            items: list = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        else:
            items = list(load_records(str(path)).records)
    else:
        items = list(examples)
    if not items:
        raise LibraryError(f"no example prompts in {examples if isinstance(examples, (str, Path)) else 'the list'}")
    recs = [Record(instruction=x, response="", category="") if isinstance(x, str) else x for x in items]
    return [prompt_ids(r, tok, template=man.template, max_length=man.max_length) for r in recs]


def labelled_batches(path: str | Path, man: Manifest, tok: Any, batch_size: int, need_labels: bool,
                     max_examples: Optional[int] = None) -> tuple[list[dict], list[str]]:
    """Batches (the collator's dict) of a records file. With ``need_labels`` each record's ``category`` must
    name an expert (task_ids = expert index) and every expert needs examples."""
    recs = list(load_records(str(path)).records)[: max_examples or None]
    names = man.names()
    if need_labels:
        unknown = sorted({r.category for r in recs} - set(names))
        if unknown:
            raise LibraryError(f"{path}: category {unknown[0]!r} is not an expert of this library; each record's "
                               f"category must be one of {', '.join(names)}")
        missing = [n for n in names if n not in {r.category for r in recs}]
        if missing:
            raise LibraryError(f"{path}: no records for expert(s) {', '.join(missing)}: the task router needs "
                               "examples of every expert")
        cats = names
    else:
        cats = sorted({r.category for r in recs})
    tr = tokenize_records(recs, tok, cats, template=man.template, max_length=man.max_length)
    return list(make_batches(tr.examples, Collator(tok), batch_size)), cats


def progress(label: str, total: int, enabled: bool = True):
    """The project's progress bar (``advance()``), gone once done: library steps are short and many."""
    return steps(label, total, enabled, transient=True)
