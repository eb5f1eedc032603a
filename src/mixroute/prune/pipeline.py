"""The `mixroute prune` story: load a model and a data source, measure perplexity, prune, measure, save.

Calibration follows the SparseGPT / Wanda recipe (fixed-length token windows from a corpus) adapted to
instruction data: the tokenised train examples of the data source (prompt + response, in a seeded random
order) are concatenated and cut into ``calib_samples`` windows of ``calib_seq_len`` tokens. Perplexity is
``mixroute.evaluate``'s (token-weighted over the response tokens) on the validation split, before and after
pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mixroute.devices import resolve_device
from mixroute.evaluate import held_out_pass, perplexity
from mixroute.fileio import atomic_dir
from mixroute.models import load_base_model
from mixroute.prune.api import PruneReport, check_method, prune_model, prune_targets
from mixroute.prune.masks import PatternLike, PruneError, check_nm_width, resolve_target
from mixroute.rundir import PRUNE_REPORT


@dataclass
class PruneData:
    """Calibration windows and validation batches of one data source."""

    source: str
    calib: list[dict[str, Tensor]]
    validation: list[dict[str, Tensor]]
    validation_examples: int


def check_out_dir(out: str | Path, force: bool) -> Path:
    """--out must not be a file, nor a non-empty directory unless ``force``."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PruneError(f"--out {out} exists and is not empty; pass --force to replace it or choose a new directory")
    return out


def pack_windows(token_lists: list[list[int]], n_samples: int, seq_len: int, batch_size: int = 8,
                 seed: int = 0) -> list[dict[str, Tensor]]:
    """Concatenate token lists (seeded order) into at most ``n_samples`` windows of ``seq_len`` tokens.

    A short source gives fewer windows; a source shorter than one window gives one shorter window.
    """
    order = torch.randperm(len(token_lists), generator=torch.Generator().manual_seed(seed)).tolist()
    stream: list[int] = []
    for i in order:
        stream.extend(token_lists[i])
        if len(stream) >= n_samples * seq_len:
            break
    windows = [stream[s:s + seq_len] for s in range(0, min(len(stream), n_samples * seq_len), seq_len)]
    if len(windows) > 1 and len(windows[-1]) < seq_len:
        windows.pop()  # equal lengths: no padding
    batches = []
    for s in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[s:s + batch_size], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def load_prune_data(calib: Optional[str], tokenizer: Any, calib_samples: int, calib_seq_len: int,
                    eval_examples: int, seed: int = 0, batch_size: int = 8) -> PruneData:
    """Build the data source with the data pipeline: train split -> calibration, validation -> perplexity."""
    from mixroute import data as D
    from mixroute.config import DataConfig

    source = calib or "built-in synthetic suite"
    try:
        # examples keep the data pipeline's default truncation (256 tokens); calibration windows are packed anyway
        bundle = D.build_datasets(DataConfig(path=calib, seed=seed), tokenizer)
    except (ValueError, OSError) as e:  # ConfigError and the data pipeline's errors are ValueErrors
        raise PruneError(f"calibration data {source}: {e}") from e
    train = [list(map(int, ex["input_ids"])) for ex in bundle.examples["train"]]
    calib_batches = pack_windows(train, calib_samples, calib_seq_len, batch_size, seed) if train else []
    val = list(bundle.examples["validation"])[:eval_examples] if eval_examples > 0 else []
    val_batches = list(D.make_batches(val, D.Collator(tokenizer), batch_size, length_grouped=True))  # by length
    return PruneData(source, calib_batches, val_batches, len(val))


def response_perplexity(model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[Optional[float], int]:
    """(overall perplexity, response tokens) of ``model`` on ``batches``; (None, 0) without response tokens."""
    held = held_out_pass(model, None, batches, device=next(model.parameters()).device)
    return perplexity(held.nll, held.tokens, held.task_ids, [])["overall"], int(held.tokens.sum())


def save_pruned(model: nn.Module, tokenizer: Any, out: str | Path, report: PruneReport, force: bool = False) -> Path:
    """Write config + model.safetensors + tokenizer + prune_report.json to ``out`` atomically."""
    out = check_out_dir(out, force)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report.save(tmp / PRUNE_REPORT)
    return out


def run_prune(model_name: Optional[str], method: str, out: str | Path, sparsity: Optional[float] = None,
              pattern: Optional[PatternLike] = None, calib: Optional[str] = None, calib_samples: int = 128,
              calib_seq_len: int = 256, eval_examples: int = 64, include_embeddings: bool = False,
              include_lm_head: bool = False, blocksize: int = 128, percdamp: float = 0.01, force: bool = False,
              seed: int = 0, progress: bool = True, device: str = "auto") -> PruneReport:
    """Load, measure, prune, measure, save; returns the report also written to OUT/prune_report.json.
    ``device``: where the model, calibration and Hessians live (auto: CUDA when available); the pruned model
    is saved from there. No autocast: SparseGPT's Hessian inverse needs float32."""
    check_method(method)
    sparsity, pat = resolve_target(sparsity, pattern)
    check_out_dir(out, force)
    if calib_samples < 1 or calib_seq_len < 2:
        raise PruneError(f"--calib-samples {calib_samples} / --calib-seq-len {calib_seq_len}: need >= 1 sample of "
                         ">= 2 tokens")
    if eval_examples < 0:
        raise PruneError(f"--eval-examples {eval_examples}: need >= 0 (0 skips the perplexity)")
    model, tok = load_base_model(model_name, device=resolve_device(device))
    if pat is not None:  # fail before any data work
        for name, mod in prune_targets(model, include_embeddings, include_lm_head).items():
            check_nm_width(pat, mod.weight.shape[1], name)
    data = load_prune_data(calib, tok, calib_samples, calib_seq_len, eval_examples, seed)
    if method != "magnitude" and not data.calib:
        raise PruneError(f"calibration data {data.source}: no training examples to calibrate {method} on; give a "
                         "non-empty data file or use --method magnitude")
    ppl_before, eval_tokens = response_perplexity(model, data.validation)
    report = prune_model(model, method, sparsity, pat, data.calib, include_embeddings=include_embeddings,
                         include_lm_head=include_lm_head, blocksize=blocksize, percdamp=percdamp, progress=progress)
    report.ppl_before = ppl_before
    report.ppl_after, _ = response_perplexity(model, data.validation)
    report.calibration.update({"source": data.source, "samples": calib_samples, "seq_len": calib_seq_len,
                               "seed": seed})
    report.eval = {"split": "validation", "examples": data.validation_examples, "tokens": eval_tokens,
                   "metric": "token-weighted perplexity over response tokens"}
    report.model = getattr(model, "mixroute_source", model_name or "embedded")
    save_pruned(model, tok, out, report, force)
    return report
