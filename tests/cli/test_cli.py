"""The CLI as a whole (every command has help, one error path, a light import) and the model / config commands."""

import os
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

import mixroute
from mixroute.cli import app
from mixroute.cli.common import user_errors
from mixroute.config import ConfigError

runner = CliRunner()
COMMANDS = {"train", "eval", "compare", "generate", "report", "prune", "federate", "serve", "model", "config", "data", "adapters", "library"}


def _command_paths(group: click.Group, prefix: tuple = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _command_paths(cmd, prefix + (name,))


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("model", "config"):
        assert cmd in result.output


def test_every_listed_command_has_help():
    top = runner.invoke(app, ["--help"], terminal_width=200)
    assert top.exit_code == 0, top.output
    paths = list(_command_paths(typer.main.get_command(app)))
    assert {p[0] for p in paths} == COMMANDS
    for path in paths:
        if len(path) == 1:
            assert f" {path[0]} " in top.output, path
        res = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert res.exit_code == 0 and "Usage:" in res.output, (path, res.output)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == mixroute.__version__, result.output


def _mixroute(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    return subprocess.run([sys.executable, "-m", "mixroute.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "NO_COLOR": "1"}, timeout=300)


@pytest.mark.parametrize("args", [("train", "nonexistent.yaml"), ("eval", "/nonexistent")])
def test_user_error_is_one_line_and_exit_2(tmp_path, args):
    res = _mixroute(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_user_errors_keeps_bugs_as_bugs():
    def run(error: Exception, *extra: type) -> None:
        with user_errors(*extra):
            raise error

    with pytest.raises(typer.Exit) as exit_info:
        run(ConfigError("train.max_steps: expected an int"))
    assert exit_info.value.exit_code == 2
    with pytest.raises(KeyError):
        run(KeyError("a bug"))
    with pytest.raises(ValueError):  # bad input only where the command says so
        run(ValueError("a bug"))
    with pytest.raises(typer.Exit):
        run(ValueError("bad input"), ValueError)


def test_import_is_light():
    code = ("import sys, mixroute.cli; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


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
    bad = runner.invoke(app, ["config", "show", str(p), "mixture.expert=loras"])
    assert bad.exit_code == 2 and "mixture.expert: 'loras' is not valid" in bad.output and "lora, dora" in bad.output
    bad = runner.invoke(app, ["config", "show", str(p), "mixture.router=ranks"])
    assert bad.exit_code == 2 and "mixture.router: 'ranks' is not valid" in bad.output and "rank" in bad.output
