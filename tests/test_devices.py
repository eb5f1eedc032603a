"""Devices and precision: ``--device`` / ``--precision`` resolved in one place, clear errors for what this machine
lacks, autocast really applied in training and evaluation, and accelerate's process-wide state not leaking
from one run into the next. GPU runs are recorded in docs/benchmarks.md; CI has no GPU, so the CUDA checks here
are the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mixroute.cli import app
from mixroute.config import ConfigError, load_config
from mixroute.devices import DeviceError, autocast, check_precision, resolve_device
from mixroute.evaluate import evaluate_run
from mixroute.train import train

pytestmark = pytest.mark.slow   # minutes of real servers / training: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()
SMALL = ["model.name=tiny", "data.synthetic_per_task=4", "data.max_length=48", "train.batch_size=8",
         "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "train.max_steps=2",
         "train.lr=0.02", "eval.max_eval=2", "eval.max_generate=1"]


def test_auto_is_cuda_when_there_is_one_else_cpu():
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU.*use --device cpu or auto"):
        resolve_device(name)


@pytest.mark.parametrize("name, match", [("gpu", "not a torch device"), ("meta", "runs on cpu or cuda")])
def test_bad_device_names(name, match):
    with pytest.raises(DeviceError, match=match):
        resolve_device(name)


def test_precision_names_and_autocast():
    with pytest.raises(DeviceError, match="valid are no, bf16, fp16"):
        check_precision("fp8")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", "no"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16


def first_loss(run_dir: Path) -> float:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def test_half_precision_on_a_cpu_without_native_kernels_warns_once_and_says_what_to_do(monkeypatch):
    import warnings

    from mixroute import devices

    monkeypatch.setattr(devices, "cpu_has_native", lambda precision: False)
    with pytest.warns(devices.SlowPrecisionWarning, match="no native bf16 matrix multiply.*use precision 'no'"):
        with autocast("cpu", "bf16"):
            pass
    monkeypatch.setattr(devices, "cpu_has_native", lambda precision: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", devices.SlowPrecisionWarning)
        with autocast("cpu", "bf16"), autocast("cpu", "no"):
            pass
        devices.warn_if_slow("cpu", "no")
    assert isinstance(devices.cpu_has_native("bf16"), bool) and devices.cpu_has_native("no")


def test_bf16_training_differs_from_float32_only_by_rounding_and_does_not_leak(tmp_path):
    cfg = lambda name, *o: load_config(ROOT / "configs" / "lora_mixed.yaml",  # noqa: E731
                                       [*SMALL, f"output_dir={tmp_path / name}", *o])
    fp32 = train(cfg("fp32"), progress=False)
    bf16 = train(cfg("bf16", "model.precision=bf16"), progress=False)
    again = train(cfg("again"), progress=False)   # a plain run after a bf16 one in the same process
    l32, l16, lagain = first_loss(fp32), first_loss(bf16), first_loss(again)
    assert l16 != l32, "bf16 autocast was not applied"
    assert abs(l16 - l32) / l32 < 0.02
    assert lagain == l32, "accelerate's precision leaked from the bf16 run into the next one"


def test_evaluation_in_bf16_is_close_to_float32(tiny_run):
    a = evaluate_run(tiny_run, max_generate=0, split="validation", write=False, classifier=False)
    b = evaluate_run(tiny_run, max_generate=0, split="validation", write=False, classifier=False,
                     device="cpu", precision="bf16")
    pa, pb = a["perplexity"]["overall"], b["perplexity"]["overall"]
    assert math.isfinite(pb) and pa != pb and abs(math.log(pb) - math.log(pa)) < 0.02


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_training_on_a_missing_gpu_fails_before_the_run_directory_exists(tmp_path):
    cfg = load_config(ROOT / "configs" / "lora_mixed.yaml", [*SMALL, f"output_dir={tmp_path / 'run'}",
                                                             "model.device=cuda"])
    with pytest.raises(ConfigError, match="model.device: device 'cuda': torch sees no CUDA GPU"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("argv", [["eval", "{run}", "--device", "cuda"],
                                  ["generate", "{run}", "hi", "--device", "cuda"],
                                  ["eval", "{run}", "--precision", "fp8"]])
def test_cli_device_errors_are_one_line(tiny_run, argv):
    res = CliRunner().invoke(app, [a.format(run=tiny_run) for a in argv])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "cuda" in res.stderr or "fp8" in res.stderr


@pytest.mark.parametrize("case", ["lora-single", "lora-task", "lora-token_topk", "lora-poly", "lora-rank",
                                  "prompt-gate"])
def test_every_bank_path_runs_under_bf16_autocast(case):
    """Autocast does not cast the operands of in-place ops (the LoRA bank accumulates into the base output):
    each bank path (one shared expert, gathered per row, dense per token, Poly's mixed parameters, prompts)
    forwards and backwards under bf16 with a loss close to float32's."""
    from test_mixture_matrix import data, make, randomise

    mix = randomise(make(case), 0.05)
    batch = data()
    ref = mix(**batch).lm_loss
    with autocast("cpu", "bf16"):
        out = mix(**batch)
    out.loss.backward()
    assert torch.isfinite(out.lm_loss) and abs(out.lm_loss.item() - ref.item()) / ref.item() < 0.02
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in mix.adapter_parameters())


def test_two_processes_share_one_run_directory(tmp_path):
    """Data-parallel training as `accelerate launch` / torchrun start it (here: 2 CPU processes, gloo): one
    process owns the run directory, each optimizer step is logged once, the final mixture is saved."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mixroute.cli", "train",
           str(ROOT / "configs" / "lora_mixed.yaml"), *SMALL, "train.max_steps=3", f"output_dir={out}",
           "--no-progress", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == [1, 2, 3]
    assert (out / "final" / "mixture.safetensors").is_file()


def test_the_serving_engine_runs_under_bf16(tiny_run):
    """`mixroute serve --precision bf16`: every engine forward under autocast; greedy text is produced and the
    routing decisions are those of float32 (the tiny run's router is far from a tie)."""
    from mixroute.data.format import prompt_ids
    from mixroute.serve import Engine, Request, load_served

    served = load_served(tiny_run, device="cpu")
    ids = prompt_ids({"instruction": "Convert 5 km to metres.", "response": "", "category": "x"}, served.tok,
                     template=served.template)
    out = {}
    for precision in ("no", "bf16"):
        eng = Engine(served.model, served.mix, served.tok, served.expert_names, precision=precision).start()
        try:
            out[precision] = eng.generate(Request(prompt_ids=ids, max_tokens=6, temperature=0))
        finally:
            eng.stop()
    decided = lambda r: {k: v for k, v in r.routing.items() if k != "router_latency_ms"}  # noqa: E731
    assert out["bf16"].tokens and decided(out["bf16"]) == decided(out["no"])
    with pytest.raises(DeviceError, match="valid are no, bf16, fp16"):
        Engine(served.model, served.mix, served.tok, served.expert_names, precision="half")
