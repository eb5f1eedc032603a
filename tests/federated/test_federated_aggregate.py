"""Aggregation rules on hand-built tensors (mixroute.federated.aggregate) and the payload guard."""

from __future__ import annotations

import pytest
import torch

from mixroute.federated.aggregate import aggregate, client_state, fedavg, split_routers
from mixroute.federated.payload import BaseTensorLeak, check_adapter_only, is_router, num_bytes

E, R = 2, 1  # two experts of rank 1


def axis(key, shape):
    """The layouts the banks declare (``expert_axes``): LoRA's A rows and B columns in blocks of R, a prompt
    bank's first dimension; routers are shared."""
    if not key.startswith("experts."):
        return None
    return {"A": (0, R), "B": (1, R), "weight": (0, 1)}.get(key.rsplit(".", 1)[1])


def st(a, b, p, g):
    """A: (E*r, 2), B: (2, E*r), a prompt bank (E, 1, 2), a gate weight (2, 2)."""
    return {"experts.l0.A": torch.tensor(a, dtype=torch.float32), "experts.l0.B": torch.tensor(b, dtype=torch.float32),
            "experts.prompt.weight": torch.tensor(p, dtype=torch.float32),
            "routers.gate.w": torch.tensor(g, dtype=torch.float32)}


S1 = st([[1, 1], [2, 2]], [[1, 2], [1, 2]], [[[1, 1]], [[2, 2]]], [[1, 0], [0, 1]])
S2 = st([[3, 3], [6, 6]], [[3, 6], [3, 6]], [[[3, 3]], [[6, 6]]], [[3, 0], [0, 3]])
PREV = st([[9, 9], [9, 9]], [[9, 9], [9, 9]], [[[9, 9]], [[9, 9]]], [[9, 9], [9, 9]])


def test_fedavg_is_example_weighted():
    out = fedavg([S1, S2], [1, 3])  # (1*x1 + 3*x2) / 4
    assert torch.equal(out["experts.l0.A"], torch.tensor([[2.5, 2.5], [5.0, 5.0]]))
    assert torch.equal(out["routers.gate.w"], torch.tensor([[2.5, 0.0], [0.0, 2.5]]))
    assert torch.equal(aggregate("fedprox", PREV, [S1, S2], [1, 3])["experts.l0.B"], out["experts.l0.B"])


def test_usage_weights_each_expert_by_examples_times_routing_mass():
    # client 1: 1 example, usage (1, 0); client 2: 3 examples, usage (0.5, 0.5)
    out = aggregate("usage", PREV, [S1, S2], [1, 3], [[1.0, 0.0], [0.5, 0.5]], axis)
    # expert 0 weights 1*1=1 and 3*0.5=1.5 -> (1*x1 + 1.5*x2) / 2.5; expert 1 only client 2
    assert torch.allclose(out["experts.l0.A"], torch.tensor([[(1 + 1.5 * 3) / 2.5] * 2, [6.0, 6.0]]))
    assert torch.allclose(out["experts.l0.B"], torch.tensor([[(1 + 1.5 * 3) / 2.5, 6.0]] * 2))
    assert torch.allclose(out["experts.prompt.weight"], torch.tensor([[[(1 + 1.5 * 3) / 2.5] * 2], [[6.0, 6.0]]]))
    # routers and gates: by examples
    assert torch.allclose(out["routers.gate.w"], torch.tensor([[2.5, 0.0], [0.0, 2.5]]))


def test_usage_keeps_the_previous_value_of_an_expert_nobody_used():
    out = aggregate("usage", PREV, [S1, S2], [1, 3], [[1.0, 0.0], [1.0, 0.0]], axis)
    assert torch.allclose(out["experts.l0.A"][0], torch.tensor([2.5, 2.5]))
    assert torch.equal(out["experts.l0.A"][1], PREV["experts.l0.A"][1])
    assert torch.equal(out["experts.l0.B"][:, 1], PREV["experts.l0.B"][:, 1])
    assert torch.equal(out["experts.prompt.weight"][1], PREV["experts.prompt.weight"][1])


