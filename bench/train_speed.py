"""End-to-end training throughput on Dolly-shaped batches: mixroute's recipe against PEFT + a plain loop.

One process, one tokenised data set (``RunData.build`` with the lora_mixed Dolly preset, plain template), the
same example indices in the same order for every row (mixroute's seeded training order: batch ``k`` of the run
is batch ``k`` of every row). Rows, each a full training run of ``--steps`` optimizer steps:

- **PEFT + plain loop, random batches**: ``get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
  target_modules=<mixroute's all-linear targets, resolved>))``, a plain PyTorch loop (transformers'
  ``DataCollatorForSeq2Seq``: pad to the longest of the batch; full-vocabulary loss; AdamW, cosine schedule,
  clipping as mixroute; ``loss.item()`` each step as any loop that logs). The reference (1.00x).
- **PEFT + plain loop, length-grouped batches**: the same loop on mixroute's length-grouped order.
- **mixroute lora_mixed**: ``mixroute.train.train(cfg)`` with ``train.length_grouped=false`` / ``true``,
  ``train.eval_every=0`` and ``train.save_every=0`` (no evaluation or checkpoint inside the timed steps), and one
  row with validation + checkpoint every ``--eval-every`` steps (what evaluation costs inside a run).
- with ``--moa``: MoA stage 2 (8 experts, task router, label routing) on the length-grouped order (stage 1 at 0
  steps: untrained experts, the same per-step work).

What is measured: real tokens (attention_mask = 1: prompt + response, no padding) of steps 2..N divided by
the wall time from the end of step 1 to the end of step N. That covers collation, forward, backward,
clipping, optimizer and scheduler step and per-step logging (and, in the evaluation row, the validations and
checkpoints that fall inside). Step 1 is a warm-up for every row; model loading, the run's set-up and its
before/after validation and final save are outside (the "train() call" column shows the whole call). For
mixroute the end of each step is the ``time`` of its metrics.jsonl line and the tokens are replayed from the
same seeded order (identical batches). Rows run in interleaved rounds (each round starts one row later), the
median of ``--repeats`` rounds is reported. ``torch.set_flush_denormal``, which mixroute's ``train()`` turns on
process-wide (``seed_everything``), is turned off again after each mixroute run, so the PEFT rows run with
torch's default as a plain loop would.

Prints a markdown table and the padding efficiency (real / padded tokens) of random vs length-grouped batches
over one epoch; unless ``--no-write`` rewrites the "## Training throughput" section of ``--docs``.

    python bench/train_speed.py --moa    # SmolLM2-135M, batch 8, max_length 128, 16 steps, 3 rounds: ~30 min
    python bench/train_speed.py --model tiny --steps 3 --repeats 1 --no-write        # quick check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import DOLLY, ROOT, preset, write_section  # noqa: E402

HEADING = "## Training throughput"


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str                 # "peft" or "mixroute"
    grouped: bool
    method: str = "lora_mixed"
    with_eval: bool = False
    precision: str = "no"     # "bf16": autocast (weights stay float32)


def cases(a: argparse.Namespace) -> list[Case]:
    out = [Case("peft_random", "PEFT LoRA + plain loop, random batches", "peft", False),
           Case("peft_grouped", "PEFT LoRA + plain loop, length-grouped batches", "peft", True),
           Case("mixroute_random", "mixroute lora_mixed, random batches", "mixroute", False),
           Case("mixroute_grouped", "mixroute lora_mixed, length-grouped batches", "mixroute", True),
           Case("mixroute_grouped_eval", f"mixroute lora_mixed, length-grouped, validation + checkpoint every "
                                         f"{a.eval_every} steps", "mixroute", True, with_eval=True)]
    if a.bf16:
        out += [Case("peft_grouped_bf16", "PEFT LoRA + plain loop, length-grouped, bf16 autocast", "peft", True,
                     precision="bf16"),
                Case("mixroute_grouped_bf16", "mixroute lora_mixed, length-grouped, bf16 autocast (--precision bf16)",
                     "mixroute", True, precision="bf16")]
    if a.moa:
        out.append(Case("moa_grouped", "mixroute MoA stage 2 (8 experts, task router), length-grouped",
                        "mixroute", True, method="moa"))
    return out


@dataclass
class Measure:
    tokens: int               # real tokens of the timed steps (2..N)
    padded: int               # batch x longest, summed over the timed steps
    seconds: float            # wall time of the timed steps
    steps: int                # number of timed steps
    call_seconds: Optional[float] = None   # mixroute: the whole train() call
    evals: int = 0            # validations inside the timed steps

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Result:
    case: Case
    runs: list[Measure] = field(default_factory=list)

    def median(self, f) -> float:
        return statistics.median(f(m) for m in self.runs)


# =========================================================================== config and data
def overrides(a: argparse.Namespace, case: Case, out_dir: Path) -> list[str]:
    data = (["data.path=null", f"data.synthetic_per_task={a.per_category}"] if a.data == "synthetic"
            else [f"data.path={a.data}", f"data.max_per_category={a.per_category}"])
    every = a.eval_every if case.with_eval else 0
    ov = data + [f"data.max_length={a.max_length}", "data.template=plain", f"train.max_steps={a.steps}",
                 f"train.batch_size={a.batch_size}", "train.grad_accum=1",
                 f"train.length_grouped={str(case.grouped).lower()}",
                 f"train.eval_every={every}", f"train.save_every={every}", "train.patience=0",
                 f"model.device={a.device}", f"model.precision={case.precision}", f"output_dir={out_dir}"]
    if not case.with_eval:  # the before/after validation is outside the timed steps: keep it small
        ov.append("eval.max_eval=1")
    if case.method == "moa":
        ov.append("train.stage1_steps=0")
    if a.model is not None:
        ov.append(f"model.name={a.model}")
    return ov


def load_cfg(a: argparse.Namespace, case: Case, out_dir: Path) -> Any:
    from mixroute.config import load_config

    return load_config(preset(case.method), overrides(a, case, out_dir))


def batch_ids(data: Any, k: int, batch_size: int, seed: int) -> list[int]:
    """Train-split indices of micro-batch ``k`` of the seeded order (what ``RunData.train_batch`` collates)."""
    per_epoch = -(-len(data.examples["train"]) // batch_size)
    return data.epoch_batches(seed, k // per_epoch, batch_size)[k % per_epoch]


def order(data: Any, grouped: bool) -> Any:
    """``data`` with the random or the length-grouped training order (its own epoch cache)."""
    return dataclasses.replace(data, length_grouped=grouped, _epoch={})


def token_counts(data: Any, ids: list[int]) -> tuple[int, int]:
    lengths = [len(data.examples["train"][i]["input_ids"]) for i in ids]
    return sum(lengths), len(lengths) * max(lengths)


def timed_tokens(data: Any, steps: int, batch_size: int, seed: int) -> tuple[int, int]:
    """(real, padded) tokens of steps 2..``steps`` of the seeded order."""
    real = padded = 0
    for k in range(1, steps):
        r, p = token_counts(data, batch_ids(data, k, batch_size, seed))
        real, padded = real + r, padded + p
    return real, padded


def epoch_efficiency(data: Any, batch_size: int, seed: int) -> float:
    real = padded = 0
    for ids in data.epoch_batches(seed, 0, batch_size):
        r, p = token_counts(data, ids)
        real, padded = real + r, padded + p
    return real / padded


# =========================================================================== the rows
def structural_copy(model: Any) -> Any:
    """A copy of the module tree sharing every parameter and buffer with ``model`` (as bench/speed.py)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def lora_targets(model: Any, cfg: Any) -> list[str]:
    """The module names mixroute attaches its LoRA to (``mixture.target_modules`` resolved on ``model``)."""
    from mixroute.arch import resolve_targets

    from mixroute.experts import expert_settings

    m = expert_settings(cfg.mixture)
    return [t.path for layer in resolve_targets(model, m.target_modules, m.mlp_only, m.allow_partial)
            for t in layer]


