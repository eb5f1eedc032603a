"""Read what a report shows from run directories (through ``mixroute.rundir``): training runs (config.yaml,
data_report.json, metrics.jsonl, gates.json, eval.json, optional rounds.jsonl of a federated run) and pruned
model directories (prune_report.json) and expert libraries (manifest.json, cost_curve.json).

Nothing here needs matplotlib; a missing or unreadable file is recorded in ``RunInfo.missing`` with what it
would have shown and how to produce it, and the report renders what exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mixroute import rundir
from mixroute.library.manifest import MANIFEST as LIBRARY_MANIFEST

# file -> (what the report loses without it, how to get it)
RUN_FILES = {
    rundir.CONFIG: ("config summary", "written by `mixroute train`"),
    rundir.DATA_REPORT: ("data split", "written by `mixroute train`"),
    rundir.METRICS: ("training curves", "written by `mixroute train` as it runs"),
    rundir.GATES: ("gate heatmaps", "written by `mixroute train` at each validation"),
    rundir.EVAL: ("comparison table, router accuracy, confusion matrix", "run `mixroute eval {run}`"),
}
COST_CURVE = "cost_curve.json"   # an expert library's quality-vs-cost curve (docs/library.md)
# files whose change means the report is stale (``--watch``)
WATCHED = (*RUN_FILES, rundir.ROUNDS, rundir.PRUNE_REPORT, LIBRARY_MANIFEST, COST_CURVE)


class ReportError(ValueError):
    """A user error: a path that does not exist or is not a directory."""


@dataclass
class RunInfo:
    """One run directory as the report sees it; ``None`` / empty for what is missing."""

    name: str
    path: Path
    kind: str = "train"  # "train", "pruned" or "library"
    config: Optional[dict[str, Any]] = None
    data_report: Optional[dict[str, Any]] = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    gates: Optional[dict[str, Any]] = None
    eval: Optional[dict[str, Any]] = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    partition: Optional[dict[str, Any]] = None      # federated: partition.json (clients x categories counts)
    client_gates: Optional[dict[str, Any]] = None   # federated: gates_clients.json (per client and round)
    prune: Optional[dict[str, Any]] = None
    library: Optional[dict[str, Any]] = None        # an expert library's manifest.json
    cost_curve: Optional[list[dict[str, Any]]] = None  # its cost_curve.json (mixroute library curve)
    missing: list[str] = field(default_factory=list)  # one human-readable line per problem

    @property
    def method(self) -> str:
        if self.kind == "pruned":
            return (self.prune or {}).get("method", "?")
        if self.kind == "library":
            return f"library ({(self.library or {}).get('router', '?')} router)"
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
        children = sorted(c for c in p.iterdir() if (c / rundir.PRUNE_REPORT).is_file())
        out.extend(children if not known and children else [p])
    return out


def read_run(path: str | Path) -> RunInfo:
    """Everything the report can read from one directory (no exception for missing or broken files)."""
    path = Path(path)
    info = RunInfo(name=path.resolve().name, path=path)
    if (path / rundir.PRUNE_REPORT).is_file():
        info.kind = "pruned"
        info.prune = rundir.read_json(path / rundir.PRUNE_REPORT, info.missing)
        return info
    if (path / LIBRARY_MANIFEST).is_file():
        info.kind = "library"
        info.library = rundir.read_json(path / LIBRARY_MANIFEST, info.missing)
        if (path / COST_CURVE).is_file():
            info.cost_curve = _read_curve(path / COST_CURVE, info.missing)
        else:
            info.missing.append(f"{COST_CURVE} missing: no quality-vs-cost curve (run `mixroute library curve "
                                f"{path} --data FILE`)")
        return info
    import yaml

    if rundir.is_run_dir(path):
        try:
            info.config = yaml.safe_load((path / rundir.CONFIG).read_text()) or {}
        except yaml.YAMLError as e:
            info.missing.append(f"{rundir.CONFIG} is not valid YAML ({e.__class__.__name__}): config summary "
                                "skipped")
    info.data_report = rundir.read_data_report(path, info.missing)
    info.gates = rundir.read_gates(path, info.missing)
    info.eval = rundir.read_eval(path, info.missing)
    for row in rundir.read_metrics(path, info.missing):
        (info.eval_rows if "ppl" in row or "split" in row else info.train_rows).append(row)
    info.rounds = rundir.read_rounds(path, info.missing)
    if info.rounds:
        info.partition = rundir.read_partition(path, info.missing)
        info.client_gates = rundir.read_client_gates(path, info.missing)
    for name, (loses, how) in RUN_FILES.items():
        if not (path / name).is_file():
            info.missing.append(f"{name} missing: no {loses} ({how.format(run=path)})")
    if info.train_rows and info.eval is None and not rundir.final_dir(path).is_dir():
        info.missing.append(f"{rundir.FINAL}/ missing: training has not finished (or was killed); resume with "
                            f"`mixroute train --resume {path}`")
    return info


def _read_curve(path: Path, problems: list[str]) -> Optional[list[dict[str, Any]]]:
    """cost_curve.json: a list of {"lambda", "ppl", "mean_cost", ...} rows (None, named in ``problems``, if not)."""
    import json

    try:
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and rows and all(isinstance(r, dict) and {"lambda", "ppl", "mean_cost"} <= set(r)
                                                   for r in rows):
            return rows
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    problems.append(f"{path.name} is not a list of lambda / ppl / mean_cost rows (as `mixroute library curve` "
                    "writes): curve skipped")
    return None


def read_runs(paths: list[str | Path]) -> list[RunInfo]:
    return [read_run(p) for p in expand(paths)]


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
