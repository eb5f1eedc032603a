"""``mixroute adapters import/export``: move LoRA (or DoRA) experts between PEFT adapter directories and mixtures."""

from __future__ import annotations

from typing import Optional

import typer

from mixroute.cli.common import console, fail, user_errors

HELP = (
    "Import PEFT LoRA (or DoRA) adapters as the experts of a mixture, or export one expert as a PEFT adapter.\n\n"
    "Example (MoA stage 2 from per-task LoRAs):\n\n"
    "  mixroute adapters import runs/lora_qa runs/lora_sum runs/lora_code --out mixtures/moa --router task\n\n"
    "  mixroute adapters export mixtures/moa --expert 1 --out adapters/sum   # PeftModel.from_pretrained"
)

_MODEL_HELP = ("Base model the mixture belongs to: omit for the embedded SmolLM2-135M-Instruct, a local "
               "directory, a cached Hugging Face id, or 'tiny' (random test model).")


@user_errors(ValueError)  # adapters that are malformed or do not match each other
def import_cmd(
    adapter_dirs: list[str] = typer.Argument(..., help="PEFT LoRA adapter directories (adapter_config.json + "
                                                       "adapter_model.safetensors), one per expert, in order: "
                                                       "expert i = the i-th directory = task id i."),
    out: str = typer.Option(..., "--out", help="Directory to write the mixture to (mixture.safetensors + "
                                               "mixture.json)."),
    router: str = typer.Option("task", "--router", help="Router over the imported experts: task (MoA, learns to "
                                                        "pick one per sequence), oracle (route by task id), "
                                                        "token_topk, uniform, rank, single (one adapter)."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
) -> None:
    """Import N PEFT LoRA adapters (same rank, alpha and target modules; all DoRA or none) as the N experts of a
    new mixture.

    The router starts untrained; train it with `mixroute train` (method moa, stage1_adapters) or use
    --router oracle to route by task id right away.
    """
    from mixroute.config import MixtureConfig, from_dict
    from mixroute.experts import expert_settings
    from mixroute.mixture import Mixture
    from mixroute.models import load_base_model

    cfg = from_dict(MixtureConfig, {"router": router, "num_tasks": len(adapter_dirs)}, "mixture.")
    mix = Mixture.from_peft(load_base_model(model)[0], adapter_dirs, cfg)
    mix.save(out)
    parts = mix.num_parameters_by_part()
    lora = expert_settings(mix.cfg)
    console.print(f"wrote {out}: {len(adapter_dirs)} experts (rank {lora.rank}, "
                  f"{', '.join(lora.target_modules)}), router {router}; "
                  f"{parts['experts']:,} expert + {parts['routers']:,} router parameters")


@user_errors(ValueError)  # e.g. an expert index out of range
def export_cmd(
    mixture_dir: str = typer.Argument(..., help="A run directory (its final mixture, on the run's base model) "
                                                "or a saved mixture (mixture.safetensors + mixture.json)."),
    expert: int = typer.Option(..., "--expert", help="Index of the expert to export (0-based)."),
    out: str = typer.Option(..., "--out", help="Directory for the PEFT adapter (adapter_config.json + "
                                               "adapter_model.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
) -> None:
    """Write one LoRA expert of a mixture as a PEFT adapter: `PeftModel.from_pretrained(base, OUT)` loads it."""
    from mixroute.mixture import Mixture
    from mixroute.models import load_base_model
    from mixroute.rundir import final_dir, is_run_dir, load_model, read_config

    if is_run_dir(mixture_dir):   # a run: its final mixture, on the base it was trained on unless --model says
        final = final_dir(mixture_dir)
        if not final.is_dir():
            fail(f"{mixture_dir} has no final mixture ({final}): training did not finish (resume it with "
                 f"`mixroute train --resume {mixture_dir}`)")
        base = load_model(read_config(mixture_dir).model)[0] if model is None else load_base_model(model)[0]
        mix = Mixture.load(base, str(final))
    else:
        mix = Mixture.load(load_base_model(model)[0], mixture_dir)
    mix.export_peft(expert, out)
    console.print(f"wrote PEFT adapter {out} (expert {expert} of {mixture_dir})")
