"""``mixroute prune``: sparsify a base model's linear layers and save it as a loadable model directory."""

from __future__ import annotations

from typing import Optional

import typer
from typer.core import TyperCommand

from mixroute.cli.common import console, device_option, fail, user_errors

HELP = (
    "Prune every nn.Linear of the decoder blocks (magnitude, Wanda or SparseGPT) and save a model directory "
    "loadable by load_base_model(DIR) and transformers, with prune_report.json (achieved sparsity per layer, "
    "perplexity before/after on the validation split of the calibration source).\n\n"
    "{nm_convention}\n\n"
    "Example: mixroute prune --method sparsegpt --pattern 2:4 --calib dolly.jsonl --out models/smol-2of4"
)


class PruneHelp(TyperCommand):
    """Fills in the N:M convention only when ``prune --help`` is shown.

    The convention is defined in mixroute.prune, which imports torch; `mixroute --help` lists only the first
    paragraph and should not pay for that import.
    """

    def format_help(self, ctx, formatter) -> None:
        from mixroute.prune.masks import NM_CONVENTION

        self.help = HELP.format(nm_convention=NM_CONVENTION)
        super().format_help(ctx, formatter)


@user_errors()
def prune_cmd(
    model: Optional[str] = typer.Argument(None, help="Model: omit for the embedded SmolLM2-135M-Instruct, a local "
                                                    "directory, a cached Hugging Face id, or 'tiny'."),
    method: str = typer.Option(..., "--method", help="magnitude (|W|, no data), wanda (|W| * input norm, per row) "
                                                     "or sparsegpt (OBS reconstruction with weight updates)."),
    out: str = typer.Option(..., "--out", help="Output model directory (written atomically)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Unstructured: fraction of weights pruned, "
                                                                      "strictly between 0 and 1."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured: keep N of every M "
                                                                  "consecutive input weights per output row "
                                                                  "(2:4 = 50%, 3:4 = 25%, 1:4 = 75%)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data (JSONL/JSON/CSV/Parquet, Dolly "
                                                              "schema); default: the built-in synthetic suite. Its "
                                                              "validation split measures perplexity."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows (Wanda, SparseGPT)."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per calibration window."),
    eval_examples: int = typer.Option(64, "--eval-examples", help="Validation examples for perplexity before/"
                                                                  "after (0 = skip)."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings/--no-include-embeddings",
                                            help="Also prune the input embedding table (magnitude)."),
    include_lm_head: bool = typer.Option(False, "--include-lm-head/--no-include-lm-head",
                                         help="Also prune the LM head with --method (tied embeddings: both)."),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT column block size."),
    percdamp: float = typer.Option(0.01, "--percdamp", help="SparseGPT dampening: fraction of the mean Hessian "
                                                            "diagonal added to the diagonal."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split and the calibration order."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and is not empty."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar over layers."),
    device: str = device_option(),
) -> None:
    from transformers.utils import logging as hf_logging

    from mixroute.prune.pipeline import run_prune

    hf_logging.disable_progress_bar()  # our own bar over layers only; no "Writing model shards" bars

    if blocksize < 1 or not 0 <= percdamp < 1:
        fail(f"--blocksize {blocksize} / --percdamp {percdamp}: need blocksize >= 1 and 0 <= percdamp < 1")
    report = run_prune(model, method, out, sparsity=sparsity, pattern=pattern, calib=calib,
                       calib_samples=calib_samples, calib_seq_len=calib_seq_len, eval_examples=eval_examples,
                       include_embeddings=include_embeddings, include_lm_head=include_lm_head,
                       blocksize=blocksize, percdamp=percdamp, force=force, seed=seed, progress=progress,
                       device=device)
    target = report.pattern or f"{report.sparsity:.0%}"
    ppl = (f"perplexity {report.ppl_before:.3f} -> {report.ppl_after:.3f}" if report.ppl_before is not None
           else "perplexity not measured")
    console.print(f"{report.method} {target}: {report.overall_sparsity:.2%} of {report.pruned_weights:,} weights "
                  f"pruned in {report.wall_time_s:.1f}s; {ppl}; saved to [bold]{out}[/bold]", highlight=False)
