"""The run directory (docs/architecture.md, "Run directory"): the names of its files, reading and writing them,
and ``load_run``. Every command reads and writes run directories through this module.

    RUN_DIR/config.yaml  metrics.jsonl  data_report.json  gates.json  eval.json  rounds.jsonl  tb/
            checkpoints/step-N/  stage1/<category>/  final/

Writes are atomic (a whole file replaced at once) except metrics.jsonl, which grows one line per write: a
reader treats a broken last line as a write in progress. Importing this module is light (no torch): the model,
data and mixture are imported by ``load_run`` only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mixroute.config import ConfigError, ModelConfig, RunConfig, load_config, save_config
from mixroute.fileio import atomic_write_text

if TYPE_CHECKING:
    from torch import nn

    from mixroute.data import RunData

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
DATA_REPORT = "data_report.json"
GATES = "gates.json"
EVAL = "eval.json"
ROUNDS = "rounds.jsonl"            # one line per federated round (docs/report.md)
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
STAGE1 = "stage1"
FINAL = "final"
PARTITION = "partition.json"        # federated: clients x categories counts of the train split
FEDERATED = "federated"              # federated: global/ (the last completed round's state), state.json
CLIENT_GATES = "gates_clients.json"  # federated: gate matrix per client on its own data
CLIENT_EVAL = "eval_clients.json"    # federated, personal routers: each client's own router on its test share
PRUNE_REPORT = "prune_report.json"  # the report of a pruned model directory (mixroute prune --out)


class RunDirError(ValueError):
    """A run-directory file that exists but cannot be read; the message names it."""


# ------------------------------------------------------------------ paths
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step}"


def stage1_dir(run_dir: str | Path, category: str) -> Path:
    """Where stage 1 exports the LoRA of ``category`` (a PEFT adapter directory)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in category)
    return Path(run_dir) / STAGE1 / safe


def finished_stage1(run_dir: str | Path) -> list[Path]:
    """The stage-1 LoRAs exported so far (a killed run keeps them; a resumed one reuses them). Export writes
    each directory atomically, so its adapter_config.json marks it finished."""
    return sorted(p.parent for p in (Path(run_dir) / STAGE1).glob("*/adapter_config.json"))


def final_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


# ------------------------------------------------------------------ config
def read_config(run_dir: str | Path) -> RunConfig:
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG})")
    return load_config(Path(run_dir) / CONFIG)


def recorded_config(cfg: RunConfig, used_only: bool = False) -> RunConfig:
    """``cfg`` as a run directory records it (``methods.recorded_mixture``; ``used_only``: as two runs are
    compared)."""
    from mixroute.methods import recorded_mixture

    return dataclasses.replace(cfg, mixture=recorded_mixture(cfg, used_only))


def write_config(run_dir: str | Path, cfg: RunConfig) -> None:
    save_config(recorded_config(cfg), Path(run_dir) / CONFIG)


# ------------------------------------------------------------------ JSON files
def read_json(path: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``, None when there is no such file. A file that is not a JSON object raises
    RunDirError, or with ``problems`` is recorded there (one line) and read as None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise RunDirError(f"{path.name} holds a {type(doc).__name__}, expected an object")
    except (json.JSONDecodeError, UnicodeDecodeError, RunDirError) as e:
        msg = str(e) if isinstance(e, RunDirError) else f"{path.name} is not valid JSON ({e})"
        if problems is None:
            raise RunDirError(f"{path.parent}/{msg}") from None
        problems.append(f"{msg}: skipped")
        return None
    return doc


def read_jsonl(path: str | Path, problems: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] when there is none). A broken last line is a write in progress
    and is skipped; broken lines before it are skipped and named in ``problems``."""
    path = Path(path)
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
    if bad and problems is not None:
        problems.append(f"{path.name}: line(s) {', '.join(map(str, bad[:5]))} are not JSON: skipped")
    return rows


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# ------------------------------------------------------------------ metrics.jsonl
def read_metrics(run_dir: str | Path, problems: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Train lines ({"step", "loss", ...}) and eval lines ({"step", "split", "ppl", ...}) in written order."""
    return read_jsonl(Path(run_dir) / METRICS, problems)


def append_metrics(run_dir: str | Path, row: dict[str, Any]) -> None:
    # one write call per line: a reader sees whole lines, or a broken last one it skips
    with (Path(run_dir) / METRICS).open("a") as fh:
        fh.write(json.dumps(_finite(row)) + "\n")


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop metrics lines and gate snapshots past ``step`` (a resumed run redoes them)."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS).is_file():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in keep))
    doc = read_gates(run_dir)
    if doc is not None:
        doc["snapshots"] = [s for s in doc.get("snapshots", []) if s.get("step", 0) <= step]
        atomic_write_text(run_dir / GATES, json.dumps(doc))


# ------------------------------------------------------------------ gates.json, eval.json, data_report.json
def read_gates(run_dir: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / GATES, problems)


