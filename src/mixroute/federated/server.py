"""The Flower ``ServerApp``: maps partitions to nodes, samples clients per round (seeded by round), sends the
global adapter state, aggregates the survivors (failures and their reasons go to the round record), evaluates
the global mixture on the validation split, writes ``rounds.jsonl`` and checkpoints atomically every round.

``serve(grid, cfg, run_dir, ...)`` is the loop; ``make_app(...)`` wraps it for the simulation runtime and
``app`` (module level) is the deployment entry point (``flwr run`` / SuperLink), configured by the run config
keys ``config`` (YAML path) and ``run-dir``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from mixroute import rundir
from mixroute.config import ConfigError, RunConfig
from mixroute.evaluate import validation_snapshot
from mixroute.federated.aggregate import fedavg, per_category_average, rule_for, split_routers
from mixroute.federated.payload import from_record, is_router, num_bytes, to_record
from mixroute.federated.strategies import aggregate_replies
from mixroute.fileio import atomic_dir, atomic_write_text
from mixroute.train.tracking import MetricsLogger

log = logging.getLogger("mixroute.federated")

STATE = "state.json"
GLOBAL = "global.safetensors"
BEST = "best.safetensors"


@dataclass
class Best:
    """The stage-2 round with the lowest average validation perplexity so far (``federated.patience``)."""

    round: int
    ppl: float
    state: dict


# ------------------------------------------------------------------ checkpoints
def save_state(run_dir: Path, rnd: int, global_state: dict, pretrained: bool = True,
               best: Optional[Best] = None) -> None:
    """federated/ = global.safetensors + state.json (+ best.safetensors with ``federated.patience``), replaced
    atomically. ``pretrained``: whether the router pre-training has run (it runs after MoA's stage 1, before the
    first round of stage 2). Personal routers are not here: they stay on their clients
    (``local.PersonalRouters``)."""
    from safetensors.torch import save_file

    meta: dict[str, Any] = {"round": rnd, "pretrained": pretrained}
    with atomic_dir(rundir.federated_dir(run_dir)) as tmp:
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / GLOBAL))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.state.items()}, str(tmp / BEST))
            meta.update(best_round=best.round, best_ppl=best.ppl)
        atomic_write_text(tmp / STATE, json.dumps(meta))


def load_state(run_dir: Path) -> Optional[tuple[int, dict, bool, Optional[Best]]]:
    from safetensors.torch import load_file

    d = rundir.federated_dir(run_dir)
    if not (d / STATE).is_file():
        return None
    meta = json.loads((d / STATE).read_text())
    best = (Best(int(meta["best_round"]), float(meta["best_ppl"]), load_file(str(d / BEST)))
            if "best_round" in meta else None)
    # a checkpoint from before stage 1 existed was written after the pre-training round, when there was one
    return int(meta["round"]), load_file(str(d / GLOBAL)), bool(meta.get("pretrained", True)), best


# ------------------------------------------------------------------ the loop
def sample(available: list[int], rnd: int, fed: Any) -> list[int]:
    """Partitions trained in round ``rnd``: a seeded draw (same on resume) of ceil(fraction * clients)."""
    want = max(fed.min_clients, math.ceil(fed.fraction * fed.clients))
    want = min(want, len(available))
    rng = np.random.default_rng([fed.partition_seed, rnd])
    return sorted(int(x) for x in rng.choice(sorted(available), size=want, replace=False))


def wait_for_nodes(grid: Grid, fed: Any, timeout: float = 120.0) -> list[int]:
    """Node ids, waiting for ``clients`` nodes (at least ``min_clients`` within ``timeout``)."""
    end = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= fed.clients or (time.monotonic() > end and len(nodes) >= fed.min_clients):
            return nodes
        if time.monotonic() > end:
            raise RuntimeError(f"only {len(nodes)} nodes connected after {timeout:.0f}s; federated.min_clients is "
                               f"{fed.min_clients}")
        time.sleep(0.5)


def map_partitions(grid: Grid, nodes: list[int], cfg_text: str, timeout: Optional[float]) -> dict[int, int]:
    """partition-id -> node id (a QUERY message to every node; the clients load their base model here)."""
    msgs = [Message(RecordDict({"config": ConfigRecord({"cfg": cfg_text})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    out: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():   # that node is left out of the run; say why (a broken client is not silent)
            log.warning("node %s did not join: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        k = int(reply.content["metrics"]["partition-id"])
        if k in out:
            raise RuntimeError(f"two nodes claim partition-id {k}")
        out[k] = reply.metadata.src_node_id
    return out


def exchange(grid: Grid, owners: dict[int, int], starts: dict[int, dict], conf: dict[str, Any],
             timeout: Optional[float]) -> tuple[dict[int, tuple[dict, dict, Message]], list[dict]]:
    """One TRAIN message to each partition in ``starts`` (its start state, ``conf`` plus its partition id):
    ({partition: (state, metrics, reply)} of the replies, [{client, reason}] of the failures, silent ones
    included)."""
    msgs = [Message(RecordDict({"arrays": to_record(st), "config": ConfigRecord({**conf, "partition": k})}),
                    dst_node_id=owners[k], message_type=MessageType.TRAIN) for k, st in starts.items()]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    by_node = {v: k for k, v in owners.items()}
    # error replies made by the SuperLink for a lost node do not come from that node: match by message id
    sent = {m.metadata.message_id: k for m, k in zip(msgs, starts) if m.metadata.message_id}
    ok: dict[int, tuple[dict, dict, Message]] = {}
    failed: list[dict] = []
    for reply in replies:
        k = sent.get(reply.metadata.reply_to_message_id, by_node.get(reply.metadata.src_node_id, -1))
        if reply.has_error():
            failed.append({"client": k, "reason": reply.error.reason})
        else:
            m = reply.content["metrics"]
            ok[k] = (from_record(reply.content["arrays"]), {key: m[key] for key in m}, reply)
    for k in starts:
        if k not in ok and not any(f["client"] == k for f in failed):
            failed.append({"client": k, "reason": f"no reply within federated.round_timeout ({timeout}s)"})
    return ok, failed


def pretrain(grid: Grid, local: Any, owners: dict[int, int], global_state: dict, metrics: MetricsLogger,
             console: Any, step: int = 0) -> dict:
    """Router pre-training (after round ``step``: 0, or the last round of MoA's stage 1): every client fits the
    label-aligned routers alone on its own labels (``local.pretrain_round``); the global routers become their
    example-weighted average (with ``personalize_router`` each client also keeps its own, on the client).
    Returns the new global state."""
    from mixroute.data import to_device
    from mixroute.train.gate import measure_routers

    fed, mix = local.cfg.federated, local.mix
    t0 = time.perf_counter()
    ok, failed = exchange(grid, owners, {k: global_state for k in sorted(owners)},
                          {"round": step, "phase": "pretrain"}, fed.round_timeout)
    for f in failed:
        log.warning("client %s failed router pre-training: %s", f["client"], f["reason"])
    order = [k for k in sorted(ok) if int(ok[k][1]["num-examples"]) > 0]
    if order:
        states, examples = [ok[k][0] for k in order], [int(ok[k][1]["num-examples"]) for k in order]
        global_state = {**global_state, **fedavg(states, examples)}
    mix.load_adapter_state_dict(global_state, source="the pre-trained global routers")
    dev = local.accelerator.device
    val = [to_device(b, dev) for b in local.data.batches("validation", local.cfg.eval.batch_size)]
    with local.accelerator.autocast():
        ce, accs = measure_routers(mix, val)
    client_acc = {str(k): ok[k][1]["val_accuracy"] for k in order if ok[k][1]["val_accuracy"] >= 0}
    metrics.eval({"step": step, "split": "validation", "stage": "router_pretrain", "clients": order,
                  "failed": failed, "train_examples": sum(int(ok[k][1]["num-examples"]) for k in order),
                  "steps": {str(k): int(ok[k][1]["steps"]) for k in order}, "val_ce": ce,
                  "val_accuracy": sum(accs.values()) / len(accs), "val_accuracy_per_router": accs,
                  "client_val_accuracy": client_acc, "seconds": round(time.perf_counter() - t0, 1)})
    console(f"router pre-training: {len(order)} client{'s' if len(order) != 1 else ''}, global router's "
            f"validation routing accuracy {100 * sum(accs.values()) / len(accs):.1f}%"
            + (f"; {len(failed)} failed" if failed else ""))
    return global_state


def serve(grid: Grid, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_after_round: Optional[int] = None) -> None:
    metrics = MetricsLogger(run_dir)   # metrics.jsonl, gates.json and TensorBoard, as central training writes them
    try:
        _serve(grid, cfg, run_dir, resume, progress, stop_after_round, metrics)
    finally:
        metrics.close()


def _serve(grid: Grid, cfg: RunConfig, run_dir: Path, resume: bool, progress: bool,
           stop_after_round: Optional[int], metrics: MetricsLogger) -> None:
    import yaml

    from mixroute.federated.local import pretrains_routers, setup, stage1_rounds

    fed = cfg.federated
    s1 = stage1_rounds(cfg)
    total = s1 + fed.rounds
    local = setup(cfg)
    mix, cats = local.mix, local.data.categories
    console = _console(progress)
    # the server aggregates on the CPU whatever device its evaluation uses: replies arrive as CPU arrays
    global_state = {k: v.detach().cpu().clone() for k, v in mix.adapter_state_dict().items()}
    start, pretrained, best = 0, False, None
    ck = load_state(run_dir) if resume else None
    if ck is not None:
        start, global_state, pretrained, best = ck
        rundir.truncate_rounds(run_dir, start)
        rundir.truncate_after(run_dir, start)
        console(f"resuming after round {start}")
    elif not resume:
        _evaluate(local, global_state, metrics, 0, "before")
    cfg_text = yaml.safe_dump(_to_send(cfg), sort_keys=False)
    nodes = wait_for_nodes(grid, fed)
    owners = map_partitions(grid, nodes, cfg_text, fed.round_timeout)
    silent = len(nodes) - len(owners)
    if len(owners) < fed.min_clients:
        raise RuntimeError(f"only {len(owners)} of {len(nodes)} nodes answered within federated.round_timeout="
                           f"{fed.round_timeout}s (each loads the base model first); federated.min_clients is "
                           f"{fed.min_clients}: raise round_timeout on a busy machine, or check the clients' logs")
    console(f"{len(owners)} clients connected (partitions {sorted(owners)}); "
            + (f"{s1} round{'s' if s1 != 1 else ''} of stage 1 (experts by category), then " if s1 else "")
            + f"{fed.rounds} round{'s' if fed.rounds != 1 else ''}, "
            f"aggregation {fed.aggregation}{', personal routers' if fed.personalize_router else ''}"
            + (f"; {silent} node(s) did not answer within federated.round_timeout={fed.round_timeout}s (loading "
               "the base model on a busy machine can take that long: raise it)" if silent else ""))
    proximal = rule_for(fed.aggregation).proximal
    # a run that early stopping had ended (killed before its final mixture was written) does not train on
    last = start if best is not None and fed.patience and start - best.round >= fed.patience else total
    for rnd in range(start + 1, last + 1):
        stage1 = rnd <= s1
        if not stage1 and not pretrained and pretrains_routers(local):
            # on frozen experts (trained by stage 1 when there is one), before the routers train with them
            global_state = pretrain(grid, local, owners, global_state, metrics, console, rnd - 1)
            save_state(run_dir, rnd - 1, global_state, pretrained=True)
        pretrained = pretrained or not stage1
        t0 = time.perf_counter()
        sampled = sample(list(owners), rnd, fed)
        if stage1:   # the experts only travel: the routers are not run in stage 1
            experts_only = split_routers(global_state, is_router)[0]
            starts = {k: experts_only for k in sampled}
            conf: dict[str, Any] = {"round": rnd, "phase": "stage1"}
        else:   # with personalize_router each client puts its own router in, on its side
            starts = {k: global_state for k in sampled}
            conf = {"round": rnd, "proximal": proximal}
        bytes_down = sum(num_bytes(st) for st in starts.values())
        ok, failed = exchange(grid, owners, starts, conf, fed.round_timeout)
        order = sorted(ok)
        states = [ok[k][0] for k in order]
        examples = [int(ok[k][1]["num-examples"]) for k in order]
        usage = [list(ok[k][1]["usage"]) for k in order]
        if stage1:
            global_state = per_category_average(global_state, states, [list(ok[k][1]["experts"]) for k in order],
                                                [list(ok[k][1]["expert-examples"]) for k in order],
                                                local.num_experts, local.axis)
        elif states and sum(examples) > 0:
            # what the clients sent (without personalize_router: everything; with it, no router), by the rule's
            # Flower strategy; the rest of the global state (the pre-trained routers) is kept
            sent = {k: global_state[k] for k in states[0]}
            global_state = {**global_state, **aggregate_replies(fed.aggregation, rnd, sent, [ok[k][2] for k in order],
                                                                local.axis, fed.proximal_mu)}
        ppl = _evaluate(local, global_state, metrics, rnd, "stage1" if stage1 else
                        "after" if rnd == total else "during", by_label=stage1)
        n = sum(examples)
        row = {"round": rnd, **({"stage": 1 if stage1 else 2} if s1 else {}), "sampled": sampled,
               "succeeded": order, "failed": failed, "examples": n,
               "train_loss": (sum(ok[k][1]["train_loss"] * e for k, e in zip(order, examples)) / n) if n else None,
               "usage": _mean_usage(usage, examples),
               "usage_per_client": {str(k): u for k, u in zip(order, usage)},
               "ppl": ppl["overall"], "ppl_average": ppl["average"], "ppl_per_category": ppl["per_category"],
               "bytes_down": bytes_down, "bytes_up": int(sum(ok[k][1]["bytes"] for k in order)),
               "seconds": round(time.perf_counter() - t0, 3)}
        rundir.append_round(run_dir, row)
        if row["train_loss"] is not None:
            metrics.train({"step": rnd, "loss": row["train_loss"], "time": time.time()})
        _client_gates(run_dir, cats, local.num_experts, rnd, {k: ok[k][1]["gates"] for k in order})
        stop = False
        if fed.patience and not stage1:
            if best is None or ppl["average"] < best.ppl:
                best = Best(rnd, ppl["average"], global_state)
            stop = rnd - best.round >= fed.patience and rnd < total
        save_state(run_dir, rnd, global_state, pretrained, best)
        console(_line(row, total))
        if stop:
            metrics.eval({"step": rnd, "stage": "early_stopping", "best_step": best.round, "stopped_step": rnd,
                          "start_step": s1, "trained": True})
            console(f"early stopping: no lower validation perplexity for {fed.patience} round(s); the final "
                    f"mixture is round {best.round}'s ({best.ppl:.3f})")
            break
        if stop_after_round is not None and rnd >= stop_after_round and rnd < total:
            return
    if best is not None:
        global_state = best.state   # the best trained round is the final mixture
    mix.load_adapter_state_dict(global_state, source="final global state")
    with atomic_dir(rundir.final_dir(run_dir)) as tmp:
        mix.save(str(tmp))
    if fed.personalize_router:
        evaluate_clients(grid, local, owners, global_state, total, run_dir, console)


def evaluate_clients(grid: Grid, local: Any, owners: dict[int, int], global_state: dict, rnd: int, run_dir: Path,
                     console: Any) -> None:
    """``personalize_router``: an EVALUATE message to every client with the final global state; each evaluates
    its own router and the global one on its share of the test split and keeps its final mixture on its side
    (``local.evaluate_personal``); the perplexities alone come back, into eval_clients.json."""
    msgs = [Message(RecordDict({"arrays": to_record(global_state), "config": ConfigRecord({"round": rnd})}),
                    dst_node_id=owners[k], message_type=MessageType.EVALUATE) for k in sorted(owners)]
    out: dict[str, Any] = {}
    for reply in grid.send_and_receive(msgs, timeout=local.cfg.federated.round_timeout):
        if reply.has_error():
            log.warning("node %s did not evaluate its own router: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        row = json.loads(str(reply.content["config"]["eval"]))
        if row.get("examples"):
            out[f"client {row.pop('partition-id')}"] = row
    rundir.write_client_eval(run_dir, {"split": "test", "clients": dict(sorted(out.items()))})
    console(f"personal routers: {len(out)} client{'s' if len(out) != 1 else ''} evaluated their own router on "
            "their test share (eval_clients.json)")


def _to_send(cfg: RunConfig) -> dict:
    """The config the clients rebuild (data.path made absolute: a client may run elsewhere)."""
    from mixroute.config import to_dict

    d = to_dict(cfg)
    if d["data"]["path"] and not Path(d["data"]["path"]).is_absolute():
        d["data"]["path"] = str(Path(d["data"]["path"]).resolve())
    d["output_dir"] = str(Path(d["output_dir"]).resolve())   # where simulated clients keep their own state
    return d


def _mean_usage(usage: list[list[float]], examples: list[int]) -> Optional[list[float]]:
    if not usage or sum(examples) == 0:
        return None
    u = torch.tensor(usage, dtype=torch.float64)
    w = torch.tensor(examples, dtype=torch.float64).unsqueeze(1)
    return ((u * w).sum(0) / w.sum()).tolist()


def _evaluate(local: Any, state: dict, metrics: MetricsLogger, rnd: int, stage: str, by_label: bool = False) -> dict:
    """Validation perplexity of the global mixture (a metrics.jsonl eval line, step = round) and gates;
    ``by_label``: each example routed to its label's expert (MoA's stage 1, whose routers are not trained yet)."""
    import contextlib

    mix, cfg = local.mix, local.cfg
    mix.load_adapter_state_dict(state, source=f"round {rnd} global state")
    with mix.routed_by_label() if by_label else contextlib.nullcontext():
        ppl, row, snap = validation_snapshot(local.model, mix, local.data, cfg.eval.batch_size, rnd, stage,
                                             device=local.accelerator.device)
    if by_label:
        row["routing"] = "label"
    metrics.validation(row, snap, local.data.categories)
    return ppl


def _client_gates(run_dir: Path, cats: list[str], num_experts: int, rnd: int, gates: dict[int, list]) -> None:
    doc = rundir.read_client_gates(run_dir) or {"categories": cats, "num_experts": num_experts, "clients": {}}
    for k, flat in gates.items():
        rows = [list(flat[i * num_experts:(i + 1) * num_experts]) for i in range(len(cats))]
        doc["clients"].setdefault(f"client {k}", {})[str(rnd)] = rows
    rundir.write_client_gates(run_dir, doc)


def _line(row: dict, rounds: int) -> str:
    loss = f"{row['train_loss']:.4f}" if row["train_loss"] is not None else "-"
    ppl = f"{row['ppl']:.2f}" if row["ppl"] is not None else "-"
    fail = f" [red]{len(row['failed'])} failed[/red]" if row["failed"] else ""
    return (f"round {row['round']}/{rounds}  clients {len(row['succeeded'])}/{len(row['sampled'])} ok{fail}  "
            f"train loss {loss}  val ppl {ppl}  down {row['bytes_down'] / 1e6:.2f} MB  "
            f"up {row['bytes_up'] / 1e6:.2f} MB  {row['seconds']:.1f}s")


def _console(enabled: bool) -> Any:
    from rich.console import Console

    con = Console(highlight=False, soft_wrap=True)
    return (lambda text: con.print(text)) if enabled else (lambda text: None)


# ------------------------------------------------------------------ the apps
def make_app(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, stop_after_round: Optional[int],
             errors: list) -> ServerApp:
    """A ServerApp for the simulation runtime; an exception is kept in ``errors`` for the runner to raise."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, run_dir, resume, progress, stop_after_round)
        except BaseException as e:  # the simulation runtime only logs it
            errors.append(e)
            raise

    return app


