"""``library route``: what a library's router picks for one prompt, and why."""

from __future__ import annotations

from typing import Optional

import torch

from mixroute.data import Record
from mixroute.library.data import read_prompts
from mixroute.library.manifest import state_kind


@torch.no_grad()
def route(lib, prompt: str, router: Optional[str] = None, cost_weight: Optional[float] = None,
          scope: str = "layer") -> dict:
    """What the router picks for ``prompt`` and why: per expert its probability (averaged over layers; the
    mean gate over prompt tokens for arrow), cost and, when cost-aware, predicted quality and score."""
    mix = lib.mixture(router, cost_weight, scope)
    ids = torch.tensor([read_prompts([Record(instruction=prompt, response="", category="")], lib.man,
                                     lib.tok)[0]])
    mix(input_ids=ids.to(next(lib.model.parameters()).device))
    probs = torch.stack([w.float().reshape(1, -1, w.shape[-1]).mean(1)[0].cpu()
                         for w in mix.context.routing.values()]).mean(0)
    logits = mix.context.router_logits
    if logits:
        probs = torch.stack([v.float().softmax(-1)[0].cpu() for v in logits.values()]).mean(0)
    lasts = [r.last for r in mix.routers.values() if getattr(r, "last", None)]
    rows = []
    for i, e in enumerate(lib.man.experts):
        row = {"name": e.name, "probability": round(float(probs[i]), 4), "cost": e.cost}
        if lasts:
            row["quality"] = round(float(torch.stack([x["quality"][0, i] for x in lasts]).mean()), 4)
            row["score"] = round(float(torch.stack([x["score"][0, i] for x in lasts]).mean()), 4)
        rows.append(row)
    chosen = mix.chosen_experts()
    votes = None
    if chosen is not None:
        kept = torch.stack([r.weights.float()[0].cpu() for r in mix.context.kept.values()])
        votes = kept.mean(0)
        pick = int(votes.argmax())
    else:
        pick = int(probs.argmax())
    return {"router": router or lib.man.router, "scope": scope, "cost_weight": float(cost_weight or 0.0),
            "calibrated": bool(lasts) and lib.stale(state_kind("calibration", scope)) is None,
            "chosen": lib.man.experts[pick].name,
            "layers_agreeing": None if votes is None else round(float(votes.max()), 4),
            "experts": rows, "notes": lib.notes()}

