"""MoP rows for the speed benchmark (``bench/speed.py`` imports ``cases``), and a standalone MoP timing.

Rows: PEFT prompt tuning with 80 virtual tokens at the input, and mixroute MoP with the same 80 virtual tokens
as 8 experts x 10 tokens injected at the middle layer with the gate at one third of the depth: forward and
training step. Run alone for the MoP-vs-PEFT ratio (median of interleaved rounds, one process):

    python bench/speed_cases_mop.py                 # SmolLM2-135M, float32, batch 8 x 128, 6 repeats
    python bench/speed_cases_mop.py --model tiny --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixroute.config import MixtureConfig  # noqa: E402
from mixroute.mixture import Mixture  # noqa: E402

Case = tuple[str, Callable[[], None], Optional[Callable[[], None]], str]
TOTAL_TOKENS, EXPERTS = 80, 8


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """A module-tree copy sharing every parameter and buffer with ``model`` (as bench/speed.py does)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _train_step(module: torch.nn.Module, params: list, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        module.train()
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        module.eval()
    return step


def cases(model, tok, batch: dict, full_logits: bool = False) -> list[Case]:
    """PEFT prompt tuning (L=80) and MoP (8 x 10 tokens, m = N//2, g = N//3): forward and train step.

    ``full_logits``: also time a MoP train step computing the full (B, T, vocab) logits, as PEFT does.
    """
    from peft import PromptTuningConfig, get_peft_model

    ids, am, labels, pm = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_mask"]
    tids = torch.arange(ids.shape[0]) % EXPERTS
    pt = get_peft_model(_copy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOTAL_TOKENS))
    pt.eval()
    out: list[Case] = [(
        f"PEFT prompt tuning, {TOTAL_TOKENS} tokens at the input",
        lambda: pt(input_ids=ids, attention_mask=am),
        _train_step(pt, [p for p in pt.parameters() if p.requires_grad],
                    lambda: pt(input_ids=ids, attention_mask=am, labels=labels).loss), "peft")]
    n = model.config.num_hidden_layers
    mix = Mixture.attach(_copy(model), MixtureConfig(expert="prompt", router="gate", num_experts=EXPERTS,
                                                     num_virtual_tokens=TOTAL_TOKENS // EXPERTS))
    mix.eval()
    name = f"mixroute MoP, {EXPERTS} x {TOTAL_TOKENS // EXPERTS} tokens at layer {n // 2}, gate at {n // 3}"
    out.append((name, lambda: mix(ids, attention_mask=am, prompt_mask=pm, task_ids=tids),
                _train_step(mix, mix.adapter_parameters(),
                            lambda: mix(ids, attention_mask=am, labels=labels, prompt_mask=pm, task_ids=tids,
                                        logits_for="labels").loss), "mixroute"))
    if full_logits:
        out.append((name + " (train: full logits)", lambda: None,
                    _train_step(mix, mix.adapter_parameters(),
                                lambda: mix(ids, attention_mask=am, labels=labels, prompt_mask=pm,
                                            task_ids=tids).loss), "mixroute"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="None = embedded SmolLM2-135M; 'tiny' = random test model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "tiny":
        from mixroute.models import tiny_model
        model, tok = tiny_model()
    else:
        from mixroute.models import load_base_model
        model, tok = load_base_model(args.model)
    bsz, seq = args.batch, args.seq
    ids = torch.randint(100, model.config.vocab_size - 100, (bsz, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, : seq // 2] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "prompt_mask": pm}
    base = _copy(model)
    rows: list[Case] = [("base model (frozen)", lambda: base(input_ids=ids, attention_mask=batch["attention_mask"]),
                         None, "base")]
    rows += cases(_copy(model), tok, batch, full_logits=True)
    fwd: dict[str, list[float]] = {r[0]: [] for r in rows}
    trn: dict[str, list[float]] = {r[0]: [] for r in rows}
    for rnd in range(args.repeats + 1):          # round 0 is warm-up
        for name, f, t, _ in rows:
            start = time.perf_counter()
            with torch.no_grad():
                f()
            if rnd:
                fwd[name].append(time.perf_counter() - start)
            if t is not None:
                start = time.perf_counter()
                t()
                if rnd:
                    trn[name].append(time.perf_counter() - start)
        print(f"round {rnd}/{args.repeats}", file=sys.stderr)
    tokens = bsz * seq
    med = {k: statistics.median(v) for k, v in fwd.items()}
    medt = {k: statistics.median(v) for k, v in trn.items() if v}
    peft = rows[1][0]
    print(f"batch {bsz} x {seq}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| case | forward tok/s | x PEFT prompt tuning | train step tok/s | x PEFT prompt tuning |")
    print("|---|---:|---:|---:|---:|")
    for name, _, _, _ in rows:
        f_cell = "" if name.endswith("full logits)") else f"{tokens / med[name]:,.0f} | {med[peft] / med[name]:.2f}x"
        t_cell = f"{tokens / medt[name]:,.0f} | {medt[peft] / medt[name]:.2f}x" if name in medt else "n/a | n/a"
        print(f"| {name} | {f_cell or 'n/a | n/a'} | {t_cell} |")


if __name__ == "__main__":
    main()
