"""Federated training in Flower's real simulation runtime (Ray, 2 clients, 1 CPU each, tiny model): only adapter
tensors travel, failed clients are logged and the round aggregates the survivors, a round without survivors keeps
the global state, resume after round 2 of 4 reaches bit-identical results, the run opens like any run."""

from __future__ import annotations

import pytest
import torch

from mixroute import rundir
from mixroute.config import load_config
from mixroute.experts import expert_rank

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

OVERRIDES = ["model.name=tiny", "data.path=null", "data.synthetic_per_task=24", "data.max_length=64",
             "data.categories=[acronym,arithmetic,date_reformat,word_count]",
             "data.template=plain", "train.method=mop", "train.lr=0.01", "train.batch_size=4", "train.warmup_steps=0",
             "mixture.num_experts=4", "mixture.experts.prompt.num_virtual_tokens=4", "eval.max_eval=2",
             "eval.batch_size=8",
             "federated.clients=2", "federated.rounds=4", "federated.local_steps=1", "federated.aggregation=usage",
             "federated.personalize_router=true", "federated.partition=mop_skew", "federated.partition_total=null",
             "federated.round_timeout=120", "federated.patience=1", "train.seed=1"]
# the scenario below needs round 2 (one survivor) to lower validation perplexity on the tiny random model, which
# depends on the seed: train.seed=1 does (checked after router pre-training stopped leaking its last gradient);
# round 3 has no survivors, so the global state, and its validation perplexity, stay round 2's: with patience 1
# early stopping ends the run there, round 4 never runs, and round 2 is the final mixture
FAILURES = {(2, 1), (3, 0), (3, 1)}   # (round, partition): round 2: client 1 fails; round 3: both fail


def failing_client(failures: set[tuple[int, int]], sent_log: str):
    """mixroute's ClientApp whose train step raises for the given (round, partition) pairs (and for a training
    message that carries the run config, which the server sends once), and that logs the tensor names of every
    reply to ``sent_log`` (a JSON line each). A nested function, so Ray pickles it by value into its workers,
    whether or not they could import this test module."""
    import json

    from flwr.clientapp import ClientApp

    from mixroute.federated import client

    app = ClientApp()
    app.query()(client.query)
    app.evaluate()(client.evaluate)

    @app.train()
    def train(msg, context):
        rnd, k = int(msg.content["config"]["round"]), client.partition_id(context)
        if "cfg" in msg.content["config"]:   # the run config is sent once, in the QUERY, not every round
            raise RuntimeError("a training message carried the run config")
        if (rnd, k) in failures:
            raise RuntimeError(f"injected failure of client {k} in round {rnd}")
        out = client.train(msg, context)
        with open(sent_log, "a") as f:
            f.write(json.dumps({"round": rnd, "client": k, "phase": msg.content["config"].get("phase", "train"),
                                "keys": sorted(out.content["arrays"].keys())}) + "\n")
        return out

    return app


