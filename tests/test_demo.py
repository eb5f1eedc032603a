"""The demo end to end on the tiny model (the real-model demo is `make demo`)."""

from __future__ import annotations


def test_demo_runs_on_the_tiny_model(tmp_path, capsys):
    from mixroute.demo import main

    results = main(["--model", "tiny", "--out", str(tmp_path), "--steps", "2", "--stage1-steps", "1",
                    "--per-task", "4", "--max-generate", "1", "--max-new-tokens", "2", "--quiet"])
    out = capsys.readouterr().out
    assert {"lora_mixed", "moa"} <= set(results)
    assert "perplexity" in out and "router accuracy" in out and "| **average** |" in out
    assert (tmp_path / "moa" / "eval.json").is_file() and (tmp_path / "demo_summary.json").is_file()