def run_peft(base: Any, tok: Any, data: Any, cfg: Any, targets: list[str], device: Any) -> Measure:
    """PEFT LoRA trained by a plain loop: collate, forward with labels, backward, clip, AdamW, schedule."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import DataCollatorForSeq2Seq, get_cosine_schedule_with_warmup

    from mixroute.experts import expert_settings

    t, lora = cfg.train, expert_settings(cfg.mixture)
    torch.manual_seed(t.seed)
    model = get_peft_model(structural_copy(base), LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                             lora_dropout=0.0, target_modules=targets))
    lora = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    if lora != len(targets):
        raise RuntimeError(f"PEFT attached LoRA to {lora} modules, mixroute to {len(targets)}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, min(t.warmup_steps, t.max_steps), t.max_steps)
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    examples = data.examples["train"]
    start = 0.0
    for k in range(t.max_steps):
        feats = [{"input_ids": examples[i]["input_ids"], "attention_mask": [1] * len(examples[i]["input_ids"]),
                  "labels": examples[i]["labels"]} for i in batch_ids(data, k, t.batch_size, t.seed)]
        batch = {n: v.to(device) for n, v in collate(feats).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if k == 0:
            start = time.perf_counter()
    seconds = time.perf_counter() - start
    real, padded = timed_tokens(data, t.max_steps, t.batch_size, t.seed)
    return Measure(real, padded, seconds, t.max_steps - 1)


def run_mixroute(cfg: Any, data: Any) -> Measure:
    """``train(cfg)``; the timed steps from its metrics.jsonl, the tokens replayed from ``data``'s order."""
    import torch

    from mixroute import rundir
    from mixroute.train import train

    t0 = time.perf_counter()
    run = train(cfg, overwrite=True, progress=False)
    call = time.perf_counter() - t0
    torch.set_flush_denormal(False)  # train() turned it on process-wide; the PEFT rows run with torch's default
    rows = rundir.read_metrics(run)
    steps = [r for r in rows if "tokens_per_s" in r and r.get("stage") != "stage1"]
    if [r["step"] for r in steps] != list(range(1, cfg.train.max_steps + 1)):
        raise RuntimeError(f"{run}: expected train lines for steps 1..{cfg.train.max_steps}, got "
                           f"{[r['step'] for r in steps]}")
    # validation lines: "before" at step 0 and "after" at step N are outside the timed steps, the others inside
    evals = sum(1 for r in rows if r.get("split") == "validation" and r.get("stage") != "stage1"
                and 1 <= r["step"] < cfg.train.max_steps)
    real, padded = timed_tokens(data, cfg.train.max_steps, cfg.train.batch_size, cfg.train.seed)
    return Measure(real, padded, steps[-1]["time"] - steps[0]["time"], cfg.train.max_steps - 1, call, evals)


