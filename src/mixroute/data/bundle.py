"""``build_datasets(cfg, tokenizer)``: the one entry point the trainer, evaluator and pruner call.

config -> records (loaded and validated, or the synthetic suite) -> stratified split -> tokenised examples,
with a report of everything that was skipped, filtered, capped, truncated or dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from mixroute.data.format import Example, tokenize_records
from mixroute.data.records import DataError, Record, RecordSet, load_records
from mixroute.data.split import SPLITS, split_records
from mixroute.data.synthetic import synthetic_suite


class DataReport(dict):
    """What happened to the data, as a JSON-ready dict (written to the run directory) with :meth:`summary`.

    Keys: source, template, max_length, categories, loaded, skipped, skipped_where, filtered, capped,
    truncated, response_truncated, dropped, dropped_where, splits ({split: n}), per_category
    ({split: {category: n}}). A dict subclass so ``json.dumps`` writes it as it is.
    """

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"data: {self['source']} ({self['template']} template, max_length {self['max_length']})",
                 f"  loaded {self['loaded']:,} records; skipped {self['skipped']} (blank instruction or response)"
                 f"; filtered {self['filtered']} (category filter); capped {self['capped']} (max_per_category)",
                 f"  truncated {self['truncated']} examples ({self['response_truncated']} lost response tokens); "
                 f"dropped {self['dropped']} (no room for any response token)"]
        if self["skipped_where"]:
            lines.append(f"  skipped e.g. at {', '.join(self['skipped_where'])}")
        if self["dropped_where"]:
            lines.append(f"  dropped e.g. {', '.join(self['dropped_where'])}")
        lines.append("  " + ", ".join(f"{s} {n:,}" for s, n in self["splits"].items()))
        width = max(len(c) for c in self["categories"])
        for c in self["categories"]:
            counts = "  ".join(f"{self['per_category'][s].get(c, 0):>6,}" for s in SPLITS)
            lines.append(f"    {c:<{width}}  {counts}")
        return "\n".join(lines)


@dataclass
class DataBundle:
    """Records and tokenised examples per split (``"train"``, ``"validation"``, ``"test"``); records[s][i] is
    the record of examples[s][i]. A category's id is its index in ``categories``."""

    categories: list[str]
    records: dict[str, list[Record]]
    examples: dict[str, list[Example]]
    report: DataReport


def load_config_records(cfg: Any) -> RecordSet:
    """The records a DataConfig names: its file (with columns, filter, cap) or the synthetic suite."""
    source: Any = cfg.path
    if source is None:
        source = synthetic_suite(per_task=cfg.synthetic_per_task, seed=cfg.seed, suite=cfg.synthetic_suite)
    rs = load_records(source, columns=cfg.columns if cfg.path is not None else None, categories=cfg.categories,
                      max_per_category=cfg.max_per_category, seed=cfg.seed)
    if cfg.path is None:
        rs.source = (f"built-in synthetic suite {cfg.synthetic_suite!r} ({cfg.synthetic_per_task} per task, seed "
                     f"{cfg.seed})")
    return rs


def build_datasets(cfg: Any, tokenizer: Any) -> DataBundle:
    """Load (or generate), split and tokenise the data a :class:`mixroute.config.DataConfig` describes.

    Raises:
        DataError: bad input (see :func:`load_records`), or every example dropped by ``max_length``.
    """
    rs = load_config_records(cfg)
    categories = rs.categories
    splits = split_records(rs.records, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    report = DataReport(source=rs.source, template=cfg.template, max_length=cfg.max_length, categories=categories,
                        loaded=rs.loaded, skipped=rs.skipped, skipped_where=rs.skipped_where, filtered=rs.filtered,
                        capped=rs.capped, truncated=0, response_truncated=0, dropped=0, dropped_where=[])
    records: dict[str, list[Record]] = {}
    examples: dict[str, list[Example]] = {}
    for s in SPLITS:
        tok = tokenize_records(splits[s], tokenizer, categories, cfg.template, cfg.max_length)
        records[s], examples[s] = tok.records, tok.examples
        for key in ("truncated", "response_truncated", "dropped"):
            report[key] += getattr(tok, key)
        report["dropped_where"] += [f"{s} {w}" for w in tok.dropped_where][:5 - len(report["dropped_where"])]
    if not any(examples.values()):
        raise DataError(f"{rs.source}: all {len(rs)} examples were dropped: max_length {cfg.max_length} leaves no "
                        f"room for a response after the {cfg.template} template's prompt; raise data.max_length")
    report["splits"] = {s: len(examples[s]) for s in SPLITS}
    report["per_category"] = {s: {c: n for c, n in sorted(Counter(r.category for r in records[s]).items())}
                              for s in SPLITS}
    return DataBundle(categories=categories, records=records, examples=examples, report=report)
