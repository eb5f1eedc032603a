"""Federated MoA with its stage 1: clients train the experts of the categories they hold (each sequence routed to
its label's expert, routers not run) and send only those experts; each expert is averaged over the clients that
hold its category, weighted by their examples of it; the routers are pre-trained after stage 1; resume after a
stage-1 round is identical. Pieces by hand, then a real Flower simulation (Ray, 2 clients, tiny model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mixroute import rundir
from mixroute.config import MixtureConfig, load_config
from mixroute.experts import expert_rank
from mixroute.federated.aggregate import per_category_average
from mixroute.federated.payload import expand_experts, trim_experts
from mixroute.mixture import Mixture
from mixroute.models import tiny_model

OVERRIDES = ["model.name=tiny", "data.path=null", "data.synthetic_per_task=24", "data.max_length=64",
             "data.categories=[acronym,arithmetic,date_reformat,word_count]", "data.template=plain",
             "train.method=moa", "train.lr=0.003", "train.stage1_lr=0.01", "train.batch_size=4",
             "mixture.router_scope=global", "mixture.gate_pretrain_steps=20", "eval.max_eval=2", "eval.batch_size=8",
             "federated.clients=2", "federated.stage1_rounds=1", "federated.rounds=1", "federated.local_steps=2",
             "federated.partition=mop_skew", "federated.partition_total=null", "federated.round_timeout=120"]


def _axis(e, r):
    """LoRA's layout as ``LoraBank.expert_axes`` declares it: A's rows and B's columns in blocks of r."""
    return lambda key, shape: {"A": (0, r), "B": (1, r)}.get(key.rsplit(".", 1)[1]) if key.startswith(
        "experts.") else None


def test_trimmed_payload_round_trips_and_the_stage1_average_weights_by_category_counts():
    e, r = 3, 2
    prev = {"experts.x.A": torch.zeros(e * r, 4), "experts.x.B": torch.zeros(5, e * r),
            "routers.global.proj.weight": torch.full((e, 4), 7.0)}
    a = {"experts.x.A": torch.ones(e * r, 4), "experts.x.B": torch.ones(5, e * r)}
    b = {"experts.x.A": 3 * torch.ones(e * r, 4), "experts.x.B": 3 * torch.ones(5, e * r)}
    ta, tb = trim_experts(a, [0, 1], _axis(e, r)), trim_experts(b, [1], _axis(e, r))
    assert ta["experts.x.A"].shape == (2 * r, 4) and tb["experts.x.B"].shape == (5, r)
    assert trim_experts(a, [], _axis(e, r)) == {}
    back = expand_experts(ta, [0, 1], prev, _axis(e, r))
    assert torch.equal(back["experts.x.A"][: 2 * r], torch.ones(2 * r, 4)) and back["experts.x.A"][2 * r:].abs().sum() == 0
    out = per_category_average(prev, [ta, tb], [[0, 1], [1]], [[10, 30], [10]], e, _axis(e, r))
    # expert 0: client a alone; expert 1: (30 * 1 + 10 * 3) / 40 = 1.5; expert 2: nobody trained it, kept
    assert torch.allclose(out["experts.x.A"][:r], torch.ones(r, 4))
    assert torch.allclose(out["experts.x.A"][r:2 * r], torch.full((r, 4), 1.5))
    assert torch.allclose(out["experts.x.B"][:, r:2 * r], torch.full((5, r), 1.5))
    assert out["experts.x.A"][2 * r:].abs().sum() == 0
    assert torch.equal(out["routers.global.proj.weight"], prev["routers.global.proj.weight"])


