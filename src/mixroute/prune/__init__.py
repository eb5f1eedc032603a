"""Pruning a base model: magnitude, Wanda and SparseGPT, unstructured or N:M (keep N of every M).

``prune_model(model, method, sparsity=... | pattern="N:M", calib_batches=...) -> PruneReport`` prunes in place;
the building blocks (``magnitude_mask``, ``wanda_mask``, ``sparsegpt_prune_layer``, ...) work on one weight.
See docs/pruning.md.
"""

from mixroute.prune.api import METHODS, PruneReport, prune_model, prune_targets, sparsity_of
from mixroute.prune.calibrate import capture_layer_inputs, decoder_layers, linear_modules
from mixroute.prune.masks import (NM_CONVENTION, NMPattern, PruneError, check_sparsity, magnitude_mask,
                                  mask_from_scores, parse_pattern, prune_magnitude, prune_wanda, wanda_mask)
from mixroute.prune.pipeline import pack_windows, response_perplexity, run_prune, save_pruned
from mixroute.prune.sparsegpt import HessianAccumulator, inverse_cholesky, sparsegpt_prune_layer

__all__ = [
    "METHODS", "NM_CONVENTION", "HessianAccumulator", "NMPattern", "PruneError", "PruneReport",
    "capture_layer_inputs", "check_sparsity", "decoder_layers", "inverse_cholesky", "linear_modules",
    "magnitude_mask", "mask_from_scores", "parse_pattern", "prune_magnitude", "prune_model", "prune_targets",
    "prune_wanda", "sparsegpt_prune_layer", "sparsity_of", "wanda_mask", "pack_windows", "response_perplexity",
    "run_prune", "save_pruned",
]