# =========================================================================== report
def load_average() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout
        if "load average" in out:
            return out.split("load average", 1)[1].lstrip("s: ").strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout.splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), name)
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {os.cpu_count()} CPUs (torch {torch.__version__}, {platform.system()} {platform.release()})"


def ratio(r: Result, ref: Result) -> float:
    """Median over rounds of ``r``'s tokens/s over ``ref``'s in the same round (drift cancels within a round)."""
    return statistics.median(m.tps / n.tps for m, n in zip(r.runs, ref.runs))


def table(results: list[Result]) -> str:
    rows = ["| row | tokens/s, median (min-max) | x PEFT plain loop | padding efficiency | s/step | "
            "train() call, s |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        tps = [m.tps for m in r.runs]
        per_step = r.median(lambda m: m.seconds / m.steps)
        call = f"{r.median(lambda m: m.call_seconds):.1f}" if r.case.kind == "mixroute" else "-"
        rows.append(f"| {r.case.label} | {statistics.median(tps):,.0f} ({min(tps):,.0f}-{max(tps):,.0f}) | "
                    f"{ratio(r, results[0]):.2f}x | {r.runs[0].tokens / r.runs[0].padded:.1%} | "
                    f"{per_step:.2f} | {call} |")
    return "\n".join(rows)


def render(a: argparse.Namespace, results: list[Result], info: dict[str, Any], tbl: str) -> str:
    data = "the built-in synthetic suite" if a.data == "synthetic" else f"Dolly-15k ({Path(a.data).name})"
    return "\n".join([
        HEADING, "",
        f"End-to-end training throughput, one process, the same tokenised examples in the same order for every "
        f"row: {data}, {a.per_category} records per category, plain template, max_length {a.max_length} "
        f"({info['train_examples']} training examples, mean length {info['mean_length']:.0f} tokens, "
        f"{info['at_cap']:.0%} at the cap), batch {a.batch_size}, {a.steps} steps per run (step 1 is a warm-up; "
        f"steps 2..{a.steps} are timed), median of {a.repeats} interleaved rounds (x PEFT: the median of the "
        f"per-round ratios).",
        f"Model: {info['model']}. LoRA r={info['rank']}, alpha {info['alpha']:g} on {info['targets']} projections "
        f"(mixroute's all-linear resolution, the same names for PEFT).",
        f"Machine: {info['machine']}; torch threads: {info['threads']}. Load average at the start (uptime): "
        f"{info['load']}; at the end: {info['load_end']}.",
        f"Command: `{info['command']}` ({info['date']}, {info['wall']:.0f} s in all).", "",
        tbl, "",
        f"Padding efficiency (real / padded tokens) over one epoch of the training split at max_length "
        f"{a.max_length}: random batches {info['eff_random']:.1%}, length-grouped {info['eff_grouped']:.1%}.", "",
        "tokens/s: real tokens (attention mask 1, prompt + response) of the timed steps / their wall time "
        "(collation, forward, backward, clipping, optimizer + scheduler step, logging; in the validation row also "
        "the validations and checkpoints inside the timed steps). PEFT: a plain PyTorch loop, transformers' "
        "DataCollatorForSeq2Seq (pad to the longest), loss over the full vocabulary at every position. mixroute: "
        "`mixroute.train.train(cfg)` of configs/lora_mixed_dolly.yaml with the overrides above, timed from its "
        "metrics.jsonl; the train() call column is the whole call (model load, data, set-up, before/after "
        "validation, final save). s/step: median wall time per timed step.", ""])


# =========================================================================== main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="None = embedded SmolLM2-135M; 'tiny' = random test model")
    p.add_argument("--data", default=DOLLY, help="Dolly-schema file; 'synthetic' = the built-in suite (tests)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run (>= 2; step 1 is not timed)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--per-category", type=int, default=64, help="records per category (seeded sample)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validation + checkpoint interval of the validation row (default: half of --steps, the "
                        "preset's 20 of 40)")
    p.add_argument("--moa", action="store_true", help="add a MoA stage-2 row")
    p.add_argument("--bf16", action="store_true", help="add bf16-autocast rows (PEFT and mixroute; fast on CPUs "
                                                      "with avx512_bf16 / AMX and on GPUs)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch --docs")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2 (step 1 is a warm-up)")
    if a.eval_every is None:
        a.eval_every = max(1, a.steps // 2)
    return a


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the results per row key, the table, the section text and its facts.
    torch's thread count and flush-denormal setting are put back afterwards (tests call this in-process)."""
    load = load_average()  # before anything of ours runs
    started = time.perf_counter()
    a = parse_args(argv)
    import torch

    saved_threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            # PEFT's get_peft_model on transformers 5 (harmless, once per PEFT run)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return _main(a, argv, load, started)
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)


def _main(a: argparse.Namespace, argv: Optional[list[str]], load: str, started: float) -> dict[str, Any]:
    import torch

    from mixroute.config import to_dict
    from mixroute.data import RunData
    from mixroute.devices import resolve_device
    from mixroute.experts import expert_settings
    from mixroute.models import quiet_transformers
    from mixroute.rundir import load_model

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    quiet_transformers()
    all_cases = cases(a)
    with tempfile.TemporaryDirectory(prefix="train_speed.") as tmp:
        cfgs = {c.key: load_cfg(a, c, Path(tmp) / c.key) for c in all_cases}
        ref = cfgs["peft_random"]
        for c in all_cases:  # every row reads the same examples (the replayed token counts rely on it)
            if to_dict(cfgs[c.key].data) != to_dict(ref.data) or cfgs[c.key].train.seed != ref.train.seed:
                raise RuntimeError(f"{c.key}: its preset {preset(c.method).name} has other data settings")
        device = resolve_device(ref.model.device)
        base, tok = load_model(ref.model, device)
        data = RunData.build(ref, tok)
        orders = {False: order(data, False), True: order(data, True)}
        targets = lora_targets(base, ref)
        results = [Result(c) for c in all_cases]
        for rnd in range(a.repeats):
            shift = rnd % len(results)  # each round starts one row later: drift hits every row alike
            for r in results[shift:] + results[:shift]:
                c = r.case
                if c.kind == "peft":
                    torch.set_flush_denormal(False)
                    m = run_peft(base, tok, orders[c.grouped], cfgs[c.key], targets, device)
                else:
                    m = run_mixroute(cfgs[c.key], orders[c.grouped])
                if torch.get_num_threads() != threads:
                    raise RuntimeError(f"{c.key} changed torch's thread count {threads} -> {torch.get_num_threads()}")
                r.runs.append(m)
                print(f"round {rnd + 1}/{a.repeats}: {c.label}: {m.tps:,.1f} tokens/s ({m.seconds:.1f} s)",
                      file=sys.stderr, flush=True)
    lengths = [len(e["input_ids"]) for e in data.examples["train"]]
    info = {"train_examples": len(lengths), "mean_length": statistics.mean(lengths),
            "at_cap": sum(n >= a.max_length for n in lengths) / len(lengths),
            "model": f"{type(base).__name__}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
                     f"{ref.model.dtype}" + (" (random tiny test model)" if a.model == "tiny" else ""),
            "rank": expert_settings(ref.mixture).rank, "alpha": expert_settings(ref.mixture).alpha,
            "targets": len(targets),
            "machine": machine(device), "threads": threads, "load": load,
            "command": "python bench/train_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "eff_random": epoch_efficiency(orders[False], a.batch_size, ref.train.seed),
            "eff_grouped": epoch_efficiency(orders[True], a.batch_size, ref.train.seed)}
    tbl = table(results)
    info["wall"] = time.perf_counter() - started
    info["load_end"] = load_average()
    text = render(a, results, info, tbl)
    print(tbl)
    print(f"\npadding efficiency over one epoch (max_length {a.max_length}, batch {a.batch_size}): random "
          f"{info['eff_random']:.1%}, length-grouped {info['eff_grouped']:.1%}")
    if not a.no_write:
        write_section(Path(a.docs), HEADING, text)
        print(f"wrote the '{HEADING[3:]}' section of {a.docs}")
    return {"results": {r.case.key: r for r in results}, "table": tbl, "text": text, "info": info}


if __name__ == "__main__":
    main()
