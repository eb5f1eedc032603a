"""Global routing of an expert library (``scope='global'``): one decision per prompt from the frozen base at the
library's router layer, applied at every layer; what ``mixroute serve LIB --engine vllm`` serves. Prototypes,
the fitted task router and the calibration read the frozen base, so they do not depend on the experts; the
per-layer state is kept apart; libraries written before it are refused with the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from peft_adapters import PROMPTS, peft_adapter
from typer.testing import CliRunner

from mixroute.cli import app
from mixroute.library import Library, LibraryError
from mixroute.library.features import layer_features, prompt_batches
from mixroute.library.manifest import CENTROID
from mixroute.models import tiny_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"math": peft_adapter(root / "math", r=4, alpha=8, seed=1),
            "code": peft_adapter(root / "code", r=8, alpha=4, targets=("q_proj", "up_proj", "down_proj"), seed=2)}


@pytest.fixture
def lib(tmp_path, adapters):
    model, tok = tiny_model()
    lb = Library.create(tmp_path / "lib", "tiny", model=model, tok=tok, max_rank=8, router_layer=1)
    lb.add("math", adapters["math"], PROMPTS["math"], cost=1.0)
    lb.add("code", adapters["code"], PROMPTS["code"], cost=5.0)
    return lb


def _records(path, response="ok"):
    path.write_text("".join(json.dumps({"instruction": p, "response": response, "category": c}) + "\n"
                            for c, ps in PROMPTS.items() for p in ps))
    return path


def test_global_centroid_prototypes_are_the_frozen_bases_features_at_the_router_layer(lib):
    assert lib.global_layer() == 1
    mix = lib.mixture("centroid", scope="global")
    assert list(mix.routers) == ["global"] and mix.routers["global"].read_layer == 1
    assert mix.decides_before_layers()
    from mixroute.library.data import read_prompts

    batches = prompt_batches(read_prompts(PROMPTS["code"], lib.man, lib.tok), lib.tok)
    frozen = layer_features(mix, batches, frozen=True)[1].mean(0)
    stored = load_file(str(lib.path / "experts" / "code" / CENTROID))
    torch.testing.assert_close(stored["base_1"], frozen)
    # the per-layer prototype reads the expert's own outputs below: a different vector
    assert (stored["layer_1"] - stored["base_1"]).abs().max() > 1e-4
    torch.testing.assert_close(mix.routers["global"].inner.prototypes[1], frozen)


def test_global_routing_picks_the_domain_and_the_prepass_decides_what_the_forward_applies(lib):
    assert lib.route("What is 40 + 2?", router="centroid", scope="global")["chosen"] == "math"
    assert lib.route("for x in y: pass  # explain", router="centroid", scope="global")["chosen"] == "code"
    mix = lib.mixture("centroid", scope="global")
    ids = lib.tok(["What is 40 + 2?", "for x in y: pass  # explain"], return_tensors="pt", padding=True)
    decided = mix.route_prompts(ids["input_ids"], ids["attention_mask"])["global"].weights.argmax(-1).tolist()
    with torch.no_grad():
        mix(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert mix.chosen_experts() == decided == [0, 1]


def test_the_global_decision_does_not_depend_on_the_experts(lib, adapters, tmp_path):
    """Scaling an expert's update changes the per-layer features, not what the frozen base shows the router."""
    prompt = "Compute 8 * 3."
    before = lib.route(prompt, router="centroid", scope="global")["experts"]
    louder = tmp_path / "loud"
    louder.mkdir()
    shutil.copy(f"{adapters['math']}/adapter_config.json", louder / "adapter_config.json")
    t = load_file(f"{adapters['math']}/adapter_model.safetensors")
    save_file({k: v * (5.0 if "lora_B" in k else 1.0) for k, v in t.items()}, str(louder / "adapter_model.safetensors"))
    lib.remove("math")
    lib.add("math", louder, PROMPTS["math"], cost=1.0)
    after = {e["name"]: e["probability"] for e in lib.route(prompt, router="centroid", scope="global")["experts"]}
    assert {e["name"]: pytest.approx(e["probability"], abs=1e-5) for e in before} == after


