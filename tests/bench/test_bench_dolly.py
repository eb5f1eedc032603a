"""bench/quality_dolly.py on the tiny model: the smoke budget end to end (every method, reuse on rerun), the full
budget's protocol (sweeps read validation only, early stopping, seeds, paired intervals) on a small grid, and
prose that follows from the numbers and names the data used."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from mixroute import rundir

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("quality_dolly")


def _protocol():
    sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("protocol")


def test_smoke_every_method_and_rerun_reuses(tmp_path, capsys, monkeypatch, one_thread):
    bench = _bench()
    P = _protocol()
    monkeypatch.setattr(P, "RUNS", tmp_path)
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Quality\n\nDolly table kept\n")
    argv = ["--budget", "smoke", "--model", "tiny", "--data", "synthetic", "--threads", "1", "--out",
            str(tmp_path / "runs"), "--img-dir", str(tmp_path / "img"), "--docs", str(docs)]
    out = bench.main(argv)
    assert set(out["results"][0]) == set(bench.ORDER)
    text = docs.read_text()
    # its own section, named after the data it read; the Dolly section is untouched
    assert "## Quality: synthetic suite" in text and "Dolly table kept" in text
    section = text.split("## Quality: synthetic suite", 1)[1]
    assert "Dolly" not in section and "the built-in synthetic suite" in section
    assert "| moa vs lora_mixed |" in section and "Budget `smoke`" in section
    # the load each run trained under, not the load when the section was rendered
    loads = [json.loads(p.read_text())["train_load"] for p in (tmp_path / "runs").rglob("bench_timing.json")]
    assert len(loads) >= len(bench.ORDER) and all(x >= 0 for x in loads)
    assert f"1-minute load average at the end of each run's training {min(loads):.2f} to" in section
    capsys.readouterr()
    bench.main(argv)
    printed = capsys.readouterr().out
    assert not [ln for ln in printed.splitlines() if ln.startswith(("train ", "test "))]  # nothing redone

    # a fresh checkout: runs/ is gone, the archive of finished runs is kept (and moa's record dropped, so moa
    # trains again from lora_single's stage-1 LoRAs, whose weights the archive does not keep)
    archived = tmp_path / "archive" / "runs" / "seed0"
    assert {"config.yaml", "metrics.jsonl", "eval.json", "bench_timing.json"} <= {
        f.name for f in (archived / "lora_mixed").iterdir()}
    assert not list((tmp_path / "archive").rglob("*.safetensors"))
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(archived / "moa")
    again = bench.main(argv)
    printed = capsys.readouterr().out.splitlines()
    assert [ln for ln in printed if ln.startswith(("train ", "test ", "retrain "))] == [
        "retrain seed0/lora_single (its weights are needed; the archive keeps none)", "train seed0/moa",
        f"test seed0/moa: PPL {again['results'][0]['moa']['perplexity']['average']:.3f}"]
    for m in bench.ORDER:  # restored as they were; the retrained moa reproduces its numbers
        assert again["results"][0][m]["perplexity"]["average"] == pytest.approx(
            out["results"][0][m]["perplexity"]["average"], rel=1e-4), m


def test_full_protocol_on_a_small_grid(tmp_path, monkeypatch, one_thread):
    bench = _bench()
    P = _protocol()
    monkeypatch.setitem(P.BUDGETS, "full", P.Budget("full", per_category=12, max_length=48, val_fraction=0.25,
                                                    test_fraction=0.25, seeds=(0, 1), max_generate=1,
                                                    max_new_tokens=2, max_epochs=3, patience=1, sweep=True))
    # --sweep-keys leaves the warm-up stage out: its runs would show as trials holding train.warmup_steps
    monkeypatch.setattr(bench, "SWEEPS", {"lora_mixed": [("train.lr", [1e-3, 3e-1])],
                                          "prompt_tuning": [("train.lr", [1e-2, 1e-1]),
                                                            ("train.warmup_steps", [1, 3])]})
    out = bench.main(["--budget", "full", "--model", "tiny", "--data", "synthetic", "--methods", "base",
                      "lora_mixed", "prompt_tuning", "--threads", "1", "--out", str(tmp_path / "runs"),
                      "--no-write", "--sweep-keys", "train.lr"])
    assert all(set(t["params"]) == {"train.lr"} for tried in out["sweeps"].values() for t in tried)
    for method, tried in out["sweeps"].items():
        scores = {t["params"]["train.lr"]: t["validation_ppl"] for t in tried}
        assert out["chosen"][method]["train.lr"] == min(scores, key=scores.get)
        for t in tried:  # only the chosen run (the first seed's) is ever evaluated on the test split
            chosen = t["params"]["train.lr"] == out["chosen"][method]["train.lr"]
            assert (Path(t["dir"]) / "eval.json").exists() == chosen
        assert out["results"][0][method]["dir"] == next(t["dir"] for t in tried if t["params"]["train.lr"]
                                                        == out["chosen"][method]["train.lr"])
    for seed in (0, 1):
        r = out["results"][seed]["lora_mixed"]
        assert r["params"]["train.lr"] == out["chosen"]["lora_mixed"]["train.lr"]
        assert len(r["curve"]) >= 2 and r["stopping"]  # validated every epoch, early stopping recorded
        stop = r["stopping"][-1]
        cfg = rundir.read_config(r["dir"])
        assert cfg.train.eval_every > 0 and cfg.train.max_steps == 3 * cfg.train.eval_every  # 3 epochs at most
        assert stop["best_step"] <= stop["stopped_step"] <= cfg.train.max_steps
    text = out["text"]
    assert "mean ± standard deviation over the seeds" in text and "**Learning-rate sweeps**" in text
    assert " ± " in text.split("**Test perplexity", 1)[1].split("**BLEU", 1)[0]


def test_load_note_says_which_runs_recorded_their_load():
    P = _protocol()
    assert P.load_note([{"train_load": 2.4}, {"train_load": 2.01}], 0.5) == (
        "1-minute load average at the end of each run's training 2.01 to 2.40; 0.50 when this section was rendered")
    assert "(1 of 2 runs; the others trained before it was recorded)" in P.load_note([{"train_load": 2.0}, {}], 1)
    assert P.load_note([{}], 1.0).startswith("runs' load not recorded")


def test_paired_bootstrap_and_intervals():
    P = _protocol()
    a = {"per_example": {"nll": [10.0, 12.0, 8.0, 9.0], "tokens": [5, 6, 4, 5], "task_ids": [0, 0, 1, 1]}}
    b = {"per_example": {"nll": [11.0, 13.0, 9.0, 10.0], "tokens": [5, 6, 4, 5], "task_ids": [0, 0, 1, 1]}}
    p = P.Paired()
    p.add(a, b)
    point, lo, hi = P.paired_bootstrap(p, resamples=500)
    assert point < 0 and lo <= point <= hi and hi < 0  # a is better on every example
    assert P.verdict(lo, hi, "a", "b") == "a below b"
    assert P.verdict(-1.0, 2.0, "a", "b").startswith("within noise")
    with pytest.raises(ValueError, match="same test examples"):
        P.Paired().add(a, {"per_example": {**b["per_example"], "tokens": [1, 1, 1, 1]}})
    # the vectorised draws are the stratified bootstrap: the same interval as drawing each resample's indices
    # one by one and averaging category perplexities through relative_ppl_diff
    import numpy as np

    rng = np.random.default_rng(1)
    big = P.Paired(nll_a=list(rng.gamma(4.0, 2.0, 60)), nll_b=list(rng.gamma(4.0, 2.0, 60)),
                   tokens=[int(t) for t in rng.integers(1, 9, 60)], task_ids=[i % 3 for i in range(60)])
    point, lo, hi = P.paired_bootstrap(big, resamples=400, seed=7)
    draw_rng = np.random.default_rng(7)
    members = [np.flatnonzero(np.asarray(big.task_ids) == g) for g in range(3)]
    picks = [m[draw_rng.integers(0, len(m), size=(400, len(m)))] for m in members]
    slow = sorted(P.relative_ppl_diff(big, [int(i) for pk in picks for i in pk[r]]) for r in range(400))
    assert point == pytest.approx(P.relative_ppl_diff(big, range(60)))
    assert (lo, hi) == pytest.approx((slow[10], slow[389]), rel=1e-9)
    lo, hi = P.accuracy_interval(50, 50)
    assert hi == 1.0 and 0.9 < lo < 1.0
    assert P.fmt_ms([1.0, 3.0]) == "2.00 ± 1.41" and P.fmt_ms([2.0]) == "2.00" and P.fmt_ms([None]) == "-"


def _result(ppl: float, router: float | None = None, clf: float | None = None) -> dict:
    cats = ["x", "y"]
    per = {"nll": [ppl, ppl], "tokens": [1, 1], "task_ids": [0, 1]}
    return {"categories": cats, "perplexity": {"average": ppl, "per_category": {"x": ppl, "y": ppl}},
            "bleu": {"average": 1.0, "per_category": {}}, "rougeL": {"average": 1.0, "per_category": {}},
            "router_accuracy": None if router is None else {"overall": router},
            "classifier_accuracy": None if clf is None else {"overall": clf}, "per_example": per, "stopping": []}


def test_findings_follow_the_numbers():
    bench = _bench()
    import findings as F

    a = bench.parse_args(["--budget", "smoke", "--data", "synthetic", "--no-write"])
    trio = ["lora_single", "lora_mixed", "moa"]

    def found(results) -> dict:
        return {type(f): f for f in bench.findings(a, results, trio)}

    both_perfect = found({0: {"moa": _result(3.0, 1.0, 1.0), "lora_mixed": _result(4.0), "lora_single": _result(5.0)}})
    order, acc = both_perfect[F.PaperOrder], both_perfect[F.RouterVsClassifier]
    assert order.order == ["moa", "lora_mixed", "lora_single"] and order.matches_paper
    assert acc.both_near_all and not acc.neither_near_all and acc.at_least_as_accurate and acc.n == 2
    assert both_perfect[F.Ranking].order == order.order and F.KeptStart not in both_perfect
    reversed_ = {0: {"moa": _result(6.0, 0.5, 0.7), "lora_mixed": _result(4.0), "lora_single": _result(5.0)}}
    got = found(reversed_)
    assert not got[F.PaperOrder].matches_paper and got[F.PaperOrder].order[-1] == "moa"
    acc = got[F.RouterVsClassifier]
    assert acc.neither_near_all and not acc.at_least_as_accurate and acc.router[0] == 0.5
    moa = {**reversed_[0]["moa"], "stopping": [{"best_step": 0, "stopped_step": 29}]}
    kept = found({0: {**reversed_[0], "moa": moa}})[F.KeptStart]
    assert kept.seeds == [0] and kept.of == 1
    # the one rendering: each finding a bullet, from its own text()
    lines = F.render(bench.findings(a, reversed_, trio))
    assert all(ln.startswith("- ") for ln in lines) and "(not the paper's order)" in "\n".join(lines)


def test_a_comparison_says_what_its_interval_says():
    _bench()
    import findings as F

    assert F.Comparison("a", "b", -3.0, -5.0, -1.0).verdict == "a below b"
    assert F.Comparison("a", "b", 3.0, 1.0, 5.0).verdict == "a above b"
    assert F.Comparison("a", "b", 1.0, -1.0, 3.0).verdict.startswith("within noise")
    assert F.MetricOrder("BLEU", {"x": 2.0, "y": 1.0}, 0.5).within_noise is False
    assert F.MetricOrder("BLEU", {"x": 2.0, "y": 1.0}, None).within_noise is None


def test_heading_names_the_data(tmp_path):
    bench = _bench()
    other = tmp_path / "my_domains.jsonl"
    a = bench.parse_args(["--data", str(other), "--no-write", "--out", str(tmp_path / "o")])
    assert bench.heading(a) == "## Quality: my_domains" and "my_domains.jsonl" in bench.data_label(a)
    assert bench.heading(bench.parse_args(["--no-write"])) == "## Quality"
    groups = bench.parse_args(["--data", "dolly-groups", "--no-write"])
    assert "4 groups" in bench.data_label(groups) and set(bench.GROUPS.values()) == {
        "questions", "passage tasks", "classification", "open-ended writing"}


def test_sweep_table_flags_a_setting_that_kept_its_start(tmp_path):
    """Identical numbers for different settings were runs that never left their start: the table says so. A
    start whose routers were pre-trained is the stage-1 experts with fitted routers: shown, and said so."""
    protocol = _protocol()

    def trial(lr, stop, run="x"):
        return {"params": {"train.lr": lr}, "validation_ppl": 12.625, "dir": str(tmp_path / run), "stopping": [stop]}

    old = {"step": 29, "stage": "early_stopping", "best_step": 0, "stopped_step": 29}       # before `trained`
    moved = {"step": 60, "stage": "early_stopping", "best_step": 45, "stopped_step": 60, "start_step": 30,
             "trained": True}
    stage1 = {"step": 4, "stage": "early_stopping", "best_step": 4, "category": "a"}
    rows = protocol.sweep_table({"moa": [trial(5e-5, old), trial(3e-4, moved), trial(1e-3, stage1)]},
                                chosen={"moa": {"train.lr": 5e-5}})
    assert "| moa | lr 5e-05 (kept its start) | **not trained** |" in rows
    assert not any("5e-05" in r and "12.625" in r for r in rows), "a run that never trained reported its start"
    assert "| moa | lr 0.0003 | 12.625 |" in rows and "| moa | lr 0.001 | 12.625 |" in rows
    (tmp_path / "fitted").mkdir()
    (tmp_path / "fitted" / "metrics.jsonl").write_text(json.dumps({"step": 0, "stage": "router_pretrain",
                                                                   "best_epoch": 3}) + "\n")
    rows = protocol.sweep_table({"moa": [trial(5e-5, old, "fitted")]}, chosen={"moa": {"train.lr": 5e-5}})
    from mixroute.report.compare import KEPT_PRETRAINED

    assert f"| moa | lr 5e-05{KEPT_PRETRAINED} | **12.625** |" in rows


def test_a_run_trained_in_a_snapshot_of_the_code_is_restored_in_the_checkout(tmp_path, monkeypatch):
    from mixroute.config import load_config
    from mixroute.rundir import write_config

    P = _protocol()
    here, snapshot = tmp_path / "checkout", tmp_path / "snap"
    monkeypatch.setattr(P, "ROOT", here)
    monkeypatch.setattr(P, "RUNS", here / "runs")
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")
    key = Path("quality_x_full") / "seed0" / "moa"

    def cfg(root, *extra):
        return load_config(None, ["model.name=tiny", f"output_dir={root / 'runs' / key}",
                                  f"train.stage1_adapters=[{root / 'runs' / 'quality_x_full' / 'seed0' / 'a'}]",
                                  *extra])
    archived = tmp_path / "archive" / key
    archived.mkdir(parents=True)
    write_config(archived, cfg(snapshot))     # what archive_run copies from the snapshot's run directory
    (archived / "metrics.jsonl").write_text("")
    (archived / "bench_timing.json").write_text("{}")
    run_dir = here / "runs" / key
    assert not P.restore_run(run_dir, cfg(here, "train.lr=0.1"))   # another config is not restored
    assert P.restore_run(run_dir, cfg(here))
    assert (run_dir / "metrics.jsonl").is_file() and str(here) in (run_dir / "config.yaml").read_text()


def test_a_run_killed_after_a_checkpoint_resumes_instead_of_starting_over(tmp_path, capsys, monkeypatch):
    from mixroute.config import load_config
    from mixroute.train import train

    P = _protocol()
    monkeypatch.setattr(P, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")
    ov = ["model.name=tiny", "data.synthetic_per_task=4", "data.max_length=48", "train.batch_size=8",
          "train.method=lora_mixed", "train.max_steps=6", "train.eval_every=0", "train.warmup_steps=0",
          "eval.max_eval=2", f"output_dir={tmp_path / 'runs' / 'q' / 'seed0' / 'lora_mixed'}"]
    cfg = load_config(None, ov + ["train.save_every=3"])
    run_dir = train(cfg, stop_at_step=3, progress=False)   # as if the session had ended after step 3
    assert not rundir.final_dir(run_dir).is_dir()
    capsys.readouterr()
    P.train_once(load_config(None, ov + ["train.save_every=2"]), "q/seed0/lora_mixed")  # other save_every: same run
    assert capsys.readouterr().out.startswith("resume q/seed0/lora_mixed")
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == [1, 2, 3, 4, 5, 6] and rundir.final_dir(run_dir).is_dir()
    # time between sessions is not training time: a gap over ten minutes in the metrics is left out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    shifted = [json.dumps({**json.loads(ln), "time": json.loads(ln)["time"] + (3600 * (i >= 3))})
               for i, ln in enumerate(lines) if "time" in json.loads(ln)]
    (run_dir / "metrics.jsonl").write_text("\n".join(shifted) + "\n")
    assert P._seconds_spent(run_dir) < 600


def test_a_run_killed_in_stage_1_keeps_its_finished_loras_and_ends_as_an_uninterrupted_one(tmp_path, capsys,
                                                                                          monkeypatch):
    """Stage 1 writes no checkpoints, only each finished LoRA: a bench rerun once deleted those and started over
    (a Dolly-8 lora_single lost five of eight LoRAs at the end of a session)."""
    from mixroute.config import load_config
    from mixroute.train import train

    P = _protocol()
    monkeypatch.setattr(P, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(P, "ARCHIVE", tmp_path / "archive")

    def ov(name):
        return ["model.name=tiny", "data.synthetic_per_task=4", "data.max_length=48", "train.batch_size=4",
                "train.method=lora_single", "train.stage1_steps=3", "train.eval_every=0", "train.warmup_steps=0",
                "eval.max_eval=2", f"output_dir={tmp_path / 'runs' / 'q' / 'seed0' / name}"]
    whole = train(load_config(None, ov("whole")), progress=False)
    run_dir = train(load_config(None, ov("killed")), stop_at_step=5, progress=False)  # inside the second LoRA
    first = sorted((run_dir / rundir.STAGE1).iterdir())
    assert len(first) == 1 and not rundir.final_dir(run_dir).is_dir()
    kept = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in first[0].iterdir()}
    capsys.readouterr()
    P.train_once(load_config(None, ov("killed")), "q/seed0/killed")
    assert capsys.readouterr().out.startswith("resume q/seed0/killed (1 finished stage-1 LoRA of this config")
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in first[0].iterdir()} == kept
    names = sorted(d.name for d in (whole / rundir.STAGE1).iterdir())
    assert names == sorted(d.name for d in (run_dir / rundir.STAGE1).iterdir()) and len(names) > 2
    for name in names:   # every LoRA, the ones trained after the kill included, as without the kill
        a, b = whole / rundir.STAGE1 / name, run_dir / rundir.STAGE1 / name
        assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == sorted(set(steps)) and len(steps) == 3 * len(names)   # the killed LoRA's lines redone once


def test_command_leaves_out_the_flags_that_only_say_where_the_section_goes():
    P = _protocol()
    argv = ["--budget", "full", "--docs", "/x/benchmarks.md", "--seeds", "0", "1", "--img-dir=/x/img",
            "--only-finished", "--no-write", "--precision", "bf16"]
    assert P.command("bench/quality_dolly.py", argv) == (
        "python bench/quality_dolly.py --budget full --seeds 0 1 --precision bf16")
