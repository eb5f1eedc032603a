"""The Flower ``ClientApp``: each SuperNode holds one partition (node config ``partition-id`` /
``num-partitions``). The server's QUERY at the start of a run carries the run's config: the node keeps it in its
Flower context (``context.state``), so training messages carry only the round, the partition and the global
adapter state. Per round a node loads the global adapter state, trains ``federated.local_steps`` steps on its
partition and replies with its adapter state only (an ``ArrayRecord``) plus metrics (``num-examples``,
``train_loss``, per-expert ``usage``, per-category ``gates``). A run whose mixture has a label-aligned router
starts with round 0, ``phase: pretrain``: each node fits the routers alone on its own labels and replies with
the router tensors only (``local.pretrain_round``). With ``personalize_router`` a node keeps its own router
in its own directory (node config ``client-dir``; in a simulation RUN_DIR/clients/client-<k>): it puts it in
place of the global one it is sent, trains it, and replies without it, so it never reaches the server; after
the last round an EVALUATE message has it compare its own router with the global one on its test share. MoA
starts with rounds of stage 1 (``phase: stage1``): the node trains the experts of the categories it holds,
each sequence routed to its label's expert, and replies with those experts' slices only
(``local.stage1_round``); the pre-training round follows them.

The work of every message is ``handle`` on plain values. In a simulation it runs in the client's Ray worker,
which keeps the base model loaded across rounds. In deployment mode a SuperNode starts a fresh ClientApp
process per message, so ``handle`` runs in a node-local worker process instead, started on the first message
and reached over a Unix socket (``federated.worker``): the base model is loaded once per node and run."""

from __future__ import annotations

import functools
import json
from typing import Any, Optional

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from mixroute.federated import worker
from mixroute.federated.payload import from_record, num_bytes, to_record

app = ClientApp()
CONFIG = "mixroute"   # context.state key of the run's config (a ConfigRecord holding its YAML)


@functools.lru_cache(maxsize=1)   # the frozen base model is loaded once per process, not once per message
def local_for(cfg_text: str) -> Any:
    import yaml

    from mixroute.config import RunConfig, from_dict
    from mixroute.federated.local import setup

    return setup(from_dict(RunConfig, yaml.safe_load(cfg_text)))


