"""Load and validate instruction records: JSONL, JSON (a list), CSV, Parquet, a ``datasets.Dataset`` or a list
of dicts, in the Dolly schema (instruction, context, response, category) or any schema via a column mapping.

Every problem a user can cause raises :class:`DataError` naming the file, the line (JSONL) or row/item, the
field and what was found. Nothing is dropped silently: records removed by the category filter or the
per-category cap, and records skipped because their instruction or response is blank, are counted on the
returned :class:`RecordSet`.

JSONL is read line by line with the ``json`` module (not pandas/datasets) because only that way can a
malformed line be reported with its line number. CSV and Parquet go through pandas/pyarrow.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

FIELDS = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response", "category")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad input data; the message names the file, line/row, field and what would be valid."""


@dataclass(frozen=True)
class Record:
    """One instruction example. ``context`` may be empty. Supports ``rec["field"]`` and ``rec.get(...)``."""

    instruction: str
    response: str
    category: str
    context: str = ""

    def __getitem__(self, key: str) -> str:
        if key not in FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in FIELDS else default

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class RecordSet:
    """Loaded records plus the accounting of what was left out (all counts, nothing silent)."""

    records: list[Record]
    source: str
    loaded: int = 0                 # records read and validated
    skipped: int = 0                # blank instruction or response
    skipped_where: list[str] = field(default_factory=list)   # first few locations of skipped records
    filtered: int = 0               # removed by the category filter
    capped: int = 0                 # removed by max_per_category

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    @property
    def categories(self) -> list[str]:
        """Sorted category names; a category's id is its index here."""
        return sorted({r.category for r in self.records})

    def counts(self) -> dict[str, int]:
        """Records per category, sorted by name."""
        c = Counter(r.category for r in self.records)
        return {k: c[k] for k in sorted(c)}


Source = Union[str, Path, Sequence[Mapping[str, Any]], Any]  # Any: a datasets.Dataset


def _check_columns(columns: Optional[Mapping[str, str]]) -> dict[str, str]:
    """Our field -> the source's column name, validated."""
    columns = dict(columns or {})
    bad = [k for k in columns if k not in FIELDS]
    if bad:
        raise DataError(f"column mapping: unknown field(s) {', '.join(map(repr, bad))}; the mapping goes from our "
                        f"fields ({', '.join(FIELDS)}) to your column names, e.g. instruction=prompt")
    return {f: str(columns.get(f, f)) for f in FIELDS}


def _convert(row: Any, where: str, cols: dict[str, str]) -> Record:
    """Validate one raw row (a mapping) into a Record; ``where`` is e.g. 'data.jsonl:12'."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields {', '.join(cols[f] for f in REQUIRED)}, "
                        f"found {type(row).__name__}")
    missing = [f for f in REQUIRED if cols[f] not in row]
    if missing:
        names = ", ".join(repr(cols[f]) + ("" if cols[f] == f else f" (for {f})") for f in missing)
        found = ", ".join(map(repr, row.keys())) or "none"
        raise DataError(f"{where}: missing field(s) {names}; found fields: {found}. "
                        "Map other column names with a column mapping, e.g. --columns instruction=prompt")
    values = {}
    for f in FIELDS:
        v = row.get(cols[f], "")
        if v is None and f == "context":
            v = ""
        if not isinstance(v, str):
            raise DataError(f"{where}: field {cols[f]!r} must be a string, found {type(v).__name__} "
                            f"({str(v)[:40]!r})")
        values[f] = v
    return Record(**values)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:  # bytes, so that a bad encoding is reported with its line number too
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSONL, one object per line), "
                        f"found {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} item {i}", row


def _read_table(path: Path) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    try:
        if path.suffix == ".csv":  # strings stay strings; empty cells are "" (not NaN)
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types for unreadable files
        raise DataError(f"{path}: cannot read {path.suffix[1:]} file: {e}") from None
    # CSV: header is line 1, so row i is line i + 2 (unless a quoted field spans lines)
    label = "line" if path.suffix == ".csv" else "row"
    offset = 2 if path.suffix == ".csv" else 0
    for i, row in enumerate(df.to_dict(orient="records")):
        yield f"{path} {label} {i + offset}", {k: (None if _is_nan(v) else v) for k, v in row.items()}


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and v != v


def _read_path(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        hint = ""
        if "dolly" in path.name.lower():
            hint = (" (Dolly-15k: the Hugging Face dataset databricks/databricks-dolly-15k, whose file "
                    "databricks-dolly-15k.jsonl data.path= takes as it is)")
        raise DataError(f"{path}: file not found{hint}; point data.path= at your file, or data.path=null for "
                        "the built-in synthetic suite")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; expected one of "
                        f"{', '.join(SUFFIXES)}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    return _read_table(path)


def _rows(source: Source) -> tuple[str, Iterable[tuple[str, Any]]]:
    """(source name, iterator of (location, raw row))."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        return str(path), _read_path(path)
    if hasattr(source, "column_names") and hasattr(source, "to_list"):  # datasets.Dataset, no import needed
        return "dataset", ((f"dataset row {i}", r) for i, r in enumerate(source.to_list()))
    if isinstance(source, Sequence):
        return "records", ((f"records item {i}", r) for i, r in enumerate(source))
    raise DataError(f"cannot load records from a {type(source).__name__}; pass a file path, a datasets.Dataset "
                    "or a list of dicts")


