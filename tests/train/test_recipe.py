"""The routed-method recipe: each test would have caught one defect that made MoA and MoP lose by construction
(stage 2 returning its untrained start, routers reading sink-dominated raw features, accuracy reported as a
vote over layers instead of what ran, a first optimizer step at lr 0, gate pre-training on a few batches)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mixroute.config import MixtureConfig, load_config
from mixroute.evaluate import evaluate_run, training_outcome
from mixroute.mixture import Mixture
from mixroute.routers.base import pool_prompt, sink_free
from mixroute.rundir import read_metrics
from mixroute.train import train

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- features
def test_sink_positions_are_left_out_of_the_pool():
    hidden = torch.ones(2, 5, 4)
    hidden[:, 0] = 1000.0                       # the first token: a sink
    hidden[1, 3] = 500.0                        # an outlier later in the sequence
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    keep = sink_free(hidden, mask)
    assert keep.tolist() == [[False, True, True, True, False], [False, True, True, False, True]]
    assert torch.allclose(pool_prompt(hidden, mask), torch.ones(2, 4))
    left = torch.tensor([[0, 0, 1, 1, 1]]).bool()   # left padding: the first *attended* token is the sink
    assert sink_free(torch.ones(1, 5, 4), left).tolist() == [[False, False, False, True, True]]


@pytest.mark.integration
def test_first_routing_cross_entropy_on_smollm2_is_a_uniform_guess(smollm):
    """On the real model a fresh task router starts at ln E (the old raw-feature router started near 16)."""
    import copy

    from mixroute.data.synthetic import synthetic_suite

    model, tok = smollm
    recs = synthetic_suite(per_task=4, seed=0)
    cats = sorted({r.category for r in recs})
    mix = Mixture.attach(copy.deepcopy(model), MixtureConfig(router="task", num_experts=len(cats), num_tasks=len(cats),
                                                             experts={"lora": {"rank": 2}}))
    enc = tok([r.instruction for r in recs], return_tensors="pt", padding=True)
    labels = torch.tensor([cats.index(r.category) for r in recs])
    with torch.no_grad():
        out = mix(enc.input_ids, attention_mask=enc.attention_mask, task_ids=labels)
    ces = [float(torch.nn.functional.cross_entropy(lg, labels)) for lg in out.router_logits.values()]
    assert all(abs(ce - math.log(len(cats))) < 0.1 * math.log(len(cats)) for ce in ces), ces


# ------------------------------------------------------------------------------------------- pre-pass
def test_global_router_decides_once_from_the_frozen_base(fresh_tiny):
    """router_scope='global' with router_layer=1: the decision is the router applied to the base's hidden states
    entering layer 1 with no expert applied, it is used at every layer, and generation keeps it."""
    model, tok = fresh_tiny
    mix = Mixture.attach(model, MixtureConfig(router="task", num_experts=3, num_tasks=3, router_scope="global",
                                              router_layer=1, experts={"lora": {"rank": 2}}))
    with torch.no_grad():
        for p in mix.experts.parameters():
            p.normal_(0, 0.5)                  # experts that change what layer 1 sees, if they ran below it
        mix.routers["global"].proj.weight.normal_(0, 1.0)
    ids = torch.randint(100, 3000, (4, 7), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    from mixroute.arch import layer_input

    mix.eval()
    with torch.no_grad():
        base_h = layer_input(mix.detach(), 1, kwargs={"input_ids": ids, "attention_mask": am})
        mix2 = Mixture.attach(model, mix.cfg)
        mix2.load_adapter_state_dict(mix.adapter_state_dict())
        mix2.eval()
        expected = mix2.routers["global"].logits(pool_prompt(base_h, am.bool())).argmax(-1)
        out = mix2(ids, attention_mask=am)
    assert list(out.routing) == ["global"]
    assert out.routing["global"].argmax(-1).tolist() == expected.tolist()
    gen = mix2.generate(input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3
    assert mix2.chosen_experts() == expected.tolist()
    assert mix2.applied_experts() == {"global": expected.tolist()}


def test_router_layer_out_of_range_is_a_config_error(fresh_tiny):
    from mixroute.config import ConfigError

    model, _ = fresh_tiny
    with pytest.raises(ConfigError, match="router_layer=5 is out of range"):
        Mixture.attach(model, MixtureConfig(router="task", num_experts=2, num_tasks=2, router_scope="global",
                                            router_layer=5))


def test_applied_experts_are_what_each_layer_ran(fresh_tiny):
    """Per-layer routers that disagree: applied_experts gives each layer's decision as its LoRA bank read it."""
    model, _ = fresh_tiny
    mix = Mixture.attach(model, MixtureConfig(router="task", num_experts=3, num_tasks=3, experts={"lora": {"rank": 2}}))
    with torch.no_grad():
        for r in mix.routers.values():
            r.proj.weight.normal_(0, 1.0)
    seen: dict[str, list[int]] = {}
    ids = torch.randint(100, 3000, (6, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mix(ids)
    for key in mix.routers:
        seen[key] = mix.context.routes[key].index.tolist()
    assert mix.applied_experts() == seen
    assert len({tuple(v) for v in seen.values()}) > 1      # they do disagree: a vote would hide it
    per_seq = torch.tensor(list(seen.values())).T
    assert mix.chosen_experts() == [int(torch.bincount(r).argmax()) for r in per_seq]


# ------------------------------------------------------------------------------------------- schedule
def test_first_optimizer_step_trains():
    from mixroute.config import RunConfig
    from mixroute.train.centralized import build_optimizer

    cfg = RunConfig()
    cfg.train.lr, cfg.train.router_lr, cfg.train.warmup_steps = 1e-3, 1e-2, 4
    experts, routers = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt, sched = build_optimizer([experts, routers], cfg, 20, [routers])
    assert [g["name"] for g in opt.param_groups] == ["experts", "routers"]
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([1e-3 / 5, 1e-2 / 5])     # step 1 trains
    assert lrs[4] == pytest.approx([1e-3, 1e-2])             # the peak right after warm-up
    assert lrs[-1][0] < 1e-4


def test_router_and_expert_gradients_are_clipped_separately():
    from accelerate import Accelerator

    from mixroute.train.loop import train_step

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.r = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))

        def forward(self, x, attention_mask=None, logits_for="labels"):
            from types import SimpleNamespace

            loss = (self.e * x).sum() + 1000 * (self.r * x).sum()     # the router's gradient is 1000x
            return SimpleNamespace(loss=loss, lm_loss=loss, aux_losses={})

    toy = Toy()
    opt = torch.optim.SGD([{"name": "experts", "params": [toy.e]}, {"name": "routers", "params": [toy.r]}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = train_step(toy, [{"x": torch.ones(1), "attention_mask": torch.ones(1)}], opt, sched, Accelerator(cpu=True),
                       clip_grad=1.0, step=1)
    assert stats.grad_norm == pytest.approx(1.0) and stats.router_grad_norm == pytest.approx(1000.0)
    assert toy.e.item() == pytest.approx(0.9)     # one joint norm would have scaled it to 1 - 0.1 / 1000


# ------------------------------------------------------------------------------------------- stage 2
def test_training_outcome_flags_a_run_that_kept_its_start():
    kept = [{"stage": "early_stopping", "best_step": 40, "start_step": 40, "stopped_step": 60}]
    assert training_outcome(kept)["trained"] is False
    moved = [{"stage": "early_stopping", "best_step": 50, "start_step": 40, "stopped_step": 60, "trained": True}]
    assert training_outcome(moved)["trained"] is True
    stage1_only = [{"stage": "early_stopping", "best_step": 4, "category": "a"}]
    assert training_outcome(stage1_only) is None
    # a start whose routers pre-training fitted is told apart from one whose routers are as initialised
    assert training_outcome(kept)["routers_pretrained"] is False
    fitted = [{"stage": "router_pretrain", "best_epoch": 2}, *kept]
    assert training_outcome(fitted) == {**training_outcome(kept), "routers_pretrained": True}
    unmoved = [{"stage": "router_pretrain", "best_epoch": 0}, *kept]
    assert training_outcome(unmoved)["routers_pretrained"] is False


def test_compare_names_say_how_a_run_kept_its_start():
    from mixroute.report.compare import KEPT_PRETRAINED, NOT_TRAINED, _group_names

    evals = [{"run": "a", "training": {"trained": False, "routers_pretrained": True}},
             {"run": "b", "training": {"trained": False, "routers_pretrained": False}},
             {"run": "c", "training": {"trained": True}}, {"run": "d"}]
    assert _group_names(evals) == ["a" + KEPT_PRETRAINED, "b" + NOT_TRAINED, "c", "d"]


@pytest.fixture(scope="module")
def moa_run(tmp_path_factory):
    """MoA on the tiny model and the synthetic suite, whose tasks a router can tell apart from the prompt."""
    out = tmp_path_factory.mktemp("recipe") / "moa"
    cfg = load_config(ROOT / "configs" / "moa.yaml", [
        "model.name=tiny", "data.synthetic_per_task=24", "data.max_length=48", "train.max_steps=12",
        "train.stage1_steps=4", "train.lr=0.003", "train.stage1_lr=0.003", "train.eval_every=4",
        "train.patience=2", "train.warmup_steps=1", "train.save_every=0", "eval.max_eval=6",
        "mixture.gate_pretrain_steps=300", "mixture.gate_pretrain_lr=0.01", f"output_dir={out}"])
    return train(cfg, progress=False)


def test_stage2_starts_from_pretrained_routers_and_improves_on_its_start(moa_run):
    metrics = read_metrics(moa_run)
    pre = [m for m in metrics if m.get("stage") == "router_pretrain"]
    assert len(pre) == 1 and pre[0]["train_examples"] > 100 and pre[0]["val_accuracy"] >= 0.95
    first_lr = next(m["lr"] for m in metrics if "lr" in m)
    assert first_lr > 0
    after_pre = metrics[metrics.index(pre[0]) + 1:]
    before = next(m for m in after_pre if "ppl" in m and "category" not in m and "loss" not in m)
    assert before["step"] == pre[0]["step"]         # validated before stage 2's first step
    stop = [m for m in metrics if m.get("stage") == "early_stopping" and "category" not in m][-1]
    assert stop["trained"] is True and stop["best_ppl"] < before["ppl_average"]
    result = evaluate_run(moa_run, max_generate=0, classifier=True, write=False)
    assert result["training"]["trained"] is True
    acc, clf = result["router_accuracy"], result["classifier_accuracy"]
    assert acc["overall"] >= 0.95, acc
    assert acc["interval"][0] <= acc["overall"] <= acc["interval"][1]
    assert clf["overall"] >= 0.95 and clf["layer"] == 1


def test_every_stage2_validation_logs_the_router_accuracy_evaluation_reports(moa_run):
    """The validation rows carry the accuracy of the decisions each pass applied, per layer and overall; at the
    step early stopping kept it is what ``evaluate_run`` reports for the final mixture on that split."""
    metrics = read_metrics(moa_run)
    stage2 = [m for m in metrics if m.get("split") == "validation" and "ppl" in m and "category" not in m]
    assert stage2 and all(set(m["router_accuracy_per_router"]) == {"layer_0", "layer_1"} for m in stage2)
    stop = [m for m in metrics if m.get("stage") == "early_stopping" and "category" not in m][-1]
    kept = next(m for m in stage2 if m["step"] == stop["best_step"])
    result = evaluate_run(moa_run, max_generate=0, classifier=False, split="validation", write=False)
    assert kept["router_accuracy"] == pytest.approx(result["router_accuracy"]["overall"])
    assert kept["router_accuracy_per_router"] == pytest.approx(result["router_accuracy"]["per_router"])


def test_eval_json_carries_the_training_outcome(moa_run):
    result = evaluate_run(moa_run, max_generate=0, classifier=False)
    saved = json.loads((moa_run / "eval.json").read_text())
    assert saved["training"] == result["training"] and saved["training"]["start_step"] > 0


def test_a_mop_gate_over_fewer_experts_than_categories_trains_without_pre_training(tmp_path):
    """Such a gate has no label per expert to fit: pre-training is skipped (it used to stop the run with a label
    error) and the start, an untrained gate, may not be kept by early stopping."""
    out = tmp_path / "mop4"
    cfg = load_config(ROOT / "configs" / "mop.yaml", [
        "model.name=tiny", "data.synthetic_per_task=4", "data.max_length=48", "mixture.num_experts=4",
        "train.max_steps=2", "train.eval_every=1", "train.patience=1", "train.save_every=0", "eval.max_eval=2",
        f"output_dir={out}"])
    train(cfg, progress=False)
    metrics = read_metrics(out)
    assert not [m for m in metrics if m.get("stage") == "router_pretrain"]
    stop = [m for m in metrics if m.get("stage") == "early_stopping"]
    assert stop and all(m["best_step"] > 0 for m in stop), stop