def run_config(context: Context) -> str:
    if CONFIG not in context.state:
        raise RuntimeError("this node has no run config: the server sends it once, in the QUERY that starts a run "
                           "(a node that joined after the start, or lost its state, is left out of the run)")
    return str(context.state[CONFIG]["cfg"])


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("this SuperNode has no partition-id in its node config; start it with "
                           "--node-config 'partition-id=K num-partitions=N'")
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds and how many examples it has (the server maps partitions to nodes)."""
    cfg_text = str(msg.content["config"]["cfg"])
    context.state[CONFIG] = ConfigRecord({"cfg": cfg_text})
    return _answer(msg, context, "query", cfg_text)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A round: stage 1 (MoA), router pre-training, or local training (``handle``)."""
    return _answer(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """``personalize_router``, after the last round: this client's own router and the global one on its share
    of the test split; its final mixture is saved in its own directory; perplexities alone go back."""
    return _answer(msg, context, "evaluate")


def _answer(msg: Message, context: Context, op: str, cfg_text: Optional[str] = None) -> Message:
    """Run ``handle`` here, or (deployment mode) in this node's worker process, which keeps the base loaded
    across messages (``federated.worker``); wrap its answer as the reply."""
    cfg_text = cfg_text or run_config(context)
    k = partition_id(context)
    conf = {key: msg.content["config"][key] for key in msg.content["config"]} if op != "query" else {}
    arrays = from_record(msg.content["arrays"]) if op != "query" else {}
    node = {key: context.node_config[key] for key in context.node_config}
    if worker.wanted(node):
        arrays, metrics, config = worker.call(context.node_id, cfg_text, op, k, conf, arrays, node)
    else:
        arrays, metrics, config = handle(op, cfg_text, k, conf, arrays, node)
    content = {}
    if op == "train":
        content["arrays"] = to_record(arrays)
    if metrics:
        content["metrics"] = MetricRecord(metrics)
    if config:
        content["config"] = ConfigRecord(config)
    return Message(RecordDict(content), reply_to=msg)


def handle(op: str, cfg_text: str, k: int, conf: dict, arrays: dict[str, Tensor],
           node: dict) -> tuple[dict[str, Tensor], dict, dict]:
    """One message's work on plain values (the same in this process and in a worker): (arrays, metrics,
    config) of the reply."""
    if node.get("threads"):
        # several nodes on one machine must split its cores: with two threads each on two cores, a client's
        # local training took 55-78 s instead of 6-11 s (the simulation's Ray workers get cpus_per_client threads)
        import torch

        torch.set_num_threads(max(1, int(node["threads"])))
    local = local_for(cfg_text)
    if k >= len(local.part.clients):
        raise RuntimeError(f"partition-id {k} but federated.clients is {len(local.part.clients)}")
    if op == "query":
        return {}, {"partition-id": k, "num-examples": len(local.part.clients[k])}, {}
    mine = _personal(local, k, node)
    rnd = int(conf["round"])
    if op == "evaluate":
        from mixroute.federated.local import client_dir, evaluate_personal

        own = mine.load(before=rnd + 1) if mine is not None else None
        row = evaluate_personal(local, k, arrays, own, client_dir(local.cfg, k, node.get("client-dir")))
        return {}, {}, {"eval": json.dumps(row)}
    if conf.get("phase") == "pretrain":
        return _pretrain(local, k, rnd, arrays, mine)
    return _train(local, k, rnd, conf, arrays, mine)


def _train(local: Any, k: int, rnd: int, conf: dict, start: dict[str, Tensor],
           mine: Any) -> tuple[dict[str, Tensor], dict, dict]:
    from mixroute.federated.aggregate import client_state, split_routers
    from mixroute.federated.local import stage1_round, train_round
    from mixroute.federated.payload import is_router

    extra = {}
    if conf.get("phase") == "stage1":
        state, metrics = stage1_round(local, k, start, rnd)
        extra = {"experts": [int(e) for e in metrics["experts"]],
                 "expert-examples": [int(c) for c in metrics["expert-examples"]]}
    else:
        if mine is not None:   # this client's own router replaces the global one it was sent
            start = client_state(start, mine.load(before=rnd))
        state, metrics = train_round(local, k, start, rnd, proximal=bool(conf.get("proximal", False)))
        if mine is not None:   # ... and stays here: only the rest goes back
            state, routers = split_routers(state, is_router)
            mine.save(rnd, routers)
    gates = metrics.pop("gates")
    out = {"partition-id": k, "num-examples": int(metrics["num-examples"]), "train_loss": float(metrics["train_loss"]),
           "usage": [float(u) for u in metrics["usage"]], "steps": int(metrics["steps"]),
           "bytes": num_bytes(state), "gates": [float(g) for row in gates for g in row], **extra}
    return state, out, {"round": rnd}


def _pretrain(local: Any, k: int, rnd: int, start: dict[str, Tensor],
              mine: Any) -> tuple[dict[str, Tensor], dict, dict]:
    """The router pre-training round (after round ``rnd``: 0, or MoA's last stage-1 round): router tensors only
    travel back, for the global router; with personal routers the client also keeps them as its own."""
    from mixroute.federated.local import pretrain_round

    routers, metrics = pretrain_round(local, k, start)
    if mine is not None:
        mine.save(rnd, routers)
    return routers, {"partition-id": k, "bytes": num_bytes(routers), **metrics}, {"round": rnd}


def _personal(local: Any, k: int, node: dict) -> Any:
    """This client's store of its own routers (None without ``personalize_router``)."""
    from mixroute.federated.local import PersonalRouters, client_dir

    if not local.cfg.federated.personalize_router:
        return None
    return PersonalRouters(client_dir(local.cfg, k, node.get("client-dir")) / "personal")
