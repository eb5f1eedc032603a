"""The aggregation rules as Flower strategies (``flwr.serverapp.strategy``): what the server aggregates a round's
replies with.

``fedavg`` is Flower's ``FedAvg`` and ``fedprox`` its ``FedProx`` (whose server side is FedAvg's; each client
adds the proximal term, ``federated.proximal_mu``), both weighting by the replies' ``num-examples``. Every
other rule registered in ``aggregate.RULES`` (``usage``, and any rule a user registers) runs as ``RuleStrategy``,
a ``FedAvg`` whose ``aggregate_train`` applies the rule's pure function to the replies: Flower checks the
replies (one ArrayRecord and one MetricRecord each, the same keys) and averages their metrics either way.

The server keeps its own round loop (sampling, failures, MoA's stage 1, router pre-training, checkpoints and
resume, which ``Strategy.start`` does not have) and calls ``aggregate_train`` once per round.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx
from torch import Tensor

from mixroute.federated.aggregate import Axis, Rule, Survivors, rule_for
from mixroute.federated.payload import from_record, to_record

# the server samples clients itself: Flower's node minimums are not used
_COMMON = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1,
           "weighted_by_key": "num-examples"}


class RuleStrategy(FedAvg):
    """A Flower ``FedAvg`` whose arrays are aggregated by a registered rule (``aggregate.Rule``) over the
    previous global state, the replies' states, example counts and per-expert ``usage``."""

    def __init__(self, rule: Rule, previous: dict[str, Tensor], axis: Axis, **kwargs: Any) -> None:
        super().__init__(**{**_COMMON, **kwargs})
        self.rule, self.previous, self.axis = rule, previous, axis

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        metrics = [m.content["metrics"] for m in valid]
        usage = [list(x["usage"]) for x in metrics] if all("usage" in x for x in metrics) else None
        state = self.rule.fn(Survivors(self.previous, [from_record(m.content["arrays"]) for m in valid],
                                       [int(x["num-examples"]) for x in metrics], usage, self.axis))
        return to_record(state), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


def strategy_for(name: str, previous: dict[str, Tensor], axis: Axis, proximal_mu: float = 0.0) -> FedAvg:
    """The Flower strategy of ``federated.aggregation`` ``name`` for one round (``previous``: the global state
    the round started from, the tensors the clients sent)."""
    rule = rule_for(name)   # an unknown name: the ConfigError listing the registered ones
    if name == "fedavg":
        return FedAvg(**_COMMON)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **_COMMON)
    return RuleStrategy(rule, previous, axis)


def aggregate_replies(name: str, rnd: int, previous: dict[str, Tensor], replies: list[Message], axis: Axis,
                      proximal_mu: float = 0.0) -> dict[str, Tensor]:
    """The new values of the tensors the clients sent, by the strategy of rule ``name``."""
    arrays, _ = strategy_for(name, previous, axis, proximal_mu).aggregate_train(rnd, replies)
    if arrays is None:
        raise RuntimeError(f"aggregation {name!r} returned nothing for round {rnd} from {len(replies)} replies")
    return {k: v.to(previous[k].dtype) for k, v in from_record(arrays).items()}
