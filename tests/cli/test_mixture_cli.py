"""`mixroute adapters import/export` on the tiny model."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from mixroute.cli import app
from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import tiny_model


def test_adapters_import_export(tmp_path):
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router="oracle", num_experts=2, num_tasks=2,
                                                        experts={"lora": {"rank": 2}}))
    with torch.no_grad():
        for p in mix.experts.parameters():
            p.normal_(std=0.05)
    mix.export_peft(0, str(tmp_path / "a0"))
    mix.export_peft(1, str(tmp_path / "a1"))
    runner = CliRunner()
    res = runner.invoke(app, ["adapters", "import", str(tmp_path / "a0"), str(tmp_path / "a1"), "--out",
                              str(tmp_path / "mix"), "--router", "oracle", "--model", "tiny"])
    assert res.exit_code == 0, res.output
    assert "2 experts" in res.output
    res = runner.invoke(app, ["adapters", "export", str(tmp_path / "mix"), "--expert", "1", "--out",
                              str(tmp_path / "b1"), "--model", "tiny"])
    assert res.exit_code == 0, res.output
    back = Mixture.from_peft(tiny_model()[0], [str(tmp_path / "b1")], MixtureConfig(router="single"))
    for key, bank in back.experts.items():
        torch.testing.assert_close(bank.A, mix.experts[key].expert(1)[0])
    res = runner.invoke(app, ["adapters", "export", str(tmp_path / "mix"), "--expert", "5", "--out",
                              str(tmp_path / "b5"), "--model", "tiny"])
    assert res.exit_code != 0 and "out of range" in " ".join(res.output.split())
    res = runner.invoke(app, ["adapters", "import", str(tmp_path), "--out", str(tmp_path / "x"), "--model", "tiny"])
    assert res.exit_code != 0 and "not a PEFT" in " ".join(res.output.split())


def test_adapters_export_takes_a_run_directory_on_its_own_base(tiny_run, tmp_path):
    """A run directory works where a saved mixture is expected: its final mixture, on the run's base (tiny
    here, with no --model); a run that did not finish names the folder that is missing."""
    from mixroute.rundir import final_dir

    runner = CliRunner()
    res = runner.invoke(app, ["adapters", "export", tiny_run, "--expert", "2", "--out", str(tmp_path / "e2")])
    assert res.exit_code == 0, res.output
    back = Mixture.from_peft(tiny_model()[0], [str(tmp_path / "e2")], MixtureConfig(router="single"))
    saved = Mixture.load(tiny_model()[0], str(final_dir(tiny_run)))
    for key, bank in back.experts.items():
        torch.testing.assert_close(bank.B, saved.experts[key].expert(2)[1])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((final_dir(tiny_run).parent / "config.yaml").read_text())
    res = runner.invoke(app, ["adapters", "export", str(unfinished), "--expert", "0", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "training did not finish" in " ".join(res.output.split())
