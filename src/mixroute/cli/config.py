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
    from mixroute.experts import EXPERT_KINDS
    from mixroute.mixture import settle
    from mixroute.routers import ROUTERS

    cfg = load_config(path, overrides or [])
    mixture = settle(cfg.mixture)  # router and expert names, and their settings, live in their registries
    resolved = to_dict(cfg)
    # each router's and expert kind's own settings, one row per key (the method may pick another router than
    # mixture.router: every registered one is listed)
    owners = {"mixture.routers": ROUTERS,
              "mixture.experts": {k.settings_name: k for k in EXPERT_KINDS.values()}}
    table = Table(title=f"config {path or '(defaults)'}")
    for col in ("key", "type", "value", "help"):
        table.add_column(col, overflow="fold")
    for key, tp, _default, help_text in describe_fields(RunConfig):
        if key in owners:
            for name, owner in owners[key].items():
                settings = owner.settings(mixture)
                for sub, stp, _d, sub_help in describe_fields(owner.Config, f"{key}.{name}."):
                    table.add_row(sub, stp, repr(getattr(settings, sub.rsplit(".", 1)[1])), sub_help)
            continue
        node = resolved
        for part in key.split("."):
            node = node[part]
        table.add_row(key, tp, repr(node), help_text)
    console.print(table)
