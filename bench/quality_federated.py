"""Federated quality on Dolly-15k: clients under ``mop_skew``, dense and pruned bases, against central training.

For every base setting (``dense``, ``sparsegpt-75``, ``sparsegpt-2:4``; pruned models are made with the same
calibration as bench/quality_pruned.py and reused) and every method (FedAvg prompt tuning, federated MoP with
FedAvg and with ``usage`` aggregation, federated single LoRA, federated MoA), this script trains with
``mixroute.federated.run`` and evaluates the global mixture on the test split (per-category and average
perplexity); the same methods trained centrally on the union of the clients' data (the same partition's
examples, ``rounds x local_steps x clients_per_round`` steps... capped by ``--central-steps``) are the reference.
Learning rates come from ``--lr`` / ``--prompt-lr`` / ``--mop-lr`` (tune them on the validation split:
``--select-on validation`` evaluates there instead of on test). Rewrites the "## Federated (Flower, mop_skew)"
section of docs/benchmarks.md unless ``--no-write``.

    python bench/quality_federated.py                                     # about an hour on a 2-core CPU
    python bench/quality_federated.py --model tiny --data synthetic --settings dense --methods fed_lora \\
        --clients 2 --rounds 1 --local-steps 1 --per-category 24 --central-steps 1 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOLLY, ROOT, fmt, write_section  # noqa: E402

SECTION = "## Federated (Flower, mop_skew)"
# name -> (central method, aggregation)
METHODS = {
    "fed_prompt_tuning": ("prompt_tuning", "fedavg"),
    "fed_mop_fedavg": ("mop", "fedavg"),
    "fed_mop_usage": ("mop", "usage"),
    "fed_lora": ("lora_mixed", "fedavg"),
    "fed_moa": ("moa", "usage"),
}
LABELS = {"fed_prompt_tuning": "prompt tuning (FedAvg)", "fed_mop_fedavg": "MoP (FedAvg)",
          "fed_mop_usage": "MoP (usage)", "fed_lora": "single LoRA (FedAvg)", "fed_moa": "MoA (usage)"}
DEFAULT_SETTINGS = ["dense", "sparsegpt-75", "sparsegpt-2:4"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="Base model (default: the embedded SmolLM2-135M; 'tiny' tests).")
    p.add_argument("--data", default=DOLLY, help="Dolly-schema file; 'synthetic' = the built-in suite.")
    p.add_argument("--out", default=str(ROOT / "runs" / "quality_federated"))
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                   help="dense, METHOD-PERCENT (sparsegpt-75) or METHOD-N:M (sparsegpt-2:4).")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-central", action="store_true", help="Skip the central reference runs.")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.5, help="Clients per round, as a fraction.")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--central-steps", type=int, default=None,
                   help="Steps of the central reference (default: rounds x local_steps x clients per round).")
    p.add_argument("--per-category", type=int, default=64, help="Records per category (>= clients + 14 train "
                                                                "examples per category for mop_skew).")
    p.add_argument("--partition-total", type=int, default=5000)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA methods.")
    p.add_argument("--prompt-lr", type=float, default=3e-2)
    p.add_argument("--mop-lr", type=float, default=1.0)
    p.add_argument("--mop-router-lr", type=float, default=1e-3)
    p.add_argument("--max-eval", type=int, default=8, help="Held-out examples per category for perplexity.")
    p.add_argument("--select-on", choices=["test", "validation"], default="test",
                   help="Evaluate on validation when tuning learning rates (never tune on test).")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-write", action="store_true", help="Print only; leave --docs alone.")
    return p.parse_args(argv)


def overrides(a: argparse.Namespace, method: str, aggregation: str, model: Optional[str], run_dir: Path,
              central_steps: int) -> list[str]:
    data = (["data.path=null", f"data.synthetic_per_task={a.per_category}"] if a.data == "synthetic"
            else [f"data.path={a.data}"])
    lr = {"prompt_tuning": a.prompt_lr, "mop": a.mop_lr}.get(method, a.lr)
    extra = [f"train.router_lr={a.mop_router_lr}", "mixture.gate_pretrain_steps=0"] if method == "mop" else []
    if method == "moa":
        extra = ["mixture.route_train=label", "train.router_lr=0.01"]
    return [f"model.name={model if model is not None else 'null'}", *data,
            f"data.max_per_category={a.per_category}", f"data.max_length={a.max_length}", "data.template=plain",
            "data.val_fraction=0.1", "data.test_fraction=0.25", f"data.seed={a.seed}", f"train.method={method}",
            f"train.max_steps={central_steps}", "train.stage1_steps=0", f"train.batch_size={a.batch_size}",
            f"train.lr={lr}", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
            f"train.seed={a.seed}", "eval.max_generate=1", "eval.max_new_tokens=1", f"eval.max_eval={a.max_eval}",
            f"eval.split={a.select_on}", f"output_dir={run_dir}", f"federated.clients={a.clients}",
            f"federated.fraction={a.fraction}", f"federated.rounds={a.rounds}",
            f"federated.local_steps={a.local_steps}", f"federated.aggregation={aggregation}",
            "federated.partition=mop_skew", f"federated.partition_total={a.partition_total}",
            f"federated.partition_seed={a.seed}", "federated.min_clients=1", *extra]


def base_model(a: argparse.Namespace, setting: str) -> Optional[str]:
    """The model path of a setting (pruned with bench/quality_pruned.py's calibration, reused when present)."""
    if setting == "dense":
        return a.model
    import quality_pruned as qp  # the pruning of the pruned-MoP benchmark, same request format

    pa = qp.parse_args(["--model", a.model or "null", "--data", a.data, "--per-category", str(a.per_category),
                        "--max-length", str(a.max_length), "--calib-samples", str(a.calib_samples),
                        "--calib-seq-len", str(a.calib_seq_len), "--seed", str(a.seed), "--no-write"])
    pa.model = a.model
    model_dir = Path(a.out) / qp.setting_dirname(setting) / "model"
    qp.prune_setting(pa, qp.parse_setting(setting), model_dir)
    return str(model_dir)


def evaluate(run_dir: Path) -> dict[str, Any]:
    from mixroute.evaluate import evaluate_run

    return evaluate_run(run_dir, max_generate=0, classifier=False)


def run_one(a: argparse.Namespace, setting: str, name: str, model: Optional[str]) -> dict[str, Any]:
    from mixroute.config import load_config
    from mixroute.federated import run

    method, agg = METHODS[name]
    per_round = max(1, min(a.clients, round(a.fraction * a.clients)))
    central = a.central_steps or a.rounds * a.local_steps * per_round
    out = Path(a.out) / setting.replace(":", "of")
    row: dict[str, Any] = {"setting": setting, "method": name}
    fed_dir = out / name
    shutil.rmtree(fed_dir, ignore_errors=True)
    cfg = load_config(None, overrides(a, method, agg, model, fed_dir, central))
    t0 = time.perf_counter()
    run(cfg, progress=True)
    row["federated"] = evaluate(fed_dir)["perplexity"]
    row["federated_seconds"] = time.perf_counter() - t0
    if not a.no_central:
        row["central"] = central_reference(a, cfg, out / f"{name}_central")
    return row


def central_reference(a: argparse.Namespace, fed_cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The same method trained centrally on the union of the clients' examples (data.max_per_category etc.
    unchanged; the union of a mop_skew partition with partition_total >= the train split is the train split)."""
    import copy

    from mixroute.train import train

    cfg = copy.deepcopy(fed_cfg)
    cfg.output_dir = str(run_dir)
    if cfg.train.method == "moa":
        cfg.train.method = "mixture"  # no stage 1, like the federated run: task router over fresh experts
        cfg.mixture.router, cfg.mixture.expert = "task", "lora"
    train(cfg, overwrite=True, progress=False)
    return evaluate(run_dir)["perplexity"]


def table(rows: list[dict[str, Any]], cats: list[str]) -> str:
    head = ["base", "method", "where", *cats, "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for where in ("federated", "central"):
            if where not in r:
                continue
            p = r[where]
            lines.append("| " + " | ".join([r["setting"], LABELS[r["method"]], where,
                                            *[fmt(p["per_category"].get(c)) for c in cats],
                                            fmt(p.get("average"))]) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    a = parse_args(argv)
    rows = []
    for setting in a.settings:
        model = base_model(a, setting)
        for name in a.methods:
            rows.append(run_one(a, setting, name, model))
    cats = sorted({c for r in rows for c in r["federated"]["per_category"]})
    text = table(rows, cats)
    cmd = "python bench/quality_federated.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = (f"{SECTION}\n\n{a.clients} clients under mop_skew (MoP appendix A), {a.rounds} rounds x "
               f"{a.local_steps} local steps, fraction {a.fraction}; perplexity of the global model on the "
               f"{a.select_on} split ({a.max_eval} per category); central = the same method trained on the union "
               f"of the clients' data. Command: `{cmd.strip()}`\n\n{text}\n")
    print(section)
    (Path(a.out) / "results.json").write_text(json.dumps(rows, indent=2))
    if not a.no_write:
        write_section(Path(a.docs), SECTION, section)


if __name__ == "__main__":
    main()
