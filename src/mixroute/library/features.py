"""Prompt features and prototypes: what the library's routers compare prompts and experts by.

``layer_features`` runs a mixture over batches with given routing and returns, for every decoder layer, the
hidden states entering it pooled over the prompt tokens without attention sinks (what a sequence-level
router at that layer reads), with the experts applied below or (``frozen``) of the frozen base.
``arrow_prototypes`` derives Arrow's per-layer prototype of each expert from its LoRA weights alone.
"""

from __future__ import annotations

import contextlib

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from mixroute.arch import decoder, decoder_layers, input_norm, input_part, reading_layer_inputs
from mixroute.data import Collator, make_batches
from mixroute.routers.base import pool_prompt


def prompt_batches(prompts: Sequence[list[int]], tok: Any, batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Right-padded batches of prompt token ids (every attended token is prompt), by the one collator."""
    ex = [{"input_ids": list(p), "labels": [-100] * len(p), "prompt_len": len(p), "task_id": 0} for p in prompts]
    return [{k: b[k] for k in ("input_ids", "attention_mask")} for b in make_batches(ex, Collator(tok), batch_size)]


@torch.no_grad()
def layer_features(mix: nn.Module, batches: Iterable[dict[str, Tensor]],
                   weights: Optional[Sequence[Tensor]] = None, frozen: bool = False) -> dict[int, Tensor]:
    """{layer: (N, H)} pooled prompt features entering each decoder layer. ``weights[i]`` ((B, E) per batch)
    fixes the routing of batch i (``Mixture.force``): the experts below a layer shape what it reads.
    ``frozen``: the frozen base's features instead (no expert applied), what a global router reads."""
    device = next(mix.model.parameters()).device
    got: dict[int, list[Tensor]] = {i: [] for i in range(len(decoder_layers(mix.model)))}
    mask_now: list[Tensor] = []

    def grab(i: int, args: tuple, kwargs: dict) -> None:
        got[i].append(pool_prompt(args[0].float(), mask_now[0]).cpu())

    with reading_layer_inputs(mix.model, grab):
        for k, b in enumerate(batches):
            ids, attn = b["input_ids"].to(device), b["attention_mask"].to(device)
            mask = attn.bool() if b.get("prompt_mask") is None else attn.bool() & b["prompt_mask"].to(device).bool()
            mask_now[:] = [mask]
            if weights is not None:
                mix.force(weights[k])
            try:
                with mix.context.inputs(None, mask), mix.frozen() if frozen else contextlib.nullcontext():
                    decoder(mix.model)(input_ids=ids, attention_mask=attn, use_cache=False)
            finally:
                if weights is not None:
                    mix.force(None)
    return {i: torch.cat(v) for i, v in got.items() if v}


def _top_right_singular(a_list: list[Tensor], b_list: list[Tensor]) -> Tensor:
    """Top right singular vector of the row-stacked updates [B_1 A_1; B_2 A_2; ...] without forming them: with
    A_all^T = Q R, the Gram matrix sum A^T B^T B A is Q (R G R^T) Q^T, G block-diagonal of B_m^T B_m."""
    a_all = torch.cat(a_list).double()                        # (sum r, H)
    g = torch.block_diag(*[(b.T @ b).double() for b in b_list])
    q, r = torch.linalg.qr(a_all.T)                           # (H, k), (k, k)
    vals, vecs = torch.linalg.eigh(r @ g @ r.T)
    if float(vals[-1]) <= 0:
        return torch.zeros(a_all.shape[1])
    return (q @ vecs[:, -1]).float()


def arrow_prototypes(mix: nn.Module, key: str) -> tuple[Tensor, Tensor]:
    """((E, H) prototypes, (H,) gain) for router ``key`` of a LoRA mixture: per expert the top right singular
    vector of its updates in the projections reading the router's layer's normalised input."""
    layer_idx = mix.routers[key].read_layer
    prefix = f"layers_{layer_idx}_"
    part = {k: input_part(mix.module_names[k]) for k in mix.experts if k.startswith(prefix)}
    banks = [(k, b) for k, b in mix.experts.items() if part.get(k)]
    attn = [kb for kb in banks if part[kb[0]] == "attention"]
    use = attn or banks     # one gain per router: the attention input's when it has LoRA, else the MLP's
    norm = input_norm(decoder_layers(mix.model)[layer_idx], "attention" if attn else "mlp")
    hidden = mix.model.config.hidden_size
    gain = norm.weight.detach().float().cpu() if norm is not None and hasattr(norm, "weight") else torch.ones(hidden)
    n = next(iter(mix.experts.values())).num_experts
    protos = torch.zeros(n, hidden)
    if not use:
        return protos, gain
    for e in range(n):
        pairs = [bank.expert(e) for _, bank in use]
        protos[e] = _top_right_singular([a.detach().cpu() * bank.scaling for (a, _), (_, bank) in zip(pairs, use)],
                                        [b.detach().cpu() for _, b in pairs])
    return protos, gain