def cfg_for(out):
    return load_config(None, OVERRIDES + [f"output_dir={out}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mixroute.federated import run

    from typer.testing import CliRunner

    from mixroute.cli import app

    base = tmp_path_factory.mktemp("fed")
    with pytest.MonkeyPatch.context() as mp:   # the runner starts whatever mixroute.federated.client.app is
        mp.setattr("mixroute.federated.client.app", failing_client(FAILURES, str(base / "sent.jsonl")))
        return _runs(base, run, CliRunner, app)


def _runs(base, run, CliRunner, app):
    full = run(cfg_for(base / "full"), progress=False)
    # the interrupted run goes through the CLI: mixroute federate ... --stop-after-round 2, then --resume
    part = base / "part"
    (base / "c.yaml").write_text(f"output_dir: {part}\n")
    res = CliRunner().invoke(app, ["federate", str(base / "c.yaml"), *OVERRIDES, "--stop-after-round", "2"])
    assert res.exit_code == 0, res.output
    assert "round 2/4" in res.output and "round 3/4" not in res.output
    after_stop = rundir.read_rounds(part)
    res = CliRunner().invoke(app, ["federate", "--resume", str(part)])
    assert res.exit_code == 0, res.output
    assert "resuming after round 2" in res.output and "round 3/4" in res.output and "round 4/4" not in res.output
    assert "the final mixture is round 2's" in res.output
    return full, part, after_stop


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(rundir.final_dir(run_dir) / "mixture.safetensors"))


def test_rounds_record_failures_and_survivors(runs):
    full, _, _ = runs
    rows = rundir.read_rounds(full)
    assert [r["round"] for r in rows] == [1, 2, 3]   # early stopping (patience 1) after the no-survivor round
    assert rows[0]["succeeded"] == [0, 1] and rows[0]["failed"] == []
    assert rows[1]["sampled"] == [0, 1] and rows[1]["succeeded"] == [0]
    assert rows[1]["failed"][0]["client"] == 1 and "injected failure" in rows[1]["failed"][0]["reason"]
    assert rows[2]["succeeded"] == [] and len(rows[2]["failed"]) == 2
    assert rows[2]["ppl"] == rows[1]["ppl"]  # no survivors: the global state is kept
    for r in rows:
        assert r["seconds"] > 0 and r["bytes_down"] > 0
        assert set(r["ppl_per_category"]) and r["ppl"] > 0
    assert len(rows[0]["usage"]) == 4 and abs(sum(rows[0]["usage"]) - 1) < 1e-6
    assert set(rows[0]["usage_per_client"]) == {"0", "1"}
    part = rundir.read_partition(full)
    assert len(part["counts"]) == 2 and all(all(n > 0 for n in row) for row in part["counts"])
    assert set(rundir.read_client_gates(full)["clients"]) == {"client 0", "client 1"}
    # federated.patience: the final mixture is the round with the lowest average validation perplexity
    from mixroute.evaluate import evaluate_run

    (stop,) = [m for m in rundir.read_metrics(full) if m.get("stage") == "early_stopping"]
    assert (stop["best_step"], stop["stopped_step"]) == (2, 3)
    assert rows[1]["ppl_average"] < rows[0]["ppl_average"]
    final = evaluate_run(full, split="validation", max_generate=0, classifier=False, write=False)
    assert final["perplexity"]["average"] == pytest.approx(rows[1]["ppl_average"], rel=1e-5)


def test_the_gate_is_pre_trained_on_each_client_s_own_labels_before_round_1(runs):
    """Round 0 fits the gate alone on each client's partition (early stopping on its own share of the
    validation split), as the central recipe does on the whole train split; the server averages it."""
    from mixroute.federated.local import setup

    full, _, _ = runs
    rows = [r for r in rundir.read_metrics(full) if r.get("stage") == "router_pretrain"]
    assert len(rows) == 1, rows
    row = rows[0]
    part = setup(cfg_for("unused")).part
    assert row["clients"] == [0, 1] and row["failed"] == []
    assert row["train_examples"] == sum(len(c) for c in part.clients)
    assert all(n > 0 for n in row["steps"].values())
    categories = len(rundir.read_data_report(full)["categories"])
    assert row["val_accuracy"] > 1.5 / categories, row   # well above chance on the global validation split
    assert set(row["client_val_accuracy"]) == {"0", "1"}
    # the run stopped after round 2 and resumed: its checkpoint held the pre-trained gate, nothing ran twice
    assert [r.get("stage") for r in rundir.read_metrics(runs[1])].count("router_pretrain") == 1


def test_only_adapter_tensors_travel_and_personal_routers_never_reach_the_server(runs):
    import json

    full, part, _ = runs
    run = rundir.load_run(full)
    adapter = {k: v for k, v in run.mix.adapter_state_dict().items()}
    per_client = sum(v.numel() * v.element_size() for v in adapter.values())
    experts = sum(v.numel() * v.element_size() for k, v in adapter.items() if not k.startswith("routers."))
    base = sum(p.numel() * p.element_size() for p in run.model.parameters())
    rows = rundir.read_rounds(full)
    # down: the global state (experts and the global router); up: the experts only (personal routers stay)
    assert rows[0]["bytes_down"] == 2 * per_client and rows[0]["bytes_up"] == 2 * experts < rows[0]["bytes_down"]
    assert rows[1]["bytes_up"] == experts  # one survivor
    assert per_client < base / 10
    sent = [json.loads(ln) for ln in (full.parent / "sent.jsonl").read_text().splitlines()]
    training = [s for s in sent if s["phase"] == "train"]
    assert len(training) >= 6 and all(s["keys"] for s in training)
    assert not [k for s in training for k in s["keys"] if k.startswith("routers.")], "a personal router was sent"
    # the pre-training round sends the fitted routers once, for the global router the server averages
    assert all(all(k.startswith("routers.") for k in s["keys"]) for s in sent if s["phase"] == "pretrain")
    for run_dir in (full, part):
        assert not list(rundir.federated_dir(run_dir).glob("router-*")), "the server stored a personal router"
        kept = sorted(p.name for p in (run_dir / "clients" / "client-0" / "personal").iterdir())
        assert kept and all(n.startswith("round-") for n in kept) and len(kept) <= 2


def test_client_payload_has_no_base_model_tensor():
    from mixroute.federated.local import setup, train_round
    from mixroute.federated.payload import from_record, to_record

    local = setup(cfg_for("unused"))
    base_keys = {f"model.{k}" for k in local.model.state_dict()} | set(local.model.state_dict())
    state, metrics = train_round(local, 0, local.mix.adapter_state_dict(), 1)
    record = to_record(state)
    keys = set(from_record(record))
    assert keys == set(local.mix.adapter_state_dict())
    assert not keys & base_keys and all(k.startswith(("experts.", "routers.")) for k in keys)
    assert metrics["num-examples"] == len(local.part.clients[0])


def test_the_server_s_proximal_flag_pulls_a_client_towards_the_global_state():
    from mixroute.federated.local import setup, train_round

    local = setup(load_config(None, OVERRIDES + ["output_dir=unused", "federated.local_steps=4",
                                                 "federated.proximal_mu=1000"]))
    start = {k: v.clone() for k, v in local.mix.adapter_state_dict().items()}

    def moved(state):
        return sum(float((state[k] - start[k]).pow(2).sum()) for k in start) ** 0.5

    free, _ = train_round(local, 0, start, 1)
    held, _ = train_round(local, 0, start, 1, proximal=True)
    assert 0 < moved(held) < moved(free)


def test_resume_after_round_2_of_4_is_identical(runs):
    full, resumed, after_stop = runs
    assert [r["round"] for r in after_stop] == [1, 2]
    a, b = _weights(full), _weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rundir.read_rounds(full), rundir.read_rounds(resumed)
    assert [r["ppl"] for r in ra] == [r["ppl"] for r in rb]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    # personal routers, kept by the clients across the stop, end the same as well
    from safetensors.torch import load_file

    for k in (0, 1):
        pa, pb = (load_file(str(d / "clients" / f"client-{k}" / "mixture.safetensors")) for d in (full, resumed))
        assert set(pa) == set(pb) and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert rundir.read_client_eval(full) == rundir.read_client_eval(resumed)


def test_final_mixture_loads_and_opens_in_the_report(runs, tmp_path):
    from mixroute.report import write_report

    full, _, _ = runs
    run = rundir.load_run(full)
    assert run.mix is not None and run.mix.cfg.num_experts == 4
    from safetensors.torch import load_file

    own = load_file(str(full / "clients" / "client-0" / "mixture.safetensors"))   # its own router, trained there
    glob = _weights(full)
    routers = [k for k in glob if k.startswith("routers.")]
    assert routers and any(not torch.equal(own[k], glob[k]) for k in routers)
    assert all(torch.equal(own[k], glob[k]) for k in glob if not k.startswith("routers."))
    per_client = rundir.read_client_eval(full)["clients"]
    assert set(per_client) == {"client 0", "client 1"}
    assert per_client["client 0"]["own_router"]["overall"] > 0 and per_client["client 0"]["global_router"]
    html = write_report([str(full)], str(tmp_path / "rep"))
    assert html.is_file() if hasattr(html, "is_file") else True


def test_fedprox_adds_the_proximal_term_and_usage_is_a_distribution():
    from mixroute.data import to_device
    from mixroute.federated.local import _Local, setup

    local = setup(cfg_for("unused"))
    mix = local.mix
    named = [(n, p) for n, p in mix.named_parameters() if p.requires_grad and not n.startswith("model.")]
    anchor = {n: p.detach().clone() + 0.1 for n, p in named}  # every weight 0.1 away from the anchor
    numel = sum(p.numel() for _, p in named)
    batch = to_device(local.client_data(0).train_batch(0, 4, 0), "cpu")
    plain = _Local(mix, None, 0.0, len(local.data.categories), 4, expert_rank(mix.cfg))
    prox = _Local(mix, anchor, 2.0, len(local.data.categories), 4, expert_rank(mix.cfg))
    with torch.no_grad():
        a, b = plain(**batch, logits_for="labels").loss, prox(**batch, logits_for="labels").loss
    assert float(b - a) == pytest.approx(0.5 * 2.0 * numel * 0.01, rel=1e-4)
    usage = plain.usage()
    assert len(usage) == 4 and sum(usage) == pytest.approx(1.0) and min(usage) >= 0


def test_federated_set_up_checks_stage1_adapters_as_central_training_does(tmp_path):
    from mixroute.config import ConfigError
    from mixroute.federated.local import setup

    cfg = load_config(None, [o for o in OVERRIDES if not o.startswith("train.method")]
                      + ["train.method=moa", f"train.stage1_adapters=[{tmp_path / 'only_one'}]",
                         f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="1 adapters for 4 categories"):
        setup(cfg)


def test_a_bf16_client_trains_under_autocast_and_its_weights_move():
    """model.precision=bf16 reaches the clients' local steps (the central recipe gets it from accelerate's
    prepare(); the client drives the mixture itself) and the float32 weights it sends have trained."""
    from mixroute.federated.local import setup, train_round

    local = setup(load_config(None, OVERRIDES + ["output_dir=unused", "model.precision=bf16",
                                                 "federated.local_steps=3"]))
    dtypes = []
    hook = local.model.get_output_embeddings().register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        start = {k: v.clone() for k, v in local.mix.adapter_state_dict().items()}
        state, metrics = train_round(local, 0, start, 1)
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert metrics["steps"] == 3 and all(v.dtype == torch.float32 for v in state.values())
    assert any(not torch.equal(state[k], start[k]) for k in start)