def test_global_task_router_and_calibration_are_fitted_apart_from_the_per_layer_ones(lib, tmp_path):
    data = _records(tmp_path / "fit.jsonl")
    res = lib.fit_router(data, steps=100, scope="global")
    assert res["train_accuracy"] == 1.0
    st = lib.man.router_state["task-global"]
    assert st["router_layer"] == 1 and st["file"].startswith("task-global-")
    assert lib.stale("task") == "not fitted"
    with pytest.raises(LibraryError, match="fit-router"):
        lib.mixture("task")                     # per-layer routing has no fitted router yet
    assert lib.route("Add 5 and 5.", router="task", scope="global")["chosen"] == "math"
    mix = lib.mixture("task", scope="global")
    assert set(load_file(str(lib.path / "router" / st["file"]))) == {
        f"global.{k}" for k in mix.routers["global"].inner.state_dict()}
    cal = lib.calibrate(_records(tmp_path / "cal.jsonl", "a b c"), scope="global")
    assert cal["examples"] == 8 and lib.stale("calibration-global") is None and lib.stale("calibration")
    assert lib.route("What is 1 + 1?", router="centroid", scope="global")["calibrated"]
    assert not lib.route("What is 1 + 1?", router="centroid")["calibrated"]
    res = CliRunner().invoke(app, ["library", "curve", str(lib.path), "--data", str(tmp_path / "cal.jsonl"),
                                   "--lambdas", "0,100", "--router", "centroid", "--scope", "global",
                                   "--out", str(tmp_path / "curve.png")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "curve.json").read_text())
    assert rows[-1]["share"]["math"] == pytest.approx(1.0)   # math costs 1, code 5: lambda 100 picks math
    lib.remove("code")   # rows are dropped from global state as from per-layer state
    assert lib.man.router_state["task-global"]["experts"] == ["math"]
    assert lib.route("Add 5 and 5.", router="task", scope="global")["chosen"] == "math"


def test_what_global_routing_cannot_do_is_refused_with_the_fix(lib, tmp_path):
    with pytest.raises(LibraryError, match="arrow router routes per token"):
        lib.mixture("arrow", scope="global")
    with pytest.raises(LibraryError, match="scope must be one of layer, global"):
        lib.mixture("centroid", scope="everywhere")
    with pytest.raises(LibraryError, match="router_layer"):
        Library.create(tmp_path / "deep", "tiny", router_layer=99)
    assert not (tmp_path / "deep" / "manifest.json").exists()
    # a prototype file from before global routing (per-layer features only)
    path = lib.path / "experts" / "code" / CENTROID
    save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("layer_")}, str(path))
    assert any("cannot route code globally" in n for n in lib.notes())
    lib.mixture("centroid")   # per-layer routing still works
    with pytest.raises(LibraryError, match="code were written before global routing.*--examples"):
        lib.mixture("centroid", scope="global")


def test_a_global_moa_run_becomes_a_library_with_its_router_and_layer(tmp_path):
    from pathlib import Path

    from mixroute.config import load_config
    from mixroute.rundir import load_run
    from mixroute.train import train

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "moa.yaml"),
                      ["model.name=tiny", "data.synthetic_per_task=6", "data.max_length=48", "train.max_steps=2",
                       "train.stage1_steps=1", "train.eval_every=0", "train.save_every=0",
                       "mixture.router_scope=global", "mixture.router_layer=1", f"output_dir={tmp_path / 'run'}"])
    run_dir = train(cfg, progress=False)
    lb = Library.from_run(tmp_path / "lib", run_dir)
    assert lb.man.router_layer == 1 and lb.man.router_state["task-global"]["router_layer"] == 1
    assert "task" not in lb.man.router_state
    run = load_run(run_dir)
    ours = lb.mixture("task", scope="global").routers["global"].inner
    for name, t in run.mix.routers["global"].state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], t.float())
    res = CliRunner().invoke(app, ["library", "route", str(lb.path), run.data.records["test"][0].instruction,
                                   "--router", "task", "--scope", "global", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["scope"] == "global"
