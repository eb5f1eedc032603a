"""The library directory and its ``manifest.json``: what is in it, how it is checked, how it is written.

    LIB/manifest.json                     format, version, base model, settings, experts, router state files
    LIB/experts/<name>/adapter_config.json, adapter_model.safetensors   a PEFT LoRA adapter, as given
    LIB/experts/<name>/centroid.safetensors   mean pooled prompt features per decoder layer (when examples given),
                                              with the expert applied below and of the frozen base
    LIB/router/task-<hash>.safetensors        a fitted task router (per router key), + experts it was fitted on
    LIB/router/calibration-<hash>.safetensors a fitted per-expert loss estimate (library calibrate)
    LIB/router/task-global-<hash>..., calibration-global-<hash>...   the same for global routing (--scope global)

The manifest is the commit point: files it will name are written first (atomically, router state under a
content-derived name), then the manifest replaces the old one, then files it no longer names are deleted. A
reader therefore sees the old library or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from mixroute.fileio import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "mixroute.library"
VERSION = 1
EXPERTS = "experts"
ROUTER = "router"
CENTROID = "centroid.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


SCOPES = ("layer", "global")


def state_kind(kind: str, scope: str) -> str:
    """The router_state key of ``kind`` (task, calibration) fitted for ``scope``: per-layer state and global
    state read different features (the experts applied below, or the frozen base) and are kept apart."""
    return kind if scope == "layer" else f"{kind}-{scope}"


class LibraryError(ValueError):
    """A library or adapter the user gave that cannot be used; the message names the file, expert or field."""


@dataclass
class Expert:
    name: str
    kind: str = "lora"
    path: str = ""               # relative to the library directory
    cost: float = 0.0            # any user number: rank (the default), latency, price
    checksum: str = ""           # sha256 over the adapter files
    description: str = ""
    rank: int = 0
    examples: int = 0            # prompts behind its centroid prototype (0 = none: centroid cannot route it)


@dataclass
class Manifest:
    base: dict                   # {"model": name or path or null, "dtype", "fingerprint": {...}}
    template: str = "chat"       # prompt template of the experts' training data (chat or plain)
    max_length: int = 256
    max_rank: int = 64           # adapters above this rank are refused
    router: str = "centroid"     # default router: centroid, arrow or task
    router_layer: Optional[int] = None   # the layer global routers read (null: the middle layer)
    experts: list[Expert] = field(default_factory=list)
    # "task" / "calibration" (per-layer routing), "task-global" / "calibration-global" (one decision per
    # sequence from the frozen base): {"file", "experts": [names], ...}
    router_state: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise LibraryError(f"no expert {name!r} in this library; experts: {', '.join(self.names()) or '(none)'}")


def read_manifest(lib: str | Path) -> Manifest:
    """The manifest of library ``lib``; a missing or malformed one is a LibraryError naming the field."""
    path = Path(lib) / MANIFEST
    if not path.is_file():
        raise LibraryError(f"{lib} is not an expert library (no {MANIFEST}); create one with "
                           f"`mixroute library create {lib} --from RUN_DIR`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LibraryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise LibraryError(f"{path}: format must be {FORMAT!r}, got {got!r}")
    if doc.get("version") != VERSION:
        raise LibraryError(f"{path}: version {doc.get('version')!r} is not supported (this mixroute reads {VERSION})")
    try:
        experts = [Expert(**e) for e in doc.pop("experts", [])]
        body = {k: v for k, v in doc.items() if k not in ("format", "version")}
        return Manifest(experts=experts, **body)
    except TypeError as e:
        raise LibraryError(f"{path}: unexpected or missing field ({e})") from None


def write_manifest(lib: str | Path, man: Manifest) -> None:
    doc = {"format": FORMAT, "version": VERSION, **asdict(man)}
    atomic_write_text(Path(lib) / MANIFEST, json.dumps(doc, indent=2) + "\n")


def check_name(name: str, man: Optional[Manifest] = None) -> None:
    if not NAME_RE.match(name):
        raise LibraryError(f"expert name {name!r} is not valid: use 1-64 letters, digits, '_', '-', '.', starting "
                           "with a letter or digit")
    if man is not None and name in man.names():
        raise LibraryError(f"expert {name!r} is already in the library; remove it first "
                           f"(`mixroute library remove LIB {name}`) or choose another name")


def checksum(directory: str | Path) -> str:
    """sha256 over the adapter files of an expert directory (names and bytes, in a fixed order)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode())
        h.update((Path(directory) / name).read_bytes())
    return "sha256:" + h.hexdigest()


def verify(lib: str | Path, expert: Expert) -> None:
    """The expert's files are there and match the manifest's checksum."""
    d = Path(lib) / expert.path
    missing = [n for n in ADAPTER_FILES if not (d / n).is_file()]
    if missing:
        raise LibraryError(f"expert {expert.name!r}: {d} lacks {', '.join(missing)}")
    got = checksum(d)
    if got != expert.checksum:
        raise LibraryError(f"expert {expert.name!r}: checksum mismatch in {d} (manifest {expert.checksum[:19]}..., "
                           f"files {got[:19]}...): the adapter changed after it was added; remove and add it again")


def content_name(stem: str, payload: bytes) -> str:
    return f"{stem}-{hashlib.sha256(payload).hexdigest()[:12]}.safetensors"


def peft_settings(adapter_dir: str | Path, name: str, max_rank: int) -> dict[str, Any]:
    """{r, lora_alpha, targets, use_dora} of a PEFT LoRA or DoRA adapter that a library can hold; anything else
    is a LibraryError naming the expert and the field (rsLoRA, trained biases, modules_to_save, rank patterns,
    rank above ``max_rank``, not LoRA)."""
    path = Path(adapter_dir)
    missing = [n for n in ADAPTER_FILES if not (path / n).is_file()]
    if missing:
        raise LibraryError(f"expert {name!r}: {path} is not a PEFT adapter directory (missing {', '.join(missing)}; "
                           "PeftModel.save_pretrained writes both)")
    try:
        conf = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise LibraryError(f"expert {name!r}: {path}/adapter_config.json is not valid JSON ({e})") from None
    where = f"expert {name!r} ({path}/adapter_config.json)"
    if conf.get("peft_type") != "LORA":
        raise LibraryError(f"{where}: peft_type {conf.get('peft_type')!r}; only LORA adapters can join a library")
    if conf.get("use_rslora"):
        raise LibraryError(f"{where}: use_rslora=true is not supported; train a plain LoRA")
    if conf.get("bias", "none") != "none":
        raise LibraryError(f"{where}: bias={conf.get('bias')!r} trains base biases, which a shared base cannot "
                           "hold per expert; valid: bias='none'")
    if conf.get("modules_to_save"):
        raise LibraryError(f"{where}: modules_to_save={conf['modules_to_save']} replaces whole base modules, which "
                           "a shared base cannot hold per expert; valid: none")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise LibraryError(f"{where}: per-module rank_pattern/alpha_pattern is not supported")
    r = conf.get("r")
    if not isinstance(r, int) or r < 1:
        raise LibraryError(f"{where}: r={r!r} is not a positive integer")
    if r > max_rank:
        raise LibraryError(f"{where}: rank r={r} is above this library's max_rank={max_rank}; raise it with "
                           "`mixroute library create ... --max-rank N` or use a smaller adapter")
    targets = conf.get("target_modules") or []
    targets = sorted([targets] if isinstance(targets, str) else targets)
    return {"r": r, "lora_alpha": float(conf.get("lora_alpha", r)), "targets": targets,
            "use_dora": bool(conf.get("use_dora"))}
