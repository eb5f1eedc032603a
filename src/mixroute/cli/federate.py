"""``mixroute federate``: train a method across Flower clients (simulation runtime), or resume such a run."""

from __future__ import annotations

from typing import Optional

import typer

from mixroute.cli.common import console, fail, user_errors

EXAMPLES = """Examples:

mixroute federate configs/fed_mop_skew.yaml   (MoP, 8 clients under mop_skew, Dolly-15k)

mixroute federate configs/fed_mop_skew.yaml federated.aggregation=usage federated.rounds=20

mixroute federate configs/fed_lora_skew.yaml model.name=tiny federated.rounds=2 federated.local_steps=2

mixroute federate --resume runs/fed_mop_skew   (continue from the last completed round)

mixroute federate configs/fed_mop_skew.yaml --device cuda   (clients on the GPU, sharing it)

Every key of the federated: section: mixroute config show CONFIG. Deployment mode (SuperLink + SuperNodes): docs/federated.md."""


@user_errors()
def federate_cmd(
    config: Optional[str] = typer.Argument(None, help="YAML config with a federated: section; omit with --resume."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. federated.rounds=20"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this federated run directory from its "
                                                               "last completed round."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output_dir."),
    stop_after_round: Optional[int] = typer.Option(None, "--stop-after-round", help="Checkpoint and stop after "
                                                                                  "this round (as if killed)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Print one line per round."),
    device: Optional[str] = typer.Option(None, "--device", help="Where clients train and the server evaluates: "
                                                                "cpu (default), cuda or auto; the same as "
                                                                "federated.device=... (each simulated client gets "
                                                                "a GPU share: federated.gpus_per_client)."),
) -> None:
    """Federated training on Flower: clients hold skewed partitions, only adapter tensors travel."""
    from mixroute.config import load_config
    from mixroute.federated import resume as resume_run
    from mixroute.federated import run

    if resume:
        if config or overrides:
            fail("--resume RUN_DIR continues a run with its own config.yaml; do not pass a config or overrides")
        run_dir = resume_run(resume, progress=progress, stop_after_round=stop_after_round, device=device)
    else:
        if config is None:
            fail("give a config file (e.g. configs/fed_mop_skew.yaml) or --resume RUN_DIR")
        cfg = load_config(config, [*(overrides or []), *([f"federated.device={device}"] if device else [])])
        run_dir = run(cfg, overwrite=overwrite, progress=progress, stop_after_round=stop_after_round)
    console.print(f"run directory: [bold]{run_dir}[/bold]")
