"""Federated quality on Dolly-15k: clients under ``mop_skew``, dense and pruned bases, against central training.

For every base setting (``dense``, ``sparsegpt-75``, ``sparsegpt-2:4``; pruned models are made with the same
calibration as bench/quality_pruned.py and reused) and every method (FedAvg prompt tuning, federated MoP with
FedAvg and with ``usage`` aggregation, both with the gate pre-trained, federated single LoRA, federated MoA
with its stage 1 and pre-trained routers), this script trains with
``mixroute.federated.run`` and evaluates the global mixture on the test split (per-category and average
perplexity); the same methods trained centrally on the union of the clients' data (the same partition's
examples, ``rounds x local_steps x clients_per_round`` steps unless ``--central-steps``) are the reference (one
central run per central method: MoP's two aggregations share it).

Finished runs' small files are archived under ``bench/results/quality_federated/`` (as the other quality
benchmarks do): a rerun, in this checkout or a fresh one, restores every run whose overrides are identical and
trains only what is missing, so the table can be built over several sessions.

Learning rates: give several values to ``--lr`` / ``--prompt-lr`` / ``--mop-lr`` and each is trained; the one
with the lowest average *validation* perplexity is kept, and only that run is evaluated on the test split (read
once). With one value per method nothing is selected. Finished runs are reused (same overrides -> no
retraining), so a selection run followed by the final run with the chosen values trains nothing twice.
Rewrites the "## Federated (Flower, mop_skew)" section of docs/benchmarks.md (a selection-only run, ``--split
validation``, writes "## Federated: learning-rate selection" instead) unless ``--no-write``.

    python bench/quality_federated.py --settings dense --methods fed_prompt_tuning fed_mop_fedavg fed_lora \
        --prompt-lr 3e-3 3e-2 3e-1 --mop-lr 0.3 1 3 --lr 5e-4 2e-3 --no-central --split validation   # selection
    python bench/quality_federated.py --prompt-lr X --mop-lr Y --lr Z      # the table: 3 seeds, hours on 2 cores
    python bench/quality_federated.py --prompt-lr X --mop-lr Y --lr Z --per-category 200 --max-eval 50 \
        --rounds 8                                                       # >= 50 test examples per category
    python bench/quality_federated.py --model tiny --data synthetic --settings dense --methods fed_lora \
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
import findings as F  # noqa: E402
import protocol as P  # noqa: E402
from protocol import DOLLY, ROOT, fmt, write_section  # noqa: E402

SECTION = "## Federated (Flower, mop_skew)"
SWEEP_SECTION = "## Federated: learning-rate selection (validation)"
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
# the paired comparisons the section reports, federated and central: (method, its reference)
PAIRS = [("fed_mop_fedavg", "fed_prompt_tuning"), ("fed_mop_usage", "fed_prompt_tuning"), ("fed_moa", "fed_lora")]


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
    p.add_argument("--rounds", type=int, default=4, help="Rounds of stage 2 at most (the cap).")
    p.add_argument("--patience", type=int, default=2,
                   help="Stop stage 2 after this many rounds without a lower validation perplexity and keep the "
                        "best round (federated.patience; 0 = every round).")
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--stage1-rounds", type=int, default=None,
                   help="MoA: rounds of federated stage 1 before --rounds of stage 2 (default: --rounds); the "
                        "central reference's stage 1 gets the same examples per category.")
    p.add_argument("--central-steps", type=int, default=None,
                   help="Steps of the central reference (default: rounds x local_steps x clients per round).")
    p.add_argument("--per-category", type=int, default=64, help="Records per category (>= clients + 14 train "
                                                                "examples per category for mop_skew).")
    p.add_argument("--partition-total", type=int, default=5000)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, nargs="+", default=[5e-4],
                   help="LoRA methods (several values: chosen on validation).")
    p.add_argument("--prompt-lr", type=float, nargs="+", default=[3e-2], help="Prompt tuning (idem).")
    p.add_argument("--mop-lr", type=float, nargs="+", default=[1.0], help="MoP prompts (idem).")
    p.add_argument("--mop-router-lr", type=float, default=1e-3)
    p.add_argument("--max-eval", type=int, default=8, help="Held-out examples per category for perplexity.")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="Split of the reported table (validation: a selection-only run that never reads test).")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="Seeds (data sample, split, partition, initialisation); learning rates are chosen on the "
                        "first seed's validation split and reused for the others.")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-write", action="store_true", help="Print only; leave --docs alone.")
    return p.parse_args(argv)


def overrides(a: argparse.Namespace, method: str, aggregation: str, model: Optional[str], run_dir: Path,
              central_steps: int, lr: float, seed: int) -> list[str]:
    data = (["data.path=null", f"data.synthetic_per_task={a.per_category}"] if a.data == "synthetic"
            else [f"data.path={a.data}"])
    # the gate and the task routers are pre-trained (federated: a round of their own) as the recipe does
    extra = [f"train.router_lr={a.mop_router_lr}"] if method == "mop" else []
    stage1 = 0
    if method == "moa":
        # stage 1 on both sides with the same examples: the federated rounds of stage 1 see
        # stage1_rounds x local_steps x clients-per-round batches; one central LoRA per category gets its share
        per_round = max(1, min(a.clients, round(a.fraction * a.clients)))
        s1 = a.rounds if a.stage1_rounds is None else a.stage1_rounds
        stage1 = max(1, round(s1 * a.local_steps * per_round / num_categories(a))) if s1 else 0
        extra = ["mixture.routers.task.route_train=label", "train.router_lr=0.01", f"federated.stage1_rounds={s1}"]
    return [f"model.name={model if model is not None else 'null'}", *data,
            f"data.max_per_category={a.per_category}", f"data.max_length={a.max_length}", "data.template=plain",
            "data.val_fraction=0.1", "data.test_fraction=0.25", f"data.seed={seed}", f"train.method={method}",
            f"train.max_steps={central_steps}", f"train.stage1_steps={stage1}", f"train.batch_size={a.batch_size}",
            f"train.lr={lr}", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
            f"train.seed={seed}", f"mixture.seed={seed}", "eval.max_generate=1", "eval.max_new_tokens=1",
            f"eval.max_eval={a.max_eval}",
            f"output_dir={run_dir}", f"federated.clients={a.clients}",
            f"federated.fraction={a.fraction}", f"federated.rounds={a.rounds}",
            f"federated.local_steps={a.local_steps}", f"federated.aggregation={aggregation}",
            f"federated.patience={a.patience}",
            "federated.partition=mop_skew", f"federated.partition_total={a.partition_total}",
            f"federated.partition_seed={seed}", "federated.min_clients=1", *extra]


def num_categories(a: argparse.Namespace) -> int:
    if a.data == "synthetic":
        from mixroute.data.synthetic import FAMILIES   # data.path=null: the task families

        return len(FAMILIES)
    with open(a.data) as f:
        return len({json.loads(line)["category"] for line in f if line.strip()})


def candidates(a: argparse.Namespace, method: str) -> list[float]:
    """The learning rates to try for a central method."""
    return {"prompt_tuning": a.prompt_lr, "mop": a.mop_lr}.get(method, a.lr)


def base_model(a: argparse.Namespace, setting: str) -> Optional[str]:
    """The model path of a setting (pruned with bench/quality_pruned.py's calibration, reused when present)."""
    if setting == "dense":
        return a.model
    import quality_pruned as qp  # the pruning of the pruned-MoP benchmark, same request format

    pa = qp.parse_args(["--model", a.model or "null", "--data", a.data, "--per-category", str(a.per_category),
                        "--max-length", str(a.max_length), "--calib-samples", str(a.calib_samples),
                        "--calib-seq-len", str(a.calib_seq_len), "--seed", str(a.seeds[0]), "--no-write"])
    pa.model = a.model
    model_dir = Path(a.out) / qp.setting_dirname(setting) / "model"
    qp.prune_setting(pa, qp.parse_setting(setting), model_dir)
    return str(model_dir)


DONE = "bench_done.json"   # written last into a run directory: the overrides it was trained with


def _eval_file(split: str) -> str:
    return f"bench_eval_{split}.json"


# The table takes tens of CPU-hours, longer than a working session, and a fresh machine starts without runs/:
# every finished run's small files (overrides, config, curves, rounds, evaluations) are archived under
# bench/results/ (bench/protocol.py's archive, keyed by the run's path under runs/) and a rerun with identical
# overrides restores them instead of training again. Weights are not kept, so a restored run is read only
# through the evaluations it archived; one it lacks retrains the run (same overrides, same seed).
KEPT = (DONE, "config.yaml", "metrics.jsonl", "data_report.json", "gates.json", "gates_clients.json",
        "rounds.jsonl", "partition.json", "eval_clients.json", _eval_file("validation"), _eval_file("test"))


def _portable(ovr: list[str], run_dir: Path) -> str:
    """``ovr`` with the paths of the checkout it ran in written relative to it (runs train in a snapshot)."""
    out = next((o.split("=", 1)[1] for o in ovr if o.startswith("output_dir=")), "")
    return P._portable({"overrides": ovr}, P._trained_in({"output_dir": out}, run_dir))


def restored(run_dir: Path, ovr: list[str]) -> bool:
    """Restore ``run_dir`` from the archive when its record was trained with the same overrides."""
    src = P.archive_path(run_dir)
    if src is None or not (src / DONE).is_file():
        return False
    if _portable(json.loads((src / DONE).read_text()), run_dir) != _portable(ovr, run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (run_dir / f.name).write_text(f.read_text())
    (run_dir / DONE).write_text(json.dumps(ovr))   # with this checkout's paths
    return True


def _train(run_dir: Path, ovr: list[str], train_fn) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    train_fn()
    (run_dir / DONE).write_text(json.dumps(ovr))
    P.archive_run(run_dir, KEPT)


def trained(run_dir: Path, ovr: list[str], train_fn) -> bool:
    """Train into ``run_dir`` unless it already holds, or the archive restores, a finished run of the same
    overrides; True if reused."""
    marker = run_dir / DONE
    if marker.is_file() and json.loads(marker.read_text()) == ovr:
        return True
    if restored(run_dir, ovr):
        print(f"restored {run_dir} from {P.archive_path(run_dir)}")
        return True
    _train(run_dir, ovr, train_fn)
    return False


def evaluate(run_dir: Path, split: str, ovr: list[str], train_fn) -> dict[str, Any]:
    """The run's evaluation on ``split`` (computed once, kept beside the run and in the archive)."""
    from mixroute import rundir
    from mixroute.evaluate import evaluate_run
    from mixroute.fileio import atomic_write_text

    done = run_dir / _eval_file(split)
    if done.is_file():
        return json.loads(done.read_text())
    if not rundir.final_dir(run_dir).is_dir():
        print(f"retrain {run_dir} (its {split} evaluation is needed; the archive keeps no weights)")
        _train(run_dir, ovr, train_fn)
    res = evaluate_run(run_dir, max_generate=0, split=split, classifier=False, write=split == "test")
    atomic_write_text(done, json.dumps(res))
    P.archive_run(run_dir, KEPT)
    return res


def bytes_per_round(run_dir: Path) -> dict[str, float]:
    """Mean bytes sent down (server -> clients) and up per round, summed over the round's clients."""
    from mixroute import rundir

    rows = rundir.read_rounds(run_dir)
    return {d: sum(r[f"bytes_{d}"] for r in rows) / len(rows) for d in ("down", "up")} if rows else {}


def run_one(a: argparse.Namespace, seed: int, setting: str, name: str, model: Optional[str],
            central_done: dict[str, Any], lr: Optional[float] = None) -> dict[str, Any]:
    """Every learning rate of ``name`` federated (chosen on validation when several; ``lr``: the one chosen on
    the first seed), then the chosen one on ``a.split`` and its central reference (shared by methods with the
    same central method)."""
    from mixroute.config import load_config
    from mixroute.federated import run

    method, agg = METHODS[name]
    per_round = max(1, min(a.clients, round(a.fraction * a.clients)))
    central = a.central_steps or a.rounds * a.local_steps * per_round
    out = Path(a.out) / f"seed{seed}" / setting.replace(":", "of")
    row: dict[str, Any] = {"setting": setting, "method": name, "seed": seed, "sweep": {}}
    lrs = [lr] if lr is not None else candidates(a, method)

    def federated(ovr: list[str]):
        return lambda: run(load_config(None, ovr), progress=True)

    tried: dict[float, list[str]] = {}
    for value in lrs:
        fed_dir = out / f"{name}-lr{value:g}"
        ovr = tried[value] = overrides(a, method, agg, model, fed_dir, central, value, seed)
        t0 = time.perf_counter()
        reused = trained(fed_dir, ovr, federated(ovr))
        if len(lrs) > 1:
            val = evaluate(fed_dir, "validation", ovr, federated(ovr))["perplexity"]["average"]
            row["sweep"][value] = val
            print(f"{setting} {name} lr={value:g}: validation PPL {val:.3f}" + (" (reused)" if reused else ""))
        if not reused:
            row["federated_seconds"] = time.perf_counter() - t0
    row["lr"] = min(row["sweep"], key=row["sweep"].get) if len(lrs) > 1 else lrs[0]
    chosen = out / f"{name}-lr{row['lr']:g}"
    row["federated"] = evaluate(chosen, a.split, tried[row["lr"]], federated(tried[row["lr"]]))
    row["bytes"] = bytes_per_round(chosen)
    if not a.no_central:
        key = f"{method}-lr{row['lr']:g}"
        if key not in central_done:
            cdir = out / f"central_{key}"
            ovr = overrides(a, method, agg, model, cdir, central, row["lr"], seed)

            def reference() -> None:
                central_reference(load_config(None, ovr))

            trained(cdir, ovr, reference)
            central_done[key] = evaluate(cdir, a.split, ovr, reference)
        row["central"] = central_done[key]
    return row


def central_reference(cfg: Any) -> None:
    """The same method trained centrally on the union of the clients' examples (data.max_per_category etc.
    unchanged; the union of a mop_skew partition with partition_total >= the train split is the train split)."""
    from mixroute.train import train

    train(cfg, overwrite=True, progress=False)   # MoA with its stage 1, as the federated run has one


def _ppl(rows: list[dict[str, Any]], setting: str, name: str, where: str, cat: Optional[str]) -> list:
    return [(r[where]["perplexity"]["per_category"].get(cat) if cat else r[where]["perplexity"]["average"])
            for r in rows if r["setting"] == setting and r["method"] == name and where in r]


def table(rows: list[dict[str, Any]], cats: list[str]) -> str:
    """Test perplexity per category, mean ± standard deviation over the seeds, federated and central."""
    head = ["base", "method", "lr", "where", *cats, "average", "MB down / up per round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for name in dict.fromkeys(r["method"] for r in rows if r["setting"] == setting):
            mine = [r for r in rows if r["setting"] == setting and r["method"] == name]
            for where in ("federated", "central"):
                if where not in mine[0]:
                    continue
                traffic = "-"
                if where == "federated" and all(r.get("bytes") for r in mine):
                    down, up = (sum(r["bytes"][d] for r in mine) / len(mine) / 1e6 for d in ("down", "up"))
                    traffic = f"{down:.3g} / {up:.3g}"
                lines.append("| " + " | ".join([setting, LABELS[name], f"{mine[0]['lr']:g}", where,
                                                *[P.fmt_ms(_ppl(rows, setting, name, where, c), 2) for c in cats],
                                                P.fmt_ms(_ppl(rows, setting, name, where, None), 2), traffic]) + " |")
    return "\n".join(lines)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """Validation perplexity of every learning rate tried on the first seed (the chosen one in bold)."""
    lines = ["| base | method | lr | validation PPL |", "|---|---|---|---|"]
    for r in rows:
        for lr, val in r["sweep"].items():
            mark = "**" if lr == r["lr"] else ""
            lines.append(f"| {r['setting']} | {LABELS[r['method']]} | {mark}{lr:g}{mark} | {mark}{fmt(val, 3)}{mark} |")
    return "\n".join(lines)


def comparisons(rows: list[dict[str, Any]]) -> list[F.FederatedVsCentral]:
    """Each of PAIRS on each base, federated and central: the paired bootstrap of the relative average
    perplexity, pooled over the seeds (the same test examples for both methods of a seed)."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for name, ref in PAIRS:
            got = {}
            for where in ("federated", "central"):
                pooled = P.Paired()
                for r in rows:
                    if r["setting"] != setting or r["method"] != name or where not in r:
                        continue
                    other = next((x for x in rows if x["setting"] == setting and x["method"] == ref
                                  and x["seed"] == r["seed"] and where in x), None)
                    if other is not None:
                        pooled.add(r[where], other[where], tag=r["seed"])
                if pooled.tokens:
                    got[where] = F.Comparison(LABELS[name], LABELS[ref], *P.paired_bootstrap(pooled))
            if got:
                out.append(F.FederatedVsCentral(setting, got.get("federated"), got.get("central")))
    return out


def sparsity_trends(found: list[F.FederatedVsCentral]) -> list[F.GapVsSparsity]:
    """MoP's gap to prompt tuning along dense and the unstructured sparsities, federated and central (the
    paper: larger federated, growing with sparsity)."""
    import quality_pruned as qp

    def sparsity(setting: str) -> Optional[float]:
        return 0.0 if setting == "dense" else qp.setting_target(setting)[1]

    out = []
    for label in (LABELS["fed_mop_fedavg"], LABELS["fed_mop_usage"]):
        for where in ("federated", "central"):
            ladder = sorted((sparsity(f.setting), getattr(f, where).point) for f in found
                            if getattr(f, where) is not None and getattr(f, where).a == label
                            and sparsity(f.setting) is not None)
            if len(ladder) >= 2:
                out.append(F.GapVsSparsity(label, where, ladder))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    a = parse_args(argv)
    rows: list[dict[str, Any]] = []
    chosen: dict[tuple[str, str], float] = {}
    for seed in a.seeds:
        for setting in a.settings:
            model = base_model(a, setting)
            central_done: dict[str, Any] = {}
            for name in a.methods:
                row = run_one(a, seed, setting, name, model, central_done, chosen.get((setting, name)))
                chosen.setdefault((setting, name), row["lr"])
                rows.append(row)
                report(a, rows, argv, done=False)   # a killed run still leaves every finished row behind
    report(a, rows, argv, done=True)


def report(a: argparse.Namespace, rows: list[dict[str, Any]], argv: Optional[list[str]], done: bool) -> None:
    """results_<split>.json and, when ``done``, the docs section (printed too)."""
    from mixroute.fileio import atomic_write_text

    slim = [{**r, **{w: {k: v for k, v in r[w].items() if k != "per_example"} for w in ("federated", "central")
                     if w in r}} for r in rows]
    atomic_write_text(Path(a.out) / f"results_{a.split}.json", json.dumps(slim, indent=2))
    if not done:
        return
    cats = sorted({c for r in rows for c in r["federated"]["perplexity"]["per_category"]})
    n_test = min(len(r["federated"]["per_example"]["task_ids"]) for r in rows) // max(1, len(cats))
    cmd = "python bench/quality_federated.py " + " ".join(sys.argv[1:] if argv is None else argv)
    size = (f"{a.clients} clients under mop_skew (MoP appendix A), up to {a.rounds} rounds (stopped after "
            f"{a.patience} without a lower validation perplexity, the best round kept) x {a.local_steps} local "
            f"steps of batch {a.batch_size}, fraction {a.fraction}; data "
            f"{Path(a.data).name if a.data != 'synthetic' else 'the synthetic suite'}, {a.per_category} records per "
            f"category, seeds {', '.join(map(str, a.seeds))} (learning rates chosen on the first); perplexity of "
            f"the global model on the {a.split} split (about {n_test} examples per category), mean ± standard "
            "deviation over the seeds; traffic: bytes sent down to and up from the round's clients")
    sweep = sweep_table([r for r in rows if r["sweep"]])
    if a.split == "validation":
        heading = SWEEP_SECTION
        section = (f"{heading}\n\n{size}. Each learning rate trained federated; the lowest average validation "
                   f"perplexity (bold) is the one the table above uses. Command: `{cmd.strip()}`\n\n"
                   f"{sweep if len(sweep.splitlines()) > 2 else table(rows, cats)}\n")
    else:
        heading = SECTION
        central = "" if a.no_central else ("; central = the same method and learning rate trained on the union of "
                                           "the clients' data for the same number of steps (MoA: after a stage 1 "
                                           "whose LoRAs see as many examples of their category as the federated "
                                           "stage 1 does); the gate and the task routers are pre-trained on both "
                                           "sides")
        found = comparisons(rows)
        lines = F.render([*found, *sparsity_trends(found)])
        section = (f"{heading}\n\n{size}{central}. Command: `{cmd.strip()}`\n\n{table(rows, cats)}\n"
                   + ("\nAverage perplexity against the reference method, paired bootstrap over the test examples "
                      "pooled over the seeds (95% intervals; negative = lower perplexity):\n\n"
                      + "\n".join(lines) + "\n" if lines else "")
                   + (f"\nLearning rates tried (validation, first seed):\n\n{sweep}\n"
                      if len(sweep.splitlines()) > 2 else ""))
    print(section)
    if not a.no_write:
        write_section(Path(a.docs), heading, section)


if __name__ == "__main__":
    main()
