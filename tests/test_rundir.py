"""The run directory: names and paths, tolerant reading, atomic writing, load_run, and fileio.atomic_dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixroute import rundir
from mixroute.config import ConfigError, load_config
from mixroute.fileio import atomic_dir


def test_paths():
    assert rundir.checkpoint_dir("r", 7).as_posix() == "r/checkpoints/step-7"
    assert rundir.stage1_dir("r", "open qa/v2").as_posix() == "r/stage1/open_qa_v2"
    assert rundir.final_dir("r").as_posix() == "r/final"


def test_metrics_round_trip_and_a_half_written_last_line(tmp_path):
    rundir.append_metrics(tmp_path, {"step": 1, "loss": 2.0})
    rundir.append_metrics(tmp_path, {"step": 2, "loss": float("nan")})  # JSON has no NaN: null
    with (tmp_path / rundir.METRICS).open("a") as fh:
        fh.write('{"step": 3, "lo')  # a writer caught mid-line
    problems: list[str] = []
    assert rundir.read_metrics(tmp_path, problems) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}]
    assert problems == []

    lines = (tmp_path / rundir.METRICS).read_text().splitlines()
    (tmp_path / rundir.METRICS).write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    assert [r["step"] for r in rundir.read_metrics(tmp_path, problems)] == [1, 2]
    assert problems == ["metrics.jsonl: line(s) 2 are not JSON: skipped"]
    assert rundir.read_metrics(tmp_path / "nowhere") == []


def test_read_json_raises_or_records(tmp_path):
    assert rundir.read_eval(tmp_path) is None
    (tmp_path / rundir.EVAL).write_text("{broken")
    with pytest.raises(rundir.RunDirError, match="eval.json is not valid JSON"):
        rundir.read_eval(tmp_path)
    problems: list[str] = []
    assert rundir.read_eval(tmp_path, problems) is None and "eval.json is not valid JSON" in problems[0]
    (tmp_path / rundir.GATES).write_text("[1, 2]")
    with pytest.raises(rundir.RunDirError, match="gates.json holds a list, expected an object"):
        rundir.read_gates(tmp_path)


def test_eval_write_is_atomic_and_reads_back(tmp_path):
    rundir.write_eval(tmp_path, {"run": "x", "perplexity": {"overall": 3.5}})
    assert rundir.read_eval(tmp_path) == {"run": "x", "perplexity": {"overall": 3.5}}
    assert [p.name for p in tmp_path.iterdir()] == [rundir.EVAL]  # no temporary file left


def test_gate_snapshots_and_truncation_for_resume(tmp_path):
    for step, stage in ((0, "before"), (2, "during"), (4, "after")):
        rundir.add_gate_snapshot(tmp_path, ["a", "b"], 2, "sequence", {"stage": stage, "step": step,
                                                                       "weights": [[1.0, 0.0], [0.0, 1.0]]})
        rundir.append_metrics(tmp_path, {"step": step, "loss": 1.0})
    doc = rundir.read_gates(tmp_path)
    assert doc["categories"] == ["a", "b"] and doc["num_experts"] == 2 and len(doc["snapshots"]) == 3
    rundir.truncate_after(tmp_path, 2)
    assert [s["step"] for s in rundir.read_gates(tmp_path)["snapshots"]] == [0, 2]
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [0, 2]
    # another number of experts (stage 1's single LoRA before the mixture) starts the file afresh
    rundir.add_gate_snapshot(tmp_path, ["a", "b"], 1, "sequence", {"stage": "after", "step": 5, "weights": []})
    assert len(rundir.read_gates(tmp_path)["snapshots"]) == 1


def test_config_and_load_run(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        rundir.read_config(tmp_path)
    cfg = load_config(None, ["model.name=tiny", "train.method=base", "data.synthetic_per_task=4",
                             "data.max_length=48"])
    rundir.write_config(tmp_path / "base", cfg)
    recorded = rundir.recorded_config(cfg)   # every router's and expert kind's settings, defaults filled
    assert rundir.is_run_dir(tmp_path / "base") and rundir.read_config(tmp_path / "base") == recorded
    run = rundir.load_run(tmp_path / "base")
    assert run.mix is None and run.cfg == recorded and run.data.categories
    assert run.model.config.num_hidden_layers == 2  # 'tiny' resolved by models.load_base_model

    cfg.train.method = "lora_mixed"
    rundir.write_config(tmp_path / "unfinished", cfg)
    with pytest.raises(ConfigError, match="no final/ mixture.*--resume"):
        rundir.load_run(tmp_path / "unfinished")


def test_atomic_dir_replaces_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "a.json").write_text(json.dumps(1))
    assert (target / "a.json").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a.json").write_text("half")
            raise KeyboardInterrupt
    assert (target / "a.json").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b.json").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary or old directory left


def test_import_is_light():
    code = "import sys, mixroute.rundir; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
