"""Speed of mixroute's mixture core against the frozen base model and Hugging Face PEFT.

Side by side in one process on one base model (every case is a structural copy sharing the base weights),
interleaved rounds, median over ``--repeats``: forward (no grad) and one training step (forward with labels +
backward + AdamW step on the adapter parameters). Prints a markdown table and, unless ``--no-write``, rewrites
the "## Speed" section of docs/benchmarks.md. Rows: the frozen base, PEFT LoRA / mixed batch / Poly / prompt
tuning, and every mixroute router; MoP against PEFT prompt tuning with the same 80 virtual tokens.

    python bench/speed.py                      # SmolLM2-135M, float32, batch 8 x 128, 6 repeats
    python bench/speed.py --model tiny --repeats 2 --no-write   # quick check
    python bench/speed.py --only "prompt tuning,MoP" --no-write   # MoP vs PEFT prompt tuning alone
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mixroute.config import ALL_PROJECTIONS, MixtureConfig  # noqa: E402
from mixroute.mixture import Mixture  # noqa: E402

Case = tuple[str, Callable[[], None], Optional[Callable[[], None]], str]


def structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model`` (no extra memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def adamw_step(params: list, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return step


def peft_cases(model, batch: dict) -> list[Case]:
    from peft import LoraConfig, PolyConfig, get_peft_model

    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    bsz = ids.shape[0]
    out: list[Case] = []

    m = get_peft_model(structural_copy(model), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    params = [p for p in m.parameters() if p.requires_grad]
    m.eval()
    out.append(("PEFT LoRA r=8, 7 projections", lambda m=m: m(input_ids=ids, attention_mask=am),
                adapter_train(m, params, lambda m=m: m(input_ids=ids, attention_mask=am, labels=labels).loss), "peft"))

    m = get_peft_model(structural_copy(model), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS,
                                                          use_dora=True))
    params = [p for p in m.parameters() if p.requires_grad]
    m.eval()
    out.append(("PEFT DoRA r=8, 7 projections", lambda m=m: m(input_ids=ids, attention_mask=am),
                adapter_train(m, params, lambda m=m: m(input_ids=ids, attention_mask=am, labels=labels).loss), "peft"))

    m = get_peft_model(structural_copy(model), LoraConfig(r=64, lora_alpha=128, target_modules=ALL_PROJECTIONS))
    params = [p for p in m.parameters() if p.requires_grad]
    m.eval()
    out.append(("PEFT LoRA r=64 (= 8 experts x r=8 stacked), 7 projections",
                lambda m=m: m(input_ids=ids, attention_mask=am),
                adapter_train(m, params, lambda m=m: m(input_ids=ids, attention_mask=am, labels=labels).loss), "peft"))

    m = get_peft_model(structural_copy(model), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS),
                       adapter_name="a0")
    for i in range(1, 8):
        m.add_adapter(f"a{i}", LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    names = [f"a{i % 8}" for i in range(bsz)]
    m.eval()
    out.append(("PEFT mixed batch, 8 adapters (adapter_names=)",
                lambda m=m: m(input_ids=ids, attention_mask=am, adapter_names=names), None, "peft"))

    m = get_peft_model(structural_copy(model), PolyConfig(r=8, n_tasks=8, n_skills=8, n_splits=1,
                                                          target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM"))
    tids = torch.arange(bsz, device=ids.device) % 8
    params = [p for p in m.parameters() if p.requires_grad]
    m.eval()
    out.append(("PEFT Poly, 8 skills", lambda m=m: m(input_ids=ids, attention_mask=am, task_ids=tids),
                adapter_train(m, params, lambda m=m: m(input_ids=ids, attention_mask=am, labels=labels,
                                                       task_ids=tids).loss), "peft"))
    return out


def adapter_train(module, params, loss_fn) -> Callable[[], None]:
    """A train step that switches ``module`` to train mode for the step and back to eval after."""
    step = adamw_step(params, loss_fn)

    def run() -> None:
        module.train()
        step()
        module.eval()
    return run


def mixroute_cases(model, batch: dict) -> list[Case]:
    ids, am, labels, pm = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_mask"]
    bsz = ids.shape[0]
    tids = torch.arange(bsz, device=ids.device) % 8
    r8, label = {"lora": {"rank": 8}}, {"task": {"route_train": "label"}}
    specs = [
        ("mixroute single (plain LoRA r=8)", MixtureConfig(router="single", experts=r8), False),
        ("mixroute single, train step with logits_for='all'", MixtureConfig(router="single", experts=r8), False),
        ("mixroute task top-1, 8 experts, mixed batch",
         MixtureConfig(router="task", num_experts=8, experts=r8, routers=label), True),
        # one decision per sequence from the frozen base at the middle layer: the routing pre-pass costs
        # router_layer / num_layers of a base forward per prefill (measured here in eval mode: top-1 by the router)
        ("mixroute task global top-1 (pre-pass at the middle layer), 8 experts",
         MixtureConfig(router="task", num_experts=8, router_scope="global", experts=r8), False),
        ("mixroute DoRA single (one DoRA expert r=8)", MixtureConfig(expert="dora", router="single", experts=r8), False),
        ("mixroute DoRA task top-1, 8 experts, mixed batch",
         MixtureConfig(expert="dora", router="task", num_experts=8, experts=r8, routers=label), True),
        ("mixroute token_topk, 8 experts, k=2",
         MixtureConfig(router="token_topk", num_experts=8, experts=r8, routers={"token_topk": {"top_k": 2}}), False),
        ("mixroute rank (SMoRA), 64 ranks, k=8",
         MixtureConfig(router="rank", num_experts=8, experts=r8, routers={"rank": {"rank_top_k": 8}}), False),
        ("mixroute poly, 8 skills", MixtureConfig(router="poly", num_experts=8, num_tasks=8, experts=r8), False),
    ]
    out: list[Case] = []
    for name, cfg, label_routing in specs:
        mix = Mixture.attach(structural_copy(model), cfg)
        # task: route by label (train mode) so every sequence really uses a different expert in the forward
        mix.train(label_routing)

        def fwd(mix=mix) -> None:
            mix(ids, attention_mask=am, prompt_mask=pm, task_ids=tids)

        logits_for = "all" if "logits_for='all'" in name else "labels"

        def loss(mix=mix, logits_for=logits_for) -> torch.Tensor:
            return mix(ids, attention_mask=am, labels=labels, prompt_mask=pm, task_ids=tids,
                       logits_for=logits_for).loss
        out.append((name, fwd, adapter_train_keep(mix, label_routing, loss), "mixroute"))
    return out


def adapter_train_keep(mix: Mixture, stay_train: bool, loss_fn) -> Callable[[], None]:
    step = adamw_step(mix.adapter_parameters(), loss_fn)

    def run() -> None:
        mix.train()
        step()
        mix.update_balancing()
        mix.train(stay_train)
    return run


MOP_TOKENS, MOP_EXPERTS = 80, 8


def mop_cases(model, batch: dict) -> list[Case]:
    """PEFT prompt tuning (80 tokens at the input) and MoP (8 x 10 tokens, m = N//2, g = N//3)."""
    from peft import PromptTuningConfig, get_peft_model

    ids, am, labels, pm = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_mask"]
    tids = torch.arange(ids.shape[0], device=ids.device) % MOP_EXPERTS
    pt = get_peft_model(structural_copy(model), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=MOP_TOKENS))
    pt.eval()
    out: list[Case] = [(f"PEFT prompt tuning, {MOP_TOKENS} tokens at the input",
                        lambda: pt(input_ids=ids, attention_mask=am),
                        adapter_train(pt, [p for p in pt.parameters() if p.requires_grad],
                                        lambda: pt(input_ids=ids, attention_mask=am, labels=labels).loss), "peft")]
    n = model.config.num_hidden_layers
    prompts = {"prompt": {"num_virtual_tokens": MOP_TOKENS // MOP_EXPERTS}}
    mix = Mixture.attach(structural_copy(model), MixtureConfig(expert="prompt", router="gate", num_experts=MOP_EXPERTS,
                                                               experts=prompts))
    mix.eval()
    name = f"mixroute MoP, {MOP_EXPERTS} x {MOP_TOKENS // MOP_EXPERTS} tokens at layer {n // 2}, gate at {n // 3}"
    out.append((name, lambda: mix(ids, attention_mask=am, prompt_mask=pm, task_ids=tids),
                adapter_train(mix, mix.adapter_parameters(),
                                lambda: mix(ids, attention_mask=am, labels=labels, prompt_mask=pm, task_ids=tids,
                                            logits_for="labels").loss), "mixroute"))
    return out


def timed(fn: Callable[[], None], grad: bool) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is asynchronous
    sync()
    start = time.perf_counter()
    if grad:
        fn()
    else:
        with torch.no_grad():
            fn()
    sync()
    return time.perf_counter() - start


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), platform.processor())
    except OSError:
        name = platform.processor()
    return f"{name}, {torch.get_num_threads()} threads (torch {torch.__version__}, {platform.system()})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="None = embedded SmolLM2-135M; 'tiny' = random test model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--no-train", action="store_true", help="forward only")
    ap.add_argument("--only", default="", help="comma-separated substrings: keep only matching rows (+ base)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--verbose", action="store_true", help="print each case's time as it runs (stderr)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0 = leave torch's default)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from mixroute.devices import resolve_device
    from mixroute.models import load_base_model

    device = resolve_device(args.device)
    model, tok = load_base_model(args.model, device=device)
    bsz, seq = args.batch, args.seq
    ids = torch.randint(100, model.config.vocab_size - 100, (bsz, seq), device=device)
    am = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, : seq // 2] = True
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels, "prompt_mask": pm}

    base = structural_copy(model)
    cases: list[Case] = [("base model (frozen)", lambda: base(input_ids=ids, attention_mask=am), None, "base")]
    cases += peft_cases(model, batch) + mixroute_cases(model, batch) + mop_cases(structural_copy(model), batch)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        cases = [c for c in cases if c[3] == "base" or any(k in c[0] for k in keys)]

    fwd_t: dict[str, list[float]] = {c[0]: [] for c in cases}
    trn_t: dict[str, list[float]] = {c[0]: [] for c in cases}
    for rnd in range(args.repeats + 1):          # round 0 is warm-up
        # round-robin, starting one case later each round, so background load hits every row alike
        shift = rnd % len(cases)
        for name, fwd, train, _ in cases[shift:] + cases[:shift]:
            tf = timed(fwd, grad=False)
            if rnd:
                fwd_t[name].append(tf)
            tt = None
            if train is not None and not args.no_train:
                tt = timed(train, grad=True)
                if rnd:
                    trn_t[name].append(tt)
            if args.verbose:
                print(f"  {name}: forward {tf:.2f} s" + (f", train step {tt:.2f} s" if tt else ""), file=sys.stderr)
        print(f"round {rnd}/{args.repeats} done", file=sys.stderr)

    tokens = bsz * seq
    base_fwd = statistics.median(fwd_t[cases[0][0]])
    ref = next((c[0] for c in cases if c[0].startswith("PEFT LoRA r=8")), None)
    peft_train = statistics.median(trn_t[ref]) if ref and trn_t[ref] else None
    rows = ["| case | forward tok/s | x base forward | train step tok/s | x PEFT LoRA train |",
            "|---|---:|---:|---:|---:|"]
    for name, _, _, _ in cases:
        f = statistics.median(fwd_t[name])
        t = statistics.median(trn_t[name]) if trn_t[name] else None
        tr = f"{tokens / t:,.0f}" if t else "n/a"
        rel = f"{peft_train / t:.2f}x" if t and peft_train else "n/a"
        rows.append(f"| {name} | {tokens / f:,.0f} | {base_fwd / f:.2f}x | {tr} | {rel} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        write_docs(table, args, model, next(model.parameters()).device)


def write_docs(table: str, args, model, device: torch.device) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    cmd = "python bench/speed.py " + " ".join(sys.argv[1:])
    body = (f"## Speed\n\nMachine: {machine(device)}. Model: {type(model).__name__} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, float32), batch "
            f"{args.batch} x {args.seq} tokens, median of {args.repeats} interleaved rounds.\n"
            f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}).\n\n<!-- speed-table -->\n{table}\n"
            "<!-- /speed-table -->\n")
    start = text.find("## Speed")
    if start < 0:                                  # a new section goes before "## Quality" (or at the end)
        at = text.find("## Quality")
        text = text.rstrip() + "\n\n" + body if at < 0 else text[:at] + body + "\n" + text[at:]
    else:
        end = text.find("\n## ", start + 1)
        marker = text.find("<!-- /speed-table -->", start)
        # keep any hand-written analysis after the table, inside the section
        tail = text[marker + len("<!-- /speed-table -->\n"): end if end >= 0 else len(text)] if marker >= 0 else ""
        text = text[:start] + body + tail + (text[end:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
