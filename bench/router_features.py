"""What a router reads on the embedded model, before and after the router-feature fixes -> docs/benchmarks.md.

For Dolly-15k prompts (chat template, instruction + context) through the frozen SmolLM2-135M-Instruct:

* per layer, the hidden-state norm of the first token and of the largest other token, over the median token
  (the attention-sink rule of ``routers.base.sink_free``);
* the norm of the prompt pool with the plain mean (the old features) and with ``pool_prompt`` (sinks out);
* the routing cross-entropy of a freshly initialised task router against the 8 category labels: the old
  router (plain mean, ``nn.Linear``'s default init, no norm) and the current ``TaskRouter`` (sinks out,
  LayerNorm, near-zero init); a uniform guess is ln 8 = 2.08;
* the test accuracy of a logistic-regression classifier on each layer's features, plain mean vs sink-free pool
  (train / test halves of the prompts), to show the routers lose no information by leaving the sink out, and
  the sink-free pool over the instruction only (the chat prompt up to the end of the instruction, the context
  passage left out), the candidate pooling for routers that a long context might drown.

    python bench/router_features.py                  # 400 prompts, every third layer
    python bench/router_features.py --prompts 80 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import DOLLY, ROOT, write_section  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=400, help="Dolly prompts, balanced over the 8 categories.")
    ap.add_argument("--every", type=int, default=3, help="Report every N-th layer.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mixroute.config import MixtureConfig
    from mixroute.data.format import user_message
    from mixroute.data.records import Record
    from mixroute.models import load_base_model
    from mixroute.routers.base import RouterDims, masked_mean, pool_prompt
    from mixroute.routers.task import TaskRouter

    model, tok = load_base_model()
    model.eval()
    rows = [json.loads(line) for line in open(DOLLY)]
    cats = sorted({r["category"] for r in rows})
    per = a.prompts // len(cats)
    picked = [r for c in cats for r in [x for x in rows if x["category"] == c][:per]]
    t0 = time.time()
    feats_plain: dict[int, list] = {}
    feats_free: dict[int, list] = {}
    feats_instr: dict[int, list] = {}
    with_context = 0
    first, other = {}, {}
    norm_plain, norm_free = {}, {}
    labels = []
    with torch.no_grad():
        for r in picked:
            rec = Record(instruction=r["instruction"], context=r["context"][:800], response="", category=r["category"])
            text = tok.apply_chat_template([{"role": "user", "content": user_message(rec)}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, return_offsets_mapping=True)
            ids = torch.tensor([enc["input_ids"][:256]])
            # the instruction's end in the rendered text; tokens that start before it are the instruction's
            # (with the template's header): the context passage follows it
            end = text.index(rec.instruction.strip()) + len(rec.instruction.strip())
            instr = torch.tensor([[s < end for s, _ in enc["offset_mapping"][:256]]])
            with_context += bool(rec.context.strip())
            hs = model(ids, output_hidden_states=True).hidden_states[:-1]
            labels.append(cats.index(r["category"]))
            for layer, h in enumerate(hs):
                n = h[0].norm(dim=-1)
                med = n.median()
                first.setdefault(layer, []).append(float(n[0] / med))
                other.setdefault(layer, []).append(float((n[1:] / med).max()))
                plain, free = masked_mean(h, None)[0], pool_prompt(h, None)[0]
                norm_plain.setdefault(layer, []).append(float(plain.norm()))
                norm_free.setdefault(layer, []).append(float(free.norm()))
                feats_plain.setdefault(layer, []).append(plain)
                feats_free.setdefault(layer, []).append(free)
                feats_instr.setdefault(layer, []).append(pool_prompt(h, instr)[0])
    y = torch.tensor(labels)
    half = torch.arange(len(y)) % 2 == 0
    E, H = len(cats), model.config.hidden_size
    lines = ["| layer | first token / median norm | largest other / median | pool norm, plain mean | pool norm, "
             "sinks out | first routing CE, old router | first routing CE, current | classifier acc., plain "
             "mean | classifier acc., sinks out | classifier acc., instruction only |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def med(v: list[float]) -> float:
        return float(torch.tensor(v).median())

    def clf(x: torch.Tensor) -> float:
        m = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=0))
        m.fit(x[half].numpy(), y[half].numpy())
        return float((torch.tensor(m.predict(x[~half].numpy())) == y[~half]).float().mean())

    for layer in range(0, len(feats_plain), a.every):
        xp, xf = torch.stack(feats_plain[layer]), torch.stack(feats_free[layer])
        old = torch.nn.Linear(H, E)                         # the old router: default init on the plain mean
        new = TaskRouter(MixtureConfig(num_experts=E, num_tasks=E), RouterDims(H, E))
        with torch.no_grad():
            ce_old = float(torch.nn.functional.cross_entropy(old(xp), y))
            ce_new = float(torch.nn.functional.cross_entropy(new.logits(xf), y))
        lines.append(f"| {layer} | {med(first[layer]):.1f} | {med(other[layer]):.2f} (max {max(other[layer]):.1f}) | "
                     f"{med(norm_plain[layer]):.0f} | {med(norm_free[layer]):.0f} | {ce_old:.2f} | {ce_new:.2f} | "
                     f"{clf(xp):.1%} | {clf(xf):.1%} | {clf(torch.stack(feats_instr[layer])):.1%} |")
    table = "\n".join(lines)
    print(table)
    print(f"ln {E} = {math.log(E):.2f}; {len(y)} prompts ({with_context} with a context passage); "
          f"{time.time() - t0:.0f} s")
    if a.no_write:
        return
    text = ("## What routers read (SmolLM2-135M-Instruct, Dolly-15k prompts)\n\n"
            f"`python bench/router_features.py --prompts {a.prompts} --every {a.every}` ({time.strftime('%Y-%m-%d')}, "
            f"{len(y)} prompts, {with_context} of them with a context passage, {len(y) // 2} for the classifiers' "
            "test half). Norms are medians over prompts; "
            "'old router' = a plain mean over the prompt and `nn.Linear`'s default init (the task router before "
            "2026-12), 'current' = `TaskRouter` (sinks out, LayerNorm, near-zero init); 'instruction only' = the "
            "sink-free pool over the chat prompt up to the end of the instruction, the context passage left out. "
            f"A uniform guess is ln {E} = {math.log(E):.2f}.\n\n{table}\n")
    write_section(ROOT / "docs" / "benchmarks.md", "## What routers read (SmolLM2-135M-Instruct, Dolly-15k prompts)",
                  text)


if __name__ == "__main__":
    main()
