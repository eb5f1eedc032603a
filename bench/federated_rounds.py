"""Seconds per federated round: Flower's simulation against its deployment mode, on one config and machine.

In the simulation each client is a Ray worker that keeps the frozen base loaded across rounds. In deployment
mode (a SuperLink and one SuperNode per client on 127.0.0.1, ``mixroute.federated.local_deployment``) Flower
1.42 starts a ClientApp process per message; mixroute hands each message to a node-local worker that keeps the
base loaded (``federated.worker``), and with node config ``keep-base-loaded=false`` (the "before" row) the
ClientApp process imports mixroute and loads the base itself, every round. The
table gives each mode's rounds.jsonl seconds (a round = sending, local training on every client, aggregation
and the server's validation), and what one fresh process pays to import and set up (``federated.local.setup``:
base model, data, partition, mixture), timed in its own interpreter: the part a deployment round repeats.

    python bench/federated_rounds.py                        # embedded SmolLM2-135M, 2 clients, 3 rounds
    python bench/federated_rounds.py --model tiny --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

SETUP = """
import json, time
t0 = time.perf_counter()
from mixroute.config import load_config
from mixroute.federated.local import setup
t1 = time.perf_counter()
setup(load_config({cfg!r}))
t2 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "setup": t2 - t1}}))
"""


def config_text(out: Path, model: Optional[str], rounds: int, local_steps: int) -> str:
    name = "null" if model is None else model
    return (f"output_dir: {out}\nmodel: {{name: {name}}}\n"
            "data: {path: null, synthetic_per_task: 24, max_length: 64, template: plain}\n"
            "train: {method: lora_mixed, batch_size: 4, lr: 0.001}\n"
            "eval: {max_eval: 2, batch_size: 8}\n"
            f"federated: {{clients: 2, rounds: {rounds}, local_steps: {local_steps}, min_clients: 2, "
            "round_timeout: 600, partition: iid}\n")


def seconds(run_dir: Path) -> list[float]:
    from mixroute import rundir

    return [float(r["seconds"]) for r in rundir.read_rounds(run_dir)]


def simulation(work: Path, a: argparse.Namespace) -> list[float]:
    from mixroute.config import load_config
    from mixroute.federated import run

    cfg_path = work / "sim.yaml"
    cfg_path.write_text(config_text(work / "sim", a.model, a.rounds, a.local_steps))
    run(load_config(cfg_path), progress=False)
    return seconds(work / "sim")


def deployment(work: Path, a: argparse.Namespace, keep_loaded: bool = True) -> list[float]:
    from mixroute import rundir
    from mixroute.federated.local_deployment import LocalDeployment

    name = "dep" if keep_loaded else "dep_per_message"
    cfg_path, out = work / f"{name}.yaml", work / name
    cfg_path.write_text(config_text(out, a.model, a.rounds, a.local_steps))
    with LocalDeployment(work / f"flwr_{name}", clients=2,
                         node_config="" if keep_loaded else "keep-base-loaded=false") as dep:
        proc = dep.submit(cfg_path, out)
        end = time.monotonic() + a.timeout
        while time.monotonic() < end and not (rundir.final_dir(out) / "mixture.safetensors").is_file():
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError("flwr run failed:\n" + (proc.stdout.read() if proc.stdout else ""))
            time.sleep(1)
        proc.wait(timeout=60)
    if len(seconds(out)) != a.rounds:
        raise RuntimeError(f"deployment finished {len(seconds(out))} of {a.rounds} rounds; logs in "
                           f"{work / f'flwr_{name}'}")
    return seconds(out)


def fresh_process(work: Path, a: argparse.Namespace) -> dict[str, float]:
    cfg_path = work / "setup.yaml"
    cfg_path.write_text(config_text(work / "setup", a.model, a.rounds, a.local_steps))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", SETUP.format(cfg=str(cfg_path))], capture_output=True, text=True,
                         check=True)
    parts = json.loads(res.stdout.strip().splitlines()[-1])
    return {**parts, "process": time.perf_counter() - t0}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="None = embedded SmolLM2-135M; 'tiny' = random test model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--work", default="/tmp/mixroute_federated_rounds", help="scratch directory (replaced)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the deployment run may take")
    p.add_argument("--no-deployment", action="store_true", help="simulation and the fresh process only (no "
                                                                  "SuperLink / SuperNodes)")
    p.add_argument("--no-per-message", action="store_true", help="skip the deployment run without the worker "
                                                                   "(keep-base-loaded=false: the 'before' row)")
    a = p.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fresh = fresh_process(work, a)
    print(f"fresh process: {fresh['process']:.1f} s in all, imports {fresh['imports']:.1f} s, setup "
          f"{fresh['setup']:.1f} s", flush=True)
    sim = simulation(work, a)
    print("simulation rounds:", [round(s, 1) for s in sim], flush=True)
    dep = None if a.no_deployment else deployment(work, a)
    if dep is not None:
        print("deployment rounds:", [round(s, 1) for s in dep], flush=True)
    per_msg = None if a.no_per_message or a.no_deployment else deployment(work, a, keep_loaded=False)
    if per_msg is not None:
        print("deployment rounds, base loaded per message:", [round(s, 1) for s in per_msg], flush=True)
    print()
    print("| mode | round 1 s | later rounds s (mean) | x simulation (later rounds) |")
    print("|---|---:|---:|---:|")
    def later(s: list[float]) -> float:   # round 1 also pays the QUERY that loads every client
        return statistics.mean(s[1:]) if len(s) > 1 else s[0]

    rows = [("simulation (Ray worker per client, base kept)", sim)]
    if dep is not None:
        rows.append(("deployment, node worker keeps the base (default)", dep))
    if per_msg is not None:
        rows.append(("deployment, base loaded per message (keep-base-loaded=false)", per_msg))
    for name, s in rows:
        print(f"| {name} | {s[0]:.1f} | {later(s):.1f} | {later(s) / later(sim):.2f}x |")
    print(f"\nA fresh process: {fresh['process']:.1f} s (imports {fresh['imports']:.1f} s, set-up "
          f"{fresh['setup']:.1f} s: base model, data, partition, mixture).")


if __name__ == "__main__":
    main()
