"""Foundation CLI commands through typer's runner (the real app, the tiny model)."""

from typer.testing import CliRunner

from mixroute.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("model", "config"):
        assert cmd in result.output


def test_model_info_tiny():
    result = runner.invoke(app, ["model", "info", "tiny"])
    assert result.exit_code == 0, result.output
    assert "3,219,776" in result.output and "tiny random Llama" in result.output


def test_model_info_missing_model_is_a_clear_error():
    result = runner.invoke(app, ["model", "info", "nobody/nothing"])
    assert result.exit_code == 2
    assert "nobody/nothing" in result.output and "never downloads" in result.output


def test_config_show_validates(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 5\n")
    ok = runner.invoke(app, ["config", "show", str(p), "mixture.router=rank"])
    assert ok.exit_code == 0, ok.output
    assert "'rank'" in ok.output
    bad = runner.invoke(app, ["config", "show", str(p), "mixture.router=ranks"])
    assert bad.exit_code == 2 and "mixture.router" in bad.output and "'rank'" in bad.output