app = ServerApp()


@app.main()
def deployment_main(grid: Grid, context: Context) -> None:
    """Deployment entry point: run config keys ``config`` (YAML path) and ``run-dir`` (flwr run --run-config)."""
    from mixroute.config import load_config

    rc = context.run_config
    if "config" not in rc and "run-dir" not in rc:
        raise ConfigError("pass --run-config \"config='configs/fed_mop_skew.yaml' run-dir='runs/x'\"")
    run_dir = Path(str(rc.get("run-dir", "")))
    resume = rundir.is_run_dir(run_dir) and (rundir.federated_dir(run_dir) / STATE).is_file()
    if resume:
        cfg = rundir.read_config(run_dir)
    else:
        overrides = [s for s in str(rc.get("overrides", "")).split() if s]
        cfg = load_config(str(rc["config"]), overrides)
        rule_for(cfg.federated.aggregation)
        if not str(run_dir):
            run_dir = Path(cfg.output_dir)
        cfg.output_dir = str(run_dir)
        prepare(cfg, run_dir)
    serve(grid, cfg, run_dir, resume=resume, progress=True)


def prepare(cfg: RunConfig, run_dir: Path) -> None:
    """config.yaml, data_report.json and partition.json of a new run directory."""
    from mixroute.data import RunData, partition_train
    from mixroute.models import load_tokenizer

    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(run_dir, cfg)
    data = RunData.build(cfg, load_tokenizer(cfg.model.name))
    rundir.write_data_report(run_dir, data.report)
    part = partition_train(cfg.federated, [e["task_id"] for e in data.examples["train"]], len(data.categories))
    rundir.write_partition(run_dir, part.table(data.categories))
