"""Expert libraries on the tiny model: manifest, add/remove without retraining, centroid and arrow routing,
the fitted task router, cost-aware selection, the PEFT round trip, and every bad input named in the error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from mixroute.library import Library, LibraryError
from mixroute.library.manifest import MANIFEST
from mixroute.models import TinyModelSpec, tiny_model
from peft_adapters import PROMPTS, peft_adapter

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"math": peft_adapter(root / "math", r=4, alpha=8, seed=1),
            "code": peft_adapter(root / "code", r=8, alpha=4, targets=("q_proj", "up_proj", "down_proj"), seed=2),
            "big": peft_adapter(root / "big", r=16, alpha=16, seed=3)}


@pytest.fixture
def lib(tmp_path, adapters):
    model, tok = tiny_model()
    lb = Library.create(tmp_path / "lib", "tiny", model=model, tok=tok, max_rank=8)
    lb.add("math", adapters["math"], PROMPTS["math"], cost=1.0)
    lb.add("code", adapters["code"], PROMPTS["code"], cost=5.0)
    return lb


def logits_forcing(lb, name, ids):
    mix = lb.mixture("centroid")
    w = torch.tensor([1.0 if n == name else 0.0 for n in lb.man.names()])
    mix.force(w)
    try:
        with torch.no_grad():
            return mix(input_ids=ids).logits
    finally:
        mix.force(None)


def test_export_loads_in_plain_peft_with_identical_logits(lib, tmp_path):
    """Experts of different rank, alpha and targets share one bank exactly (padding, scaling folded)."""
    from peft import PeftModel

    ids = torch.randint(10, 3000, (2, 9), generator=torch.Generator().manual_seed(0))
    for name in ("math", "code"):
        ours = logits_forcing(lib, name, ids)
        out = lib.export(name, tmp_path / f"export_{name}")
        peft = PeftModel.from_pretrained(tiny_model()[0], str(out)).eval()
        with torch.no_grad():
            theirs = peft(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        base = tiny_model()[0](input_ids=ids).logits
        assert (theirs - base).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"


def test_manifest_round_trips_and_lists_what_each_router_needs(lib):
    again = Library(lib.path, *tiny_model())
    assert again.man.names() == ["math", "code"]
    rows = {r["name"]: r for r in again.rows()}
    assert rows["math"]["rank"] == 4 and rows["code"]["cost"] == 5.0 and rows["math"]["examples"] == 4
    assert rows["math"]["checksum"].startswith("sha256:")
    doc = json.loads((lib.path / MANIFEST).read_text())
    assert doc["format"] == "mixroute.library" and doc["version"] == 1
    assert doc["base"]["fingerprint"]["hidden_size"] == 64
    assert (lib.path / "experts" / "math" / "adapter_model.safetensors").is_file()


def test_centroid_routes_held_out_prompts_to_their_domain(lib):
    assert lib.route("What is 40 + 2?", router="centroid")["chosen"] == "math"
    assert lib.route("for x in y: pass  # explain", router="centroid")["chosen"] == "code"


def test_a_dora_expert_joins_lora_experts_and_each_keeps_its_peft_logits(lib, tmp_path):
    """With a DoRA adapter in the library the bank becomes a DoRA bank; the LoRA experts get the magnitudes
    that make them act as their plain LoRA, so every expert still equals its own adapter in PEFT."""
    from peft import PeftModel

    dora = peft_adapter(tmp_path / "dora", r=4, alpha=8, targets=("q_proj", "down_proj"), seed=5, use_dora=True)
    lib.add("dora", dora, ["Translate 'chat' into English."])
    assert lib.mixture("centroid").cfg.expert == "dora"
    ids = torch.randint(10, 3000, (2, 9), generator=torch.Generator().manual_seed(0))
    for name, path in (("dora", dora), ("math", lib.path / "experts" / "math"), ("code", lib.path / "experts" / "code")):
        with torch.no_grad():
            theirs = PeftModel.from_pretrained(tiny_model()[0], str(path)).eval()(input_ids=ids).logits
        torch.testing.assert_close(logits_forcing(lib, name, ids), theirs, atol=1e-5, rtol=1e-5)


def test_adding_an_expert_leaves_the_others_unchanged(lib, adapters, tmp_path):
    ids = torch.randint(10, 3000, (1, 7), generator=torch.Generator().manual_seed(1))
    before = {n: logits_forcing(lib, n, ids) for n in ("math", "code")}
    proto = lib.mixture("centroid").routers["layer_1"].inner.prototypes.clone()
    shutil.copytree(adapters["math"], tmp_path / "math2")
    lib.add("math2", tmp_path / "math2", ["Sum 1 and 2."])
    assert lib.man.names() == ["math", "code", "math2"]
    for n in ("math", "code"):
        torch.testing.assert_close(logits_forcing(lib, n, ids), before[n], atol=0, rtol=0)
    torch.testing.assert_close(lib.mixture("centroid").routers["layer_1"].inner.prototypes[:2], proto)
    lib.remove("math2")
    assert lib.man.names() == ["math", "code"] and not (lib.path / "experts" / "math2").exists()
    torch.testing.assert_close(logits_forcing(lib, "code", ids), before["code"], atol=0, rtol=0)


def test_arrow_prototype_is_the_top_right_singular_vector(lib):
    mix = lib.mixture("arrow")
    router = mix.routers["layer_0"]
    adapters = lib.adapters()
    for e, w in enumerate(adapters):
        mods = [m for m in w if m.startswith("model.layers.0.") and m.rsplit(".", 1)[-1] in ("q_proj", "k_proj",
                                                                                            "v_proj")]
        delta = torch.cat([w[m][1] @ w[m][0] for m in mods])           # stacked B A (scaled)
        v = torch.linalg.svd(delta.double()).Vh[0].float()
        assert abs(float(torch.dot(v, router.prototypes[e]))) == pytest.approx(1.0, abs=1e-4)
    gain = mix.model.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(router.gain, gain.detach())
    x = (router.prototypes[1] / router.gain)[None, None]   # a token along expert 1's direction
    route = router(x, None, None)
    assert route.level == "token" and int(route.weights[0, 0].argmax()) == 1


def test_task_router_fits_on_frozen_experts_and_goes_stale_on_add(lib, adapters, tmp_path):
    data = tmp_path / "fit.jsonl"
    data.write_text("".join(json.dumps({"instruction": p, "response": "ok", "category": c}) + "\n"
                            for c, ps in PROMPTS.items() for p in ps))
    expert_a = lib.mixture("centroid").experts["layers_0_self_attn_q_proj"].A.clone()
    res = lib.fit_router(data, steps=100)
    assert res["train_accuracy"] == 1.0
    assert lib.route("Add 5 and 5.", router="task")["chosen"] == "math"
    torch.testing.assert_close(lib.mixture("task").experts["layers_0_self_attn_q_proj"].A, expert_a)
    shutil.copytree(adapters["math"], tmp_path / "m3")
    lib.add("m3", tmp_path / "m3")
    assert any("task stale" in n for n in lib.notes())
    with pytest.raises(LibraryError, match="fit-router"):
        lib.mixture("task")
    lib.remove("m3")   # removing drops rows: the fitted router serves the others again
    assert lib.route("Add 5 and 5.", router="task")["chosen"] == "math"
    lib.remove("code")   # a row of the fitted router goes; its LayerNorm (per feature) stays whole
    assert lib.route("Add 5 and 5.", router="task")["chosen"] == "math"


def test_cost_weight_trades_quality_for_cost(lib):
    plain = lib.route("What is 40 + 2?", router="centroid")
    assert plain["chosen"] == "math"
    code_prompt = "for x in y: pass  # explain"
    assert lib.route(code_prompt, router="centroid")["chosen"] == "code"
    cheap = lib.route(code_prompt, router="centroid", cost_weight=1.0)   # code costs 5, math 1
    assert cheap["chosen"] == "math"
    for e in cheap["experts"]:
        assert e["score"] == pytest.approx(e["quality"] - 1.0 * e["cost"], abs=1e-3)
    with pytest.raises(LibraryError, match="arrow routes per token"):
        lib.mixture("arrow", cost_weight=0.5)


def test_calibrate_and_the_cost_curve(lib, tmp_path):
    from mixroute.library.curve import cost_curve

    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"instruction": p, "response": "a b c", "category": c}) + "\n"
                            for c, ps in PROMPTS.items() for p in ps))
    res = lib.calibrate(data)
    assert res["examples"] == 8 and set(res["mean_loss"]) == {"math", "code"}
    assert lib.route("What is 1 + 1?", router="centroid")["calibrated"]
    rows = cost_curve(lib, data, [0.0, 100.0], router="centroid")
    assert rows[-1]["mean_cost"] == pytest.approx(1.0) and rows[-1]["share"]["math"] == pytest.approx(1.0)
    assert rows[0]["mean_cost"] >= rows[-1]["mean_cost"]
    from mixroute.cli import app

    res = CliRunner().invoke(app, ["library", "curve", str(lib.path), "--data", str(data), "--lambdas", "0,100",
                                   "--router", "centroid"])
    assert res.exit_code == 0, res.output
    assert json.loads((lib.path / "cost_curve.json").read_text())[1]["mean_cost"] == pytest.approx(1.0)
    assert (lib.path / "cost_curve.png").read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["report", str(lib.path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Expert library" in md and "quality against cost of" in md and "| 100 |" in md
    assert any(f.name.startswith("cost_curve_") for f in (tmp_path / "report").rglob("*.png"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "response": "y", "category": "poetry"}) + "\n")
    res = CliRunner().invoke(app, ["library", "fit-router", str(lib.path), "--data", str(bad)])
    assert res.exit_code == 2 and "category 'poetry' is not an expert" in res.output


# ------------------------------------------------------------------ bad inputs, each named in the error
def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    conf = json.loads((dst / "adapter_config.json").read_text())
    conf.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("changes,match", [
    ({"use_dora": True}, "use_dora=true"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "PROMPT_TUNING"}, "only LORA"),
])
def test_unsupported_adapters_are_refused_naming_the_expert(lib, adapters, tmp_path, changes, match):
    bad = _edit_config(adapters["math"], tmp_path / "bad", **changes)
    with pytest.raises(LibraryError, match=match) as err:
        lib.add("newbie", bad)
    assert "'newbie'" in str(err.value)
    assert lib.man.names() == ["math", "code"] and not (lib.path / "experts" / "newbie").exists()


def test_rank_above_the_limit_other_base_and_names(lib, adapters, tmp_path):
    with pytest.raises(LibraryError, match=r"'big'.*r=16 is above this library's max_rank=8"):
        lib.add("big", adapters["big"])
    other = peft_adapter(tmp_path / "other", spec=TinyModelSpec(hidden_size=32, intermediate_size=64))
    with pytest.raises(LibraryError, match="'other' was trained on another base model"):
        lib.add("other", other)
    with pytest.raises(LibraryError, match="'math' is already in the library"):
        lib.add("math", adapters["math"])
    with pytest.raises(LibraryError, match="not valid"):
        lib.add("../evil", adapters["math"])
    with pytest.raises(LibraryError, match="no expert 'nope'.*math, code"):
        lib.remove("nope")
    with pytest.raises(LibraryError, match="is not a PEFT adapter directory"):
        lib.add("empty", tmp_path)


def test_checksum_mismatch_and_other_base_on_open(lib):
    with pytest.raises(LibraryError, match="different base model"):
        Library(lib.path, *tiny_model(spec=TinyModelSpec(hidden_size=32, intermediate_size=64)))
    f = lib.path / "experts" / "code" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    fresh = Library(lib.path, *tiny_model())
    with pytest.raises(LibraryError, match="expert 'code': checksum mismatch"):
        fresh.mixture("arrow")


# ------------------------------------------------------------------ the CLI on a trained run
def test_cli_create_list_route_export_remove(tiny_run, tmp_path):
    from mixroute.cli import app

    runner = CliRunner()
    lib = str(tmp_path / "lib")
    res = runner.invoke(app, ["library", "create", lib, "--from", tiny_run])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["library", "list", lib, "--json"])
    doc = json.loads(res.output)
    names = [e["name"] for e in doc["experts"]]
    assert len(names) == 8 and doc["state"]["task"] == "fitted"   # MoA's trained router came along
    for router in ("centroid", "arrow", "task"):
        res = runner.invoke(app, ["library", "route", lib, "Convert 5 km to metres.", "--router", router, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["chosen"] in names
    res = runner.invoke(app, ["library", "export", lib, names[0], "--out", str(tmp_path / "x")])
    assert res.exit_code == 0 and (tmp_path / "x" / "adapter_config.json").is_file()
    res = runner.invoke(app, ["library", "remove", lib, "no-such"])
    assert res.exit_code == 2 and "no expert 'no-such'" in res.output
    res = runner.invoke(app, ["library", "add", lib, names[1], str(tmp_path / "x")])
    assert res.exit_code == 2 and "already in the library" in res.output
    res = runner.invoke(app, ["library", "route", lib, "hi", "--router", "poly"])
    assert res.exit_code == 2 and "valid: centroid, arrow, task" in res.output


def test_a_failed_add_leaves_the_library_as_it_was(lib, adapters, tmp_path):
    before = (lib.path / MANIFEST).read_text()
    with pytest.raises(LibraryError, match="examples file .* does not exist"):
        lib.add("late", adapters["math"], tmp_path / "missing.txt")
    assert (lib.path / MANIFEST).read_text() == before
    assert not (lib.path / "experts" / "late").exists()
    assert Library(lib.path, *tiny_model()).man.names() == ["math", "code"]
