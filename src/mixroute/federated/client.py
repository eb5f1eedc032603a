"""The Flower ``ClientApp``: each SuperNode holds one partition (node config ``partition-id`` /
``num-partitions``), loads the frozen base once per process and keeps it; per round it loads the global adapter
state, trains ``federated.local_steps`` steps on its partition and replies with its adapter state only (an
``ArrayRecord``) plus metrics (``num-examples``, ``train_loss``, per-expert ``usage``, per-category ``gates``)."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mixroute.federated.payload import from_record, num_bytes, to_record

app = ClientApp()
_CACHE: dict[str, Any] = {}  # config text -> Local: the base model is loaded once per process


def local_for(cfg_text: str) -> Any:
    if cfg_text not in _CACHE:
        import yaml

        from mixroute.config import RunConfig, from_dict
        from mixroute.federated.local import setup

        _CACHE.clear()
        _CACHE[cfg_text] = setup(from_dict(RunConfig, yaml.safe_load(cfg_text)))
    return _CACHE[cfg_text]


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise RuntimeError("this SuperNode has no partition-id in its node config; start it with "
                           "--node-config 'partition-id=K num-partitions=N'")
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds and how many examples it has (the server maps partitions to nodes)."""
    local = local_for(str(msg.content["config"]["cfg"]))
    k = partition_id(context)
    n = len(local.part.clients[k]) if k < len(local.part.clients) else 0
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": k, "num-examples": n})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from mixroute.federated.local import train_round

    conf = msg.content["config"]
    local = local_for(str(conf["cfg"]))
    rnd, k = int(conf["round"]), partition_id(context)
    if k >= len(local.part.clients):
        raise RuntimeError(f"partition-id {k} but federated.clients is {len(local.part.clients)}")
    if f"{rnd}:{k}" in [str(x) for x in local.cfg.federated.inject_failures]:
        raise RuntimeError(f"injected failure of client {k} in round {rnd} (federated.inject_failures)")
    state, metrics = train_round(local, k, from_record(msg.content["arrays"]), rnd)
    gates = metrics.pop("gates")
    out = {"partition-id": k, "num-examples": int(metrics["num-examples"]), "train_loss": float(metrics["train_loss"]),
           "usage": [float(u) for u in metrics["usage"]], "steps": int(metrics["steps"]),
           "bytes": num_bytes(state), "gates": [float(g) for row in gates for g in row]}
    return Message(RecordDict({"arrays": to_record(state), "metrics": MetricRecord(out),
                               "config": ConfigRecord({"round": rnd})}), reply_to=msg)
