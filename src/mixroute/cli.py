"""The `mixroute` command line (typer). One small function per command; feature modules register their own.

Commands live beside the code they drive, in ``mixroute/cli_*.py`` files that each define ``register(app)``;
this file only builds the app, adds the foundation commands and loads those registrations.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import mixroute

app = typer.Typer(
    name="mixroute",
    help="Routed mixtures of parameter-efficient experts (MoP, MoA, MoE-LoRA, SMoRA, Poly/MHR) on one frozen LLM.\n\n"
    "Typical flow: `mixroute train configs/moa_dolly.yaml` -> `mixroute eval runs/moa_dolly` -> "
    "`mixroute report runs/moa_dolly`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
model_app = typer.Typer(help="Inspect base models.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate configs.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
console = Console()


def fail(message: str, code: int = 2) -> None:
    """Print a user error in red and exit (no traceback: the message says what to fix)."""
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        console.print(mixroute.__version__)
        raise typer.Exit()


@model_app.command("info")
def model_info_cmd(
    name: Optional[str] = typer.Argument(None, help="Model: omit for the embedded SmolLM2-135M-Instruct, a local "
                                                   "directory, a cached Hugging Face id, or 'tiny'."),
) -> None:
    """Parameters, layers and where the model was loaded from."""
    from mixroute.models import ModelNotFoundError, load_base_model, model_info, tiny_model

    try:
        model, _ = tiny_model() if name == "tiny" else load_base_model(name)
    except ModelNotFoundError as e:
        fail(str(e))
    table = Table(title="base model", show_header=False)
    for k, v in model_info(model).items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)


@config_app.command("show")
def config_show(
    path: Optional[str] = typer.Argument(None, help="YAML config; omit to list every field with its default."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=300"),
) -> None:
    """Validate a config (with overrides) and print the resolved values with each field's documentation."""
    from mixroute.config import ConfigError, RunConfig, describe_fields, load_config, to_dict

    try:
        cfg = load_config(path, overrides or [])
    except ConfigError as e:
        fail(str(e))
    resolved = to_dict(cfg)
    table = Table(title=f"config {path or '(defaults)'}")
    for col in ("key", "type", "value", "help"):
        table.add_column(col, overflow="fold")
    for key, tp, _default, help_text in describe_fields(RunConfig):
        node = resolved
        for part in key.split("."):
            node = node[part]
        table.add_row(key, tp, repr(node), help_text)
    console.print(table)


def _register_feature_commands() -> None:
    for mod in sorted(m.name for m in pkgutil.iter_modules(mixroute.__path__) if m.name.startswith("cli_")):
        importlib.import_module(f"mixroute.{mod}").register(app)


_register_feature_commands()

if __name__ == "__main__":
    app()
