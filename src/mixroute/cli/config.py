"""``mixroute config show``: validate a config and print every resolved field with its documentation."""

from __future__ import annotations

from typing import Optional

import typer

from mixroute.cli.common import console, user_errors

HELP = "Inspect and validate configs."


@user_errors()
def show_cmd(
    path: Optional[str] = typer.Argument(None, help="YAML config; omit to list every field with its default."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=300"),
) -> None:
    """Validate a config (with overrides) and print the resolved values with each field's documentation."""
    from rich.table import Table

    from mixroute.config import RunConfig, describe_fields, load_config, to_dict
    from mixroute.routers import router_class

    cfg = load_config(path, overrides or [])
    router_class(cfg.mixture.router)  # router names live in the registry, not in the config's types
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
