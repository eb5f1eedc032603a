"""The quality-vs-cost curve of cost-aware routing: as lambda grows, cheaper experts are picked; each point is
the routed perplexity and the mean cost paid (per layer decision, averaged) on held-out records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from mixroute.library.data import labelled_batches, progress


def cost_curve(lib, data: str | Path, lambdas: Sequence[float], router: Optional[str] = None, batch_size: int = 8,
               max_examples: Optional[int] = None, scope: str = "layer") -> list[dict]:
    """One row per lambda: {"lambda", "ppl", "mean_cost", "share": {expert: fraction of decisions}}, routed per
    layer or (``scope='global'``) once per prompt."""
    from mixroute.evaluate import held_out_pass, perplexity

    batches, _ = labelled_batches(data, lib.man, lib.tok, batch_size, need_labels=False, max_examples=max_examples)
    costs = torch.tensor([e.cost for e in lib.man.experts])
    rows = []
    with progress("cost curve", len(lambdas), lib.progress) as advance:
        for lam in lambdas:
            mix = lib.mixture(router, lam, scope)
            held = held_out_pass(mix.model, mix, batches)
            share = torch.stack(list(held.routing.values())).mean(0).mean(0)      # (E,) over layers, examples
            ppl = perplexity(held.nll, held.tokens, held.task_ids, categories=())["overall"]
            rows.append({"lambda": float(lam), "ppl": ppl,
                         "mean_cost": float(share @ costs),
                         "share": {e.name: round(float(s), 4) for e, s in zip(lib.man.experts, share)}})
            advance()
    return rows