@torch.no_grad()
def test_routing_by_label_is_forcing_each_sequence_to_its_labels_expert_without_running_the_router():
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="task", num_experts=3, num_tasks=3,
                                                        experts={"lora": {"rank": 4}}))
    for p in mix.experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(10, 3000, (3, 7), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 0, 1])
    with mix.routed_by_label():
        ours = mix(input_ids=ids, task_ids=labels).logits
        assert not mix.context.router_logits, "a router ran inside routed_by_label"
    mix.force(F.one_hot(labels, 3).float())
    try:
        forced = mix(input_ids=ids).logits
    finally:
        mix.force(None)
    torch.testing.assert_close(ours, forced)
    with pytest.raises(ValueError, match="task_ids below the number of experts"):
        with mix.routed_by_label():
            mix(input_ids=ids, task_ids=torch.tensor([0, 1, 5]))


def test_a_client_trains_and_sends_only_the_experts_of_the_categories_it_holds(tmp_path):
    from mixroute.federated.local import setup, stage1_round

    local = setup(load_config(None, OVERRIDES + [f"output_dir={tmp_path}"]))
    train = local.data.examples["train"]
    mine = [i for i in local.part.clients[0] if train[i]["task_id"] in (0, 2)]   # client 0 without categories 1, 3
    local = dataclasses.replace(local, part=dataclasses.replace(local.part, clients=[mine, local.part.clients[1]]))
    start = {k: v.clone() for k, v in local.mix.adapter_state_dict().items() if k.startswith("experts.")}
    sent, metrics = stage1_round(local, 0, start, 1)
    assert metrics["experts"] == [0, 2] and sum(metrics["expert-examples"]) == len(mine)
    assert not any(k.startswith("routers.") for k in sent)
    r = expert_rank(local.mix.cfg)
    for key, t in sent.items():
        ax = local.axis(key, tuple(start[key].shape))
        assert t.shape[ax[0]] == 2 * r, key
    full = expand_experts(sent, [0, 2], start, local.axis)
    moved = {e: any(not torch.equal(*(t.split(r, dim=local.axis(k, tuple(t.shape))[0])[e] for t in (full[k], start[k])))
                    for k in sent) for e in (0, 2)}
    assert all(moved.values()), "an expert of a held category did not train"


@pytest.mark.slow
def test_federated_moa_runs_stage1_then_pretrains_routers_and_resumes_identically(tmp_path):
    from typer.testing import CliRunner

    from mixroute.cli import app
    from mixroute.federated import run

    full = run(load_config(None, OVERRIDES + [f"output_dir={tmp_path / 'full'}"]), progress=False)
    rows = rundir.read_rounds(full)
    assert [r["stage"] for r in rows] == [1, 2]
    # stage 1 sends experts only: fewer bytes than the whole adapter state of stage 2
    assert rows[0]["bytes_up"] < rows[1]["bytes_up"]
    evals = [m for m in rundir.read_metrics(full) if m.get("stage") == "router_pretrain"]
    assert len(evals) == 1 and evals[0]["step"] == 1 and evals[0]["val_accuracy"] > 0.25
    stage1_vals = [m for m in rundir.read_metrics(full) if m.get("routing") == "label"]
    assert [m["step"] for m in stage1_vals] == [1]
    before = [m for m in rundir.read_metrics(full) if m.get("step") == 0 and m.get("ppl") is not None]
    assert stage1_vals[-1]["ppl_average"] < before[0]["ppl_average"], "stage 1 did not train the experts"
    # stopped after a stage-1 round, then resumed: the same final weights, one pre-training line
    part = tmp_path / "part"
    (tmp_path / "c.yaml").write_text(f"output_dir: {part}\n")
    res = CliRunner().invoke(app, ["federate", str(tmp_path / "c.yaml"), *OVERRIDES, "--stop-after-round", "1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["federate", "--resume", str(part)])
    assert res.exit_code == 0, res.output
    assert "resuming after round 1" in res.output
    assert len([m for m in rundir.read_metrics(part) if m.get("stage") == "router_pretrain"]) == 1
    from safetensors.torch import load_file

    a = load_file(str(rundir.final_dir(full) / "mixture.safetensors"))
    b = load_file(str(rundir.final_dir(part) / "mixture.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
