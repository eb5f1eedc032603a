"""What a routed DoRA forward pays for its weight norms: SmolLM2-135M, batch 8 x 128, 8 DoRA experts routed by
label (one per sequence), 2 threads; each pair is one forward right after an in-place update of every B (as an
optimizer step makes: the cached norms are stale and recomputed) and one with the norms cached, against the
frozen base's forward (median of 3). Prints the ratios; docs/benchmarks.md "DoRA experts against PEFT's DoRA".

    python bench/dora_norms.py
"""

import time

import torch

from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import load_base_model


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_base_model()
    model.eval()
    ids = torch.randint(10, 40000, (8, 128), generator=torch.Generator().manual_seed(0))
    am, tids = torch.ones_like(ids), torch.arange(8) % 8
    mix = Mixture.attach(model, MixtureConfig(expert="dora", router="task", num_experts=8,
                                              experts={"lora": {"rank": 8}}, routers={"task": {"route_train": "label"}}))
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
    for _ in range(3):
        with torch.no_grad():
            for bank in mix.experts.values():
                bank.B.add_(0)   # in place under no_grad, as AdamW steps: bumps the version, norms recomputed
        pairs.append((timed(fwd), timed(fwd)))
    mix.detach()
    timed(lambda: model(input_ids=ids, attention_mask=am))
    base = sorted(timed(lambda: model(input_ids=ids, attention_mask=am)) for _ in range(3))[1]
    for after, cached in pairs:
        print(f"after an update {after:.2f} s, cached {cached:.2f} s, base {base:.2f} s -> "
              f"{base / after:.2f}x / {base / cached:.2f}x the base")


if __name__ == "__main__":
    main()
