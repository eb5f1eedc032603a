"""What a routed DoRA forward pays for its weight norms: SmolLM2-135M, batch 8 x 128, 8 DoRA experts routed by
label (one per sequence), 2 threads; each pair is one forward right after an in-place update of every B (as an
optimizer step makes: the cached norms are stale and recomputed) and one with the norms cached, against the
frozen base's forward (median of 3). Prints the ratios; docs/benchmarks.md "DoRA experts against PEFT's DoRA".

    python bench/dora_norms.py
    python bench/dora_norms.py --model tiny --batch 2 --seq-len 16 --repeats 1     # seconds: does it run
"""

import argparse
import time
from typing import Optional

import torch

from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import load_base_model


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="Base model (default: the embedded SmolLM2-135M; 'tiny' smokes).")
    p.add_argument("--batch", type=int, default=8, help="Sequences per forward (one expert each, by label).")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="Timed pairs; the base's time is their median.")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = load_base_model(a.model)
    model.eval()
    ids = torch.randint(10, min(40000, model.config.vocab_size), (a.batch, a.seq_len),
                        generator=torch.Generator().manual_seed(0))
    am, tids = torch.ones_like(ids), torch.arange(a.batch) % 8
    mix = Mixture.attach(model, MixtureConfig(expert="dora", router="task", num_experts=8,
                                              experts={"lora": {"rank": 8}},
                                              routers={"task": {"route_train": "label"}}))
    mix.train(True)   # route by label: every sequence uses its own expert

    def timed(fn) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        return time.perf_counter() - start

    def fwd() -> None:
        mix(ids, attention_mask=am, task_ids=tids)

    fwd()
    pairs = []
    for _ in range(a.repeats):
        with torch.no_grad():
            for bank in mix.experts.values():
                bank.B.add_(0)   # in place under no_grad, as AdamW steps: bumps the version, norms recomputed
        pairs.append((timed(fwd), timed(fwd)))
    mix.detach()
    timed(lambda: model(input_ids=ids, attention_mask=am))
    base = sorted(timed(lambda: model(input_ids=ids, attention_mask=am)) for _ in range(a.repeats))[a.repeats // 2]
    for after, cached in pairs:
        print(f"after an update {after:.2f} s, cached {cached:.2f} s, base {base:.2f} s -> "
              f"{base / after:.2f}x / {base / cached:.2f}x the base")


if __name__ == "__main__":
    main()
