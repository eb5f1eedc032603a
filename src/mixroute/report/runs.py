"""Read what a report shows from run directories: training runs (config.yaml, data_report.json, metrics.jsonl,
gates.json, eval.json, optional rounds.jsonl of a federated run) and pruned model directories (prune_report.json).

Nothing here needs matplotlib; a missing or unreadable file is recorded in ``RunInfo.missing`` with what it
would have shown and how to produce it, and the report renders what exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# file -> (what the report loses without it, how to get it)
RUN_FILES = {
    "config.yaml": ("config summary", "written by `mixroute train`"),
    "data_report.json": ("data split", "written by `mixroute train`"),
    "metrics.jsonl": ("training curves", "written by `mixroute train` as it runs"),
    "gates.json": ("gate heatmaps", "written by `mixroute train` at each validation"),
    "eval.json": ("comparison table, router accuracy, confusion matrix",
                  "run `mixroute eval {run}`"),
}
PRUNE_FILE = "prune_report.json"
ROUNDS_FILE = "rounds.jsonl"
# files whose change means the report is stale (``--watch``)
WATCHED = ("config.yaml", "data_report.json", "metrics.jsonl", "gates.json", "eval.json", ROUNDS_FILE, PRUNE_FILE)


class ReportError(ValueError):
    """A user error: a path that does not exist or is not a directory."""


@dataclass
class RunInfo:
    """One run directory as the report sees it; ``None`` / empty for what is missing."""

    name: str
    path: Path
    kind: str = "train"  # "train" or "pruned"
    config: Optional[dict[str, Any]] = None
    data_report: Optional[dict[str, Any]] = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    gates: Optional[dict[str, Any]] = None
    eval: Optional[dict[str, Any]] = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    prune: Optional[dict[str, Any]] = None
    missing: list[str] = field(default_factory=list)  # one human-readable line per problem

    @property
    def method(self) -> str:
        if self.kind == "pruned":
            return (self.prune or {}).get("method", "?")
        for src in (self.eval, (self.config or {}).get("train")):
            if src and src.get("method"):
                return str(src["method"])
        return "?"


def expand(paths: list[str | Path]) -> list[Path]:
    """Check every path exists and is a directory; a directory that is not itself a run but holds pruned model
    directories (``models/`` after several ``mixroute prune``) stands for those."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} does not exist; give run directories written by `mixroute train` or pruned "
                              "model directories written by `mixroute prune --out`")
        if not p.is_dir():
            raise ReportError(f"{p} is a file, not a run directory")
        known = any((p / f).exists() for f in WATCHED)
        children = sorted(c for c in p.iterdir() if (c / PRUNE_FILE).is_file())
        out.extend(children if not known and children else [p])
    return out


def load_run(path: str | Path) -> RunInfo:
    """Everything the report can read from one directory (no exception for missing or broken files)."""
    path = Path(path)
    info = RunInfo(name=path.resolve().name, path=path)
    if (path / PRUNE_FILE).is_file():
        info.kind = "pruned"
        info.prune = _read_json(path / PRUNE_FILE, info)
        return info
    import yaml

    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            info.config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            info.missing.append(f"config.yaml is not valid YAML ({e.__class__.__name__}): config summary skipped")
    info.data_report = _read_json(path / "data_report.json", info)
    info.gates = _read_json(path / "gates.json", info)
    info.eval = _read_json(path / "eval.json", info)
    for row in _read_jsonl(path / "metrics.jsonl", info):
        (info.eval_rows if "ppl" in row or "split" in row else info.train_rows).append(row)
    info.rounds = [r for r in _read_jsonl(path / ROUNDS_FILE, info) if "round" in r]
    for name, (loses, how) in RUN_FILES.items():
        if not (path / name).is_file():
            info.missing.append(f"{name} missing: no {loses} ({how.format(run=path)})")
    if info.train_rows and info.eval is None and not (path / "final").is_dir():
        info.missing.append("final/ missing: training has not finished (or was killed); resume with "
                            f"`mixroute train --resume {path}`")
    return info


def load_runs(paths: list[str | Path]) -> list[RunInfo]:
    return [load_run(p) for p in expand(paths)]


def _read_json(path: Path, info: RunInfo) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        info.missing.append(f"{path.name} is not valid JSON ({e}): skipped")
        return None
    if not isinstance(doc, dict):
        info.missing.append(f"{path.name} holds a {type(doc).__name__}, expected an object: skipped")
        return None
    return doc


def _read_jsonl(path: Path, info: RunInfo) -> list[dict[str, Any]]:
    """JSON lines; a broken last line is a write in progress (ignored), a broken line before it is reported."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines):
                bad.append(i)
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        info.missing.append(f"{path.name}: line(s) {', '.join(map(str, bad[:5]))} are not JSON: skipped")
    return rows


def watch_signature(paths: list[Path]) -> tuple:
    """(name, mtime, size) of every watched file: it changes when a report input changes."""
    sig = []
    for p in paths:
        for name in WATCHED:
            f = p / name
            try:
                st = f.stat()
            except OSError:
                continue
            sig.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(sig)