def test_no_survivors_keeps_the_previous_global_state():
    out = aggregate("usage", PREV, [], [], [], axis)
    assert all(torch.equal(out[k], PREV[k]) for k in PREV)


def test_personalized_routers_are_split_off_and_put_back_per_client():
    rest, routers = split_routers(S1, is_router)
    assert set(routers) == {"routers.gate.w"} and "routers.gate.w" not in rest
    glob = fedavg([S1, S2], [1, 1])
    mine = client_state(glob, routers)
    assert torch.equal(mine["routers.gate.w"], S1["routers.gate.w"])   # own router
    assert torch.equal(mine["experts.l0.A"], glob["experts.l0.A"])     # global experts


def test_payload_refuses_base_tensors_and_counts_bytes():
    check_adapter_only(S1)
    with pytest.raises(BaseTensorLeak):
        check_adapter_only({**S1, "model.embed_tokens.weight": torch.zeros(3)})
    assert num_bytes(S1) == 4 * (4 + 4 + 4 + 4)


def test_a_new_rule_is_one_registered_function():
    from mixroute.federated.aggregate import RULES, Survivors, register

    @register("test-elementwise-max")
    def _max(r: Survivors):
        return {k: torch.stack([s[k] for s in r.states]).max(0).values for k in r.previous}

    try:
        out = aggregate("test-elementwise-max", PREV, [S1, S2], [1, 3])
        assert torch.equal(out["experts.l0.A"], S2["experts.l0.A"])
        with pytest.raises(ValueError, match="already registered"):
            register("test-elementwise-max")(_max)
    finally:
        del RULES["test-elementwise-max"]


def test_an_unknown_rule_names_the_registered_ones_before_a_federated_run_starts(tmp_path):
    from mixroute.config import ConfigError, load_config
    from mixroute.federated import run
    from mixroute.federated.aggregate import rule_for

    assert rule_for("fedprox").proximal and not rule_for("fedavg").proximal and not rule_for("usage").proximal
    with pytest.raises(ConfigError, match="federated.aggregation: 'fedmedian' is not valid; expected one of "
                                          "fedavg, fedprox, usage"):
        aggregate("fedmedian", PREV, [S1], [1])
    cfg = load_config(None, ["model.name=tiny", "federated.aggregation=fedmedian", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="fedmedian"):
        run(cfg, progress=False)
    assert not (tmp_path / "r").exists()   # refused before a run directory was made


def _reply(state, n, usage):
    """A client's reply as the server receives it (a Flower Message with its metadata)."""
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    from mixroute.federated.payload import to_record

    meta = Metadata(run_id=1, message_id="m", src_node_id=n, dst_node_id=0, reply_to_message_id="q", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    return Message(RecordDict({"arrays": to_record(state), "metrics": MetricRecord(
        {"num-examples": n, "usage": [float(u) for u in usage], "train_loss": 1.0})}), metadata=meta)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "usage"])
def test_each_rule_runs_as_a_flower_strategy_with_the_rules_result(name):
    """The server aggregates through flwr.serverapp.strategy (FedAvg, FedProx, a FedAvg subclass for the rest):
    the same tensors as the rule's pure function on the same replies."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    from mixroute.federated.strategies import RuleStrategy, aggregate_replies, strategy_for

    usage = [[1.0, 0.0], [0.25, 0.75]]
    got = aggregate_replies(name, 1, PREV, [_reply(S1, 10, usage[0]), _reply(S2, 30, usage[1])], axis, 0.01)
    want = aggregate(name, PREV, [S1, S2], [10, 30], usage, axis)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    strategy = strategy_for(name, PREV, axis, 0.01)
    assert isinstance(strategy, FedAvg)
    assert isinstance(strategy, {"fedavg": FedAvg, "fedprox": FedProx, "usage": RuleStrategy}[name])
    if name == "usage":   # an expert nobody used keeps its previous value, which FedAvg alone would not
        kept = aggregate_replies(name, 1, PREV, [_reply(S1, 10, [1, 0]), _reply(S2, 30, [1, 0])], axis)
        assert torch.equal(kept["experts.l0.A"][1], PREV["experts.l0.A"][1])