def stable_key(record: Record, salt: str) -> str:
    """A seeded, input-order-independent sort key for a record (used for sampling and splitting)."""
    text = "\x1f".join((salt, record.category, record.instruction, record.context, record.response))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def load_records(source: Source, columns: Optional[Mapping[str, str]] = None,
                 categories: Optional[Sequence[str]] = None, max_per_category: Optional[int] = None,
                 seed: int = 0) -> RecordSet:
    """Load and validate records.

    Args:
        source: a .jsonl/.json/.csv/.parquet path, a ``datasets.Dataset``, or a list of dicts (or Records).
        columns: our field -> your column name, e.g. ``{"instruction": "prompt", "response": "completion",
            "category": "task"}``. Unmapped fields use their own name; ``context`` may be absent.
        categories: keep only these categories (each must exist in the data).
        max_per_category: keep at most this many records per category (a seeded sample).
        seed: seed of that sample.

    Raises:
        DataError: malformed line, missing or non-string field, no records, a filter matching nothing.
    """
    cols = _check_columns(columns)
    name, rows = _rows(source)
    recs: list[Record] = []
    out = RecordSet(records=recs, source=name)
    for where, row in rows:
        rec = row if isinstance(row, Record) else _convert(row, where, cols)
        out.loaded += 1
        if not rec.instruction.strip() or not rec.response.strip():
            out.skipped += 1
            if len(out.skipped_where) < 5:
                out.skipped_where.append(where)
            continue
        recs.append(rec)
    if out.loaded == 0:
        raise DataError(f"{name}: no records (the data set is empty)")
    if not recs:
        raise DataError(f"{name}: all {out.loaded} records have a blank instruction or response")
    if categories is not None:
        present = Counter(r.category for r in recs)
        unknown = [c for c in categories if c not in present]
        if unknown:
            have = ", ".join(f"{c} ({present[c]})" for c in sorted(present))
            raise DataError(f"{name}: category filter {list(categories)} names categories not in the data: "
                            f"{', '.join(map(repr, unknown))}; categories present: {have}")
        keep = set(categories)
        out.records = recs = [r for r in recs if r.category in keep]
        out.filtered = sum(present.values()) - len(recs)
        if not recs:
            raise DataError(f"{name}: the category filter is empty; categories present: "
                            f"{', '.join(f'{c} ({present[c]})' for c in sorted(present))}")
    if max_per_category is not None:
        if max_per_category < 1:
            raise DataError(f"max_per_category must be >= 1, got {max_per_category}")
        by_cat: dict[str, list[Record]] = {}
        for r in recs:
            by_cat.setdefault(r.category, []).append(r)
        kept: set[int] = set()
        for group in by_cat.values():
            chosen = sorted(group, key=lambda r: stable_key(r, f"cap-{seed}"))[:max_per_category]
            kept.update(map(id, chosen))
        out.records = [r for r in recs if id(r) in kept]  # input order kept
        out.capped = len(recs) - len(out.records)
    return out
