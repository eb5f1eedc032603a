"""``mixroute train``: set up, train and save a method into a run directory (or resume one)."""

from __future__ import annotations

from typing import Optional

import typer

from mixroute.cli.common import console, fail, user_errors
from mixroute.cli.evaluate import eval_cmd

# typer/rich keeps blank-line separated paragraphs of an epilog; one example per paragraph reads best
EXAMPLES = """Examples:

mixroute train configs/moa.yaml   (MoA on the built-in synthetic suite, embedded SmolLM2-135M)

mixroute train configs/moa_dolly.yaml train.max_steps=300 data.max_per_category=500

mixroute train configs/lora_mixed.yaml model.name=tiny train.max_steps=5   (seconds: a smoke run)

mixroute train --resume runs/moa   (continue a killed run from its newest checkpoint)

Methods (train.method): base, prompt_tuning, lora_mixed, lora_single, moa, moe_lora, moe_lora_naive, poly, mhr, smora, mop, mixture. Every key: mixroute config show CONFIG. Docs: docs/training.md."""


@user_errors()
def train_cmd(
    config: Optional[str] = typer.Argument(None, help="YAML config (configs/*.yaml); omit with --resume."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=300"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this run directory from its newest "
                                                               "checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output_dir."),
    evaluate: bool = typer.Option(False, "--eval", help="Run `mixroute eval` on the run when training ends."),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step", help="Checkpoint and stop after this "
                                                                          "step (as if killed; resume later)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default: model.device, auto "
                                                               "= CUDA when torch sees a GPU). Several GPUs: "
                                                               "accelerate launch -m mixroute train ..."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Autocast: no, bf16 or fp16 (default: "
                                                                     "model.precision)."),
) -> None:
    """Train a method (setup, stage 1 when needed, train, save) into a run directory."""
    from mixroute.config import load_config
    from mixroute.rundir import final_dir
    from mixroute.train import resume as resume_run
    from mixroute.train import train

    if resume:
        if config or overrides:
            fail("--resume RUN_DIR continues a run with its own config.yaml; do not pass a config or overrides")
        run_dir = resume_run(resume, stop_at_step=stop_at_step, progress=progress, device=device,
                             precision=precision)
    else:
        if config is None:
            fail("give a config file (e.g. configs/moa.yaml) or --resume RUN_DIR")
        flags = [f"model.device={device}"] * bool(device) + [f"model.precision={precision}"] * bool(precision)
        cfg = load_config(config, [*(overrides or []), *flags])
        run_dir = train(cfg, overwrite=overwrite, stop_at_step=stop_at_step, progress=progress)
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    stopped_early = stop_at_step is not None and not final_dir(run_dir).is_dir()
    if evaluate and not stopped_early:
        eval_cmd(str(run_dir), None, None, None, True, device or "auto", precision or "no")
