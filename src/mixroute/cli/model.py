"""``mixroute model info``: what a base model is and where it was loaded from."""

from __future__ import annotations

from typing import Optional

import typer

from mixroute.cli.common import console, user_errors

HELP = "Inspect base models."


@user_errors()
def info_cmd(
    name: Optional[str] = typer.Argument(None, help="Model: omit for the embedded SmolLM2-135M-Instruct, a local "
                                                   "directory, a cached Hugging Face id, or 'tiny'."),
) -> None:
    """Parameters, layers, where the model was loaded from, and what mixroute attaches to: decoder layers,
    attention, positions, the LoRA targets (all-linear, mlp_only, PEFT's default) and prompt-expert support."""
    from rich.table import Table

    from mixroute.models import load_base_model, model_info

    model, _ = load_base_model(name)
    table = Table(title="base model", show_header=False)
    for k, v in model_info(model).items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)