def add_gate_snapshot(run_dir: str | Path, categories: list[str], num_experts: int, level: str,
                      snapshot: dict[str, Any]) -> None:
    """Append a snapshot ({"stage", "step", "weights", "layers"?}) to gates.json; a file written for another
    number of experts (stage 1's single LoRAs) is started afresh."""
    doc = read_gates(run_dir) or {}
    if doc.get("num_experts") != num_experts:
        doc = {}
    doc.update(categories=list(categories), num_experts=num_experts, level=level)
    doc.setdefault("snapshots", []).append(snapshot)
    atomic_write_text(Path(run_dir) / GATES, json.dumps(doc))


def read_eval(run_dir: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / EVAL, problems)


def write_eval(run_dir: str | Path, result: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / EVAL, json.dumps(result, indent=2))


def read_data_report(run_dir: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / DATA_REPORT, problems)


def write_data_report(run_dir: str | Path, report: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / DATA_REPORT, json.dumps(report, indent=2, default=str))


def read_rounds(run_dir: str | Path, problems: Optional[list[str]] = None) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(Path(run_dir) / ROUNDS, problems) if "round" in r]


def append_round(run_dir: str | Path, row: dict[str, Any]) -> None:
    """One line of rounds.jsonl (docs/report.md); one write call per line."""
    with (Path(run_dir) / ROUNDS).open("a") as fh:
        fh.write(json.dumps(_finite(row)) + "\n")


def truncate_rounds(run_dir: str | Path, last_round: int) -> None:
    """Drop rounds.jsonl lines past ``last_round`` (a resumed federated run redoes them)."""
    path = Path(run_dir) / ROUNDS
    if path.is_file():
        keep = [r for r in read_rounds(run_dir) if r["round"] <= last_round]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_partition(run_dir: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """{"scheme", "categories", "clients", "counts": clients x categories}."""
    return read_json(Path(run_dir) / PARTITION, problems)


def write_partition(run_dir: str | Path, table: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / PARTITION, json.dumps(table, indent=2))


def federated_dir(run_dir: str | Path) -> Path:
    """The server's checkpoint: ``global/`` (mixture.safetensors + mixture.json) and ``state.json``."""
    return Path(run_dir) / FEDERATED


def read_client_gates(run_dir: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / CLIENT_GATES, problems)


def write_client_gates(run_dir: str | Path, doc: dict[str, Any]) -> None:
    """{"categories", "num_experts", "clients": {"client k": {"stage": [[...]]}}}."""
    atomic_write_text(Path(run_dir) / CLIENT_GATES, json.dumps(doc))


def read_client_eval(run_dir: str | Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / CLIENT_EVAL, problems)


def write_client_eval(run_dir: str | Path, doc: dict[str, Any]) -> None:
    """{"split", "clients": {"client k": {"examples", "own_router": ppl dict, "global_router": ppl dict}}}."""
    atomic_write_text(Path(run_dir) / CLIENT_EVAL, json.dumps(doc, indent=2))


# ------------------------------------------------------------------ a loaded run
@dataclass
class Run:
    """A loaded run directory: config, frozen model, tokenizer, trained mixture (None for ``base``), data."""

    cfg: RunConfig
    model: "nn.Module"
    tok: Any
    mix: Optional["nn.Module"]
    data: "RunData"


def load_model(cfg: ModelConfig, device: Any = "cpu") -> tuple["nn.Module", Any]:
    """The frozen base model a run's config names."""
    import torch

    from mixroute.models import load_base_model

    return load_base_model(cfg.name, dtype=getattr(torch, cfg.dtype), device=device)


def open_run(cfg: RunConfig, device: Any = "cpu") -> tuple["nn.Module", Any, "RunData", Any]:
    """What every use of a run config starts from (central training, federated clients and server, loading a
    finished run): the frozen base model on ``device``, its tokenizer, the run's data, and the method's
    ``MixtureConfig`` (None for ``base``). Raises ConfigError before anything is written."""
    from mixroute.data import RunData
    from mixroute.methods import mixture_config

    model, tok = load_model(cfg.model, device)
    data = RunData.build(cfg, tok)
    return model, tok, data, mixture_config(cfg, len(data.categories))


def load_run(run_dir: str | Path, device: Any = "auto") -> Run:
    """Load ``run_dir``'s config, base model, data and final mixture (for eval / generate) onto ``device``
    (``auto``: CUDA when available, else CPU; not the device the run was trained on)."""
    from mixroute.devices import resolve_device
    from mixroute.mixture import Mixture

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model, tok, data, mcfg = open_run(cfg, resolve_device(device))
    mix = None
    if mcfg is not None:
        if not final_dir(run_dir).is_dir():
            raise ConfigError(f"{run_dir} has no {FINAL}/ mixture: training did not finish (resume it with "
                              f"`mixroute train --resume {run_dir}`)")
        mix = Mixture.load(model, str(final_dir(run_dir)))
        mix.eval()
    return Run(cfg, model, tok, mix, data)
