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
the last round an EVALUATE message has it compare its own router with the global one on its test share. MoA starts with rounds of stage 1 (``phase: stage1``): the
node trains the experts of the categories it holds, each sequence routed to its label's expert, and replies
with those experts' slices only (``local.stage1_round``); the pre-training round follows them."""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
    local = local_for(cfg_text)
    k = partition_id(context)
    n = len(local.part.clients[k]) if k < len(local.part.clients) else 0
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": k, "num-examples": n})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from mixroute.federated.aggregate import client_state, split_routers
    from mixroute.federated.local import stage1_round, train_round
    from mixroute.federated.payload import is_router

    conf = msg.content["config"]
    local = local_for(run_config(context))
    rnd, k = int(conf["round"]), partition_id(context)
    if k >= len(local.part.clients):
        raise RuntimeError(f"partition-id {k} but federated.clients is {len(local.part.clients)}")
    if conf.get("phase") == "pretrain":
        return _pretrain(msg, local, k, rnd, _personal(local, k, context))
    extra = {}
    if conf.get("phase") == "stage1":
        state, metrics = stage1_round(local, k, from_record(msg.content["arrays"]), rnd)
        extra = {"experts": [int(e) for e in metrics["experts"]],
                 "expert-examples": [int(c) for c in metrics["expert-examples"]]}
    else:
        start = from_record(msg.content["arrays"])
        mine = _personal(local, k, context)
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
    return Message(RecordDict({"arrays": to_record(state), "metrics": MetricRecord(out),
                               "config": ConfigRecord({"round": rnd})}), reply_to=msg)


def _pretrain(msg: Message, local: Any, k: int, rnd: int, mine: Any) -> Message:
    """The router pre-training round (after round ``rnd``: 0, or MoA's last stage-1 round): router tensors only
    travel back, for the global router; with personal routers the client also keeps them as its own."""
    from mixroute.federated.local import pretrain_round

    routers, metrics = pretrain_round(local, k, from_record(msg.content["arrays"]))
    if mine is not None:
        mine.save(rnd, routers)
    out = {"partition-id": k, "bytes": num_bytes(routers), **metrics}
    return Message(RecordDict({"arrays": to_record(routers), "metrics": MetricRecord(out),
                               "config": ConfigRecord({"round": rnd})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """``personalize_router``, after the last round: this client's own router and the global one on its share
    of the test split; its final mixture is saved in its own directory; perplexities alone go back."""
    import json

    from mixroute.federated.local import client_dir, evaluate_personal

    local = local_for(run_config(context))
    k, rnd = partition_id(context), int(msg.content["config"]["round"])
    mine = _personal(local, k, context)
    own = mine.load(before=rnd + 1) if mine is not None else None
    row = evaluate_personal(local, k, from_record(msg.content["arrays"]), own,
                            client_dir(local.cfg, k, context.node_config.get("client-dir")))
    return Message(RecordDict({"config": ConfigRecord({"eval": json.dumps(row)})}), reply_to=msg)


def _personal(local: Any, k: int, context: Context) -> Any:
    """This client's store of its own routers (None without ``personalize_router``)."""
    from mixroute.federated.local import PersonalRouters, client_dir

    if not local.cfg.federated.personalize_router:
        return None
    return PersonalRouters(client_dir(local.cfg, k, context.node_config.get("client-dir")) / "personal")
