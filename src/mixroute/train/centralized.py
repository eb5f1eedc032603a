"""The centralized training recipe: setup, (stage 1), train, evaluate, save. Reads top to bottom.

    from mixroute.config import load_config
    from mixroute.train import train
    run_dir = train(load_config("configs/moa.yaml", ["train.max_steps=50"]))

``train`` writes the run directory of docs/architecture.md (``mixroute.rundir``): config.yaml, metrics.jsonl,
data_report.json, checkpoints/step-N, stage1/, final/, gates.json. ``resume(run_dir)`` continues a killed run
from its newest checkpoint and reaches the same final weights as an uninterrupted run (data order is a
function of (seed, step); optimizer, scheduler and RNG states are restored).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from mixroute import rundir
from mixroute.config import ConfigError, ModelConfig, RunConfig
from mixroute.data import RunData, to_device
from mixroute.devices import DeviceError, resolve_device, warn_if_slow
from mixroute.evaluate import validation_snapshot
from mixroute.fileio import atomic_dir
from mixroute.methods import needs_stage1, stage1_config
from mixroute.train.loop import TrainingDiverged, train_mode, train_step
from mixroute.train.state import latest_checkpoint, load_trainer_state, save_checkpoint
from mixroute.train.tracking import MetricsLogger, ProgressBar


# =========================================================================== setup
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (data order has its own generators; see RunData)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Adam's second moments of tiny gradients become denormal floats, which are ~100x slower on CPU
    torch.set_flush_denormal(True)


def training_device(name: str, key: str, pick_gpu: str) -> torch.device:
    """The device a config's ``key`` asks training to run on: auto, cpu or cuda, checked against this machine;
    a GPU index is refused with ``pick_gpu`` (how that setting chooses a GPU)."""
    try:
        device = resolve_device(name)
    except DeviceError as e:
        raise ConfigError(f"{key}: {e}") from None
    if device.index is not None:
        raise ConfigError(f"{key}={name!r}: training takes auto, cpu or cuda; {pick_gpu}")
    return device


def make_accelerator(cfg: ModelConfig) -> Any:
    """One ``accelerate.Accelerator`` on ``cfg.device`` with ``cfg.precision``: CPU or one GPU as asked, several
    GPUs under ``accelerate launch`` with no code change."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    device = training_device(cfg.device, "model.device", "pick the GPU with CUDA_VISIBLE_DEVICES (several GPUs: "
                                                         "accelerate launch)")
    # accelerate keeps one process-wide state and refuses a second precision or device in the same process;
    # training is a library call that may run many times per process, so each run starts from a fresh state
    # (the distributed part, PartialState, is kept: a launched process stays in its group)
    AcceleratorState._reset_state(reset_partial_state=False)
    warn_if_slow(device, cfg.precision)
    # top-1 routers leave some experts without gradient in a step
    return Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    if resume:
        if not rundir.is_run_dir(run_dir):
            raise ConfigError(f"--resume {run_dir}: not a run directory (no {rundir.CONFIG})")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"output_dir {run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                              "--overwrite to start again, or another output_dir=...")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(run_dir, cfg)
    return run_dir


def warmup_cosine(optimizer: Any, warmup: int, steps: int) -> Any:
    """Linear warm-up then cosine decay to 0 at ``steps``, with step 1 at ``1 / (warmup + 1)`` of the peak:
    transformers' schedule starts at 0, so the first optimizer step of every run (a tenth of a 10-step
    stage-1 expert) changed nothing."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / (warmup + 1)
        progress = (done - warmup) / max(1, steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)


def build_optimizer(params: list[nn.Parameter], cfg: RunConfig, steps: int,
                    router_params: Optional[list[nn.Parameter]] = None, lr: Optional[float] = None) -> tuple[Any, Any]:
    """AdamW + warm-up and cosine decay over ``steps`` optimizer steps (``warmup_cosine``), peak ``lr``
    (default ``train.lr``). ``router_params`` (a subset of ``params``) form their own group, named
    ``routers`` (the experts' is ``experts``): they get ``train.router_lr`` when it is set, and ``train_step``
    clips each group's gradient norm on its own."""
    peak = cfg.train.lr if lr is None else lr
    ids = {id(p) for p in router_params or []}
    groups = [{"name": "experts", "params": [p for p in params if id(p) not in ids]},
              {"name": "routers", "params": [p for p in params if id(p) in ids],
               "lr": cfg.train.router_lr if cfg.train.router_lr is not None else peak}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=peak, weight_decay=cfg.train.weight_decay)
    return opt, warmup_cosine(opt, min(cfg.train.warmup_steps, max(steps, 1)), max(steps, 1))


# =========================================================================== the recipe
def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, stop_at_step: Optional[int] = None,
          progress: bool = True) -> Path:
    """Train ``cfg.train.method`` and write the run directory; returns its path.

    ``stop_at_step`` checkpoints and returns after that (global) step, as if the run had been killed there:
    ``resume`` then continues it (used by the resume-equivalence test and ``--stop-at-step``).
    """
    # ---- setup (every config error is raised before the run directory is touched)
    seed_everything(cfg.train.seed)
    accelerator = make_accelerator(cfg.model)
    model, tok, data, mcfg = rundir.open_run(cfg, accelerator.device)
    # under `accelerate launch` one process owns the run directory; the others wait until it is ready (each
    # would otherwise find the others' fresh directory and refuse it as an existing run)
    if accelerator.is_main_process:
        run_dir = prepare_run_dir(cfg, resume, overwrite)
        if not resume:
            rundir.write_data_report(run_dir, data.report)
    accelerator.wait_for_everyone()
    run_dir = Path(cfg.output_dir)
    log = MetricsLogger(run_dir, enabled=accelerator.is_main_process)
    ctx = _Ctx(cfg, run_dir, accelerator, model, tok, data, log, progress, stop_at_step)
    if mcfg is None:  # base: nothing to train; validation perplexity of the frozen model, eval reads it
        evaluate_validation(ctx, None, 0, stage="before")
        log.close()
        return run_dir

    # ---- stage 1: one LoRA per category (MoA, lora_single, moe_lora)
    offset = 0
    adapters = None
    if needs_stage1(cfg):
        adapters = cfg.train.stage1_adapters or run_stage1(ctx)
        if not cfg.train.stage1_adapters:
            offset = len(data.categories) * cfg.train.stage1_steps
        if ctx.stopped:
            return run_dir

    # ---- the mixture (stage-1 LoRAs as experts, or fresh experts), its routers pre-trained on the labels
    mix = build_mixture(model, mcfg, adapters, data)
    # a resumed run with a checkpoint loads its routers from there; one killed earlier pre-trains them again
    ckpt = latest_checkpoint(run_dir) if resume else None
    pretrained = pretrain_routers(ctx, mix, mcfg, offset) if ckpt is None else True
    if cfg.train.method == "lora_single":  # the stage-1 LoRAs with oracle routing are the result
        finish(ctx, mix, offset)
        return run_dir

    # ---- stage 2 (or the only stage): train the mixture (to the cap or until validation stops improving)
    last = fit(ctx, mix, steps=cfg.train.max_steps, offset=offset, resume=resume, start_trained=pretrained)
    if ctx.stopped:
        return run_dir

    # ---- evaluate and save
    finish(ctx, mix, last)
    return run_dir


def resume(run_dir: str | Path, stop_at_step: Optional[int] = None, progress: bool = True,
           device: Optional[str] = None, precision: Optional[str] = None) -> Path:
    """Continue a run from its newest checkpoint (the config is the run's own config.yaml; ``device`` and
    ``precision`` may differ from the ones it started with: a run begun on a GPU can finish on a CPU)."""
    cfg = rundir.read_config(run_dir)
    cfg.output_dir = str(run_dir)
    cfg.model.device = device or cfg.model.device
    cfg.model.precision = precision or cfg.model.precision
    return train(cfg, resume=True, stop_at_step=stop_at_step, progress=progress)


@dataclass
class _Ctx:
    """What the recipe's steps share."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    model: nn.Module
    tok: Any
    data: RunData
    log: MetricsLogger
    progress: bool
    stop_at_step: Optional[int]
    stopped: bool = False


# =========================================================================== stage 1
def run_stage1(ctx: _Ctx) -> list[str]:
    """Train one single LoRA per category on that category's data; export each as a PEFT adapter under
    ``stage1/<category>`` (a finished adapter is reused when a run is resumed)."""
    from mixroute.mixture import Mixture

    cfg, steps = ctx.cfg, ctx.cfg.train.stage1_steps
    dirs, finished = [], rundir.finished_stage1(ctx.run_dir)
    for c, name in enumerate(ctx.data.categories):
        out = rundir.stage1_dir(ctx.run_dir, name)
        dirs.append(str(out))
        if out in finished:
            continue
        ctx.log.truncate_after(c * steps)  # a resumed run redoes this LoRA: drop its lines from the killed run
        mix = Mixture.attach(ctx.model, _seeded(stage1_config(cfg), cfg.mixture.seed + 1 + c))
        try:
            every = cfg.train.eval_every if cfg.train.stage1_eval_every is None else cfg.train.stage1_eval_every
            fit(ctx, mix, steps=steps, offset=c * steps, category=c, checkpoints=False, eval_every=every)
            if ctx.stopped:
                return dirs
            with atomic_dir(out) as tmp:
                mix.export_peft(0, str(tmp))
        finally:
            mix.detach()
    return dirs


def _seeded(mcfg: Any, seed: int) -> Any:
    mcfg.seed = seed
    return mcfg


def build_mixture(model: nn.Module, mcfg: Any, adapters: Optional[list[str]], data: RunData) -> nn.Module:
    """Attach the method's mixture; stage-1 adapters become its experts (same weights, PEFT format)."""
    from mixroute.mixture import Mixture

    if adapters is not None:
        if len(adapters) != len(data.categories):
            raise ConfigError(f"train.stage1_adapters: {len(adapters)} adapters for {len(data.categories)} "
                              f"categories ({', '.join(data.categories)}); give one per category, in that order")
        return Mixture.from_peft(model, adapters, mcfg)
    return Mixture.attach(model, mcfg)


def pretrain_routers(ctx: _Ctx, mix: nn.Module, mcfg: Any, step: int) -> bool:
    """Fit the label-aligned routers alone on the whole train split, experts frozen, with validation early
    stopping (``train.gate.pretrain_router``; ``mixture.gate_pretrain_steps`` caps it, 0 = off); logs a
    ``router_pretrain`` line. Returns whether the mixture's routers start the next stage trained (or it has
    none to train): only then may early stopping keep that start."""
    from mixroute.train.gate import label_aligned_keys, pretrain_router, trainable_label_routers

    keys = label_aligned_keys(mix)
    if not keys:   # none to train; but a gate over fewer experts than categories starts untrained
        return not trainable_label_routers(mix)
    if mcfg.gate_pretrain_steps <= 0:
        return False
    data, dev = ctx.data, ctx.accelerator.device
    every = len(data.examples["train"])   # every train example, not eval.max_eval of each category
    train = [to_device(b, dev) for b in data.batches("train", ctx.cfg.eval.batch_size, max_per_category=every)]
    val = [to_device(b, dev) for b in data.batches("validation", ctx.cfg.eval.batch_size)]
    t0 = time.perf_counter()
    with ctx.accelerator.autocast():
        res = pretrain_router(mix, train, mcfg.gate_pretrain_steps, mcfg.gate_pretrain_lr, val_batches=val,
                              seed=ctx.cfg.train.seed)
    ctx.log.eval({"step": step, "split": "validation", "stage": "router_pretrain", **res.row(),
                  "seconds": round(time.perf_counter() - t0, 1)})
    if ctx.progress:
        acc = "-" if res.val_accuracy is None else f"{100 * res.val_accuracy:.1f}%"
        print(f"router pre-training: {res.steps} steps, {res.epochs} epochs over {res.train_examples} examples, "
              f"kept epoch {res.best_epoch}; validation routing accuracy on its cached features {acc} (per-layer "
              f"routers: the accuracy they apply is in the next validation line, router_accuracy)")
    return True


# =========================================================================== the training loop
@dataclass
class EarlyStopping:
    """The lowest validation perplexity so far, its step and weights, and the validations since it improved."""

    patience: int
    best: float = math.inf
    best_step: Optional[int] = None
    bad: int = 0
    weights: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)

    def update(self, ppl: Optional[float], step: int, mix: nn.Module) -> bool:
        """Record the validation at ``step``; True when training should stop."""
        if not self.patience:
            return False
        if ppl is not None and ppl < self.best:
            self.best, self.best_step, self.bad = ppl, step, 0
            self.weights = {k: v.detach().clone() for k, v in mix.adapter_state_dict().items()}
        else:
            self.bad += 1
        return 0 < self.patience <= self.bad

    def restore(self, mix: nn.Module) -> None:
        if self.weights is not None:
            mix.load_adapter_state_dict(self.weights, source=f"the best validation (step {self.best_step})")

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}


def fit(ctx: _Ctx, mix: nn.Module, steps: int, offset: int, resume: bool = False, category: Optional[int] = None,
        checkpoints: bool = True, eval_every: Optional[int] = None, start_trained: bool = True) -> int:
    """Train ``mix`` for up to ``steps`` optimizer steps (global step numbers ``offset + 1 ..``); returns the
    global step it stopped at. With ``category`` only that category's examples are used (stage 1), without
    checkpoints, validated on that category alone. With ``train.patience`` training stops once validation
    perplexity (the category average) has not improved for that many validations, and the best weights are
    put back. The start is a candidate for those weights only when ``start_trained`` (its routers were
    pre-trained, or there are none): a stage 2 must not end on routers that never trained. Where an epoch is
    short, validation runs at least twice per epoch."""
    cfg, acc = ctx.cfg, ctx.accelerator
    every = cfg.train.eval_every if eval_every is None else eval_every
    if every:
        pool = ctx.data.train_size(category)
        epoch = -(-pool // (cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes))
        every = min(every, max(1, epoch // 2))
    lr = cfg.train.stage1_lr if category is not None else None
    optimizer, scheduler = build_optimizer(mix.adapter_parameters(), cfg, steps, list(mix.routers.parameters()), lr)
    stop = EarlyStopping(cfg.train.patience if every else 0)
    start = 0
    if resume and checkpoints and (ckpt := latest_checkpoint(ctx.run_dir)) is not None:
        mix.load_adapter_state_dict(_load_weights(ckpt), source=str(ckpt))
        meta = load_trainer_state(ckpt, optimizer, scheduler)
        done = meta["step"]
        ctx.log.truncate_after(done)
        start = done - offset
        if "early_stopping" in meta:
            stop = EarlyStopping(stop.patience, **meta["early_stopping"])
            if (ckpt / BEST_WEIGHTS).is_file():
                from safetensors.torch import load_file

                stop.weights = load_file(str(ckpt / BEST_WEIGHTS))
    model_p, opt_p = acc.prepare(mix, optimizer)
    stage2 = category is None
    if start == 0 and (stage2 or stop.patience):
        ppl = evaluate_validation(ctx, mix, offset, stage="before", category=category)
        if start_trained:
            stop.update(ppl, offset, mix)
    train_mode(mix)
    accum, world, bs = cfg.train.grad_accum, acc.num_processes, cfg.train.batch_size
    seed = cfg.train.seed if stage2 else cfg.train.seed + 1000 * (category + 1)
    label = "train" if stage2 else f"stage 1: {ctx.data.categories[category]}"
    bar = ProgressBar(label, steps, start, enabled=ctx.progress and acc.is_main_process)
    step = offset + start
    try:
        for local in range(start, steps):
            step = offset + local + 1
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            micro = [to_device(ctx.data.train_batch((local * accum + a) * world + acc.process_index, bs, seed,
                                                    category=category), acc.device) for a in range(accum)]
            try:
                stats = train_step(model_p, micro, opt_p, scheduler, acc, cfg.train.clip_grad, step)
            except TrainingDiverged as e:
                raise _diverged(ctx, mix, optimizer, scheduler, step, e, checkpoints) from None
            dt = time.perf_counter() - t0
            tps = stats.tokens * world / dt
            row = {"step": step, "loss": stats.loss, "lm_loss": stats.lm_loss, "aux_loss": stats.aux_loss,
                   "lr": lr, "tokens_per_s": tps, "time": time.time(),
                   "grad_norm": stats.grad_norm}
            if stats.router_grad_norm is not None:
                row["router_grad_norm"] = stats.router_grad_norm
            if not stage2:
                row.update(stage="stage1", category=ctx.data.categories[category])
            ctx.log.train(row)
            bar.update(local + 1, stats.loss, tps)
            last = local + 1 == steps
            halt = False
            # with patience the cap is validated too: the last weights may be the best
            if (stage2 or stop.patience) and every and (
                    ((local + 1) % every == 0 and not last) or (last and stop.patience)):
                ppl = evaluate_validation(ctx, mix, step, stage="during", category=category)
                halt = stop.update(ppl, step, mix)
                train_mode(mix)
            if checkpoints and acc.is_main_process and (
                    last or halt or (cfg.train.save_every and (local + 1) % cfg.train.save_every == 0)
                    or step == ctx.stop_at_step):
                _checkpoint(ctx, step, mix, optimizer, scheduler, offset, stop)
            if ctx.stop_at_step is not None and step >= ctx.stop_at_step:
                ctx.stopped = True
                return step
            if halt:
                break
        if stop.patience and stop.best_step is not None:
            if step != stop.best_step:  # the cap, or patience ran out: end on the best validated weights
                bar.note(f"stopped at step {step}; best validation perplexity {stop.best:.3f} at step "
                         f"{stop.best_step}")
                stop.restore(mix)
            ctx.log.eval({"step": step, "split": "validation", "stage": "early_stopping",
                          "best_step": stop.best_step, "best_ppl": stop.best, "stopped_step": step,
                          "start_step": offset, "trained": stop.best_step > offset,
                          **({"category": ctx.data.categories[category]} if category is not None else {})})
        return step
    finally:
        bar.close()
        mix.eval()


BEST_WEIGHTS = "best_adapters.safetensors"


def _checkpoint(ctx: _Ctx, step: int, mix: nn.Module, optimizer: Any, scheduler: Any, offset: int,
                stop: EarlyStopping) -> None:
    """A checkpoint; with early stopping also its state and the best weights so far (a resumed run stops
    where an uninterrupted one would and ends on the same weights)."""
    from safetensors.torch import save_file

    extra: dict[str, Any] = {"offset": offset}
    if stop.patience:
        extra["early_stopping"] = stop.state()
    path = save_checkpoint(ctx.run_dir, step, mix, optimizer, scheduler, extra)
    if stop.patience and stop.weights is not None:
        tmp = path / (BEST_WEIGHTS + ".tmp")
        save_file(stop.weights, str(tmp))
        tmp.replace(path / BEST_WEIGHTS)


def _load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from mixroute.mixture import WEIGHTS_NAME

    return load_file(str(ckpt / WEIGHTS_NAME))


def _diverged(ctx: _Ctx, mix: nn.Module, optimizer: Any, scheduler: Any, step: int, err: Exception,
              checkpoints: bool) -> TrainingDiverged:
    """Keep the last good weights (those before the failing step) as a checkpoint and name it."""
    ctx.log.close()
    weights_ok = all(bool(torch.isfinite(p).all()) for p in mix.adapter_parameters())
    where = "no checkpoint was written"
    if checkpoints and weights_ok and step > 1:
        path = save_checkpoint(ctx.run_dir, step - 1, mix, optimizer, scheduler, {"diverged_at": step}, keep=0)
        where = f"the last good weights (after step {step - 1}) are in {path}"
    elif (last := latest_checkpoint(ctx.run_dir)) is not None:
        where = f"the last good checkpoint is {last}"
    return TrainingDiverged(f"training stopped: {err}. Lower train.lr (now {ctx.cfg.train.lr}) or check the data; "
                            f"{where}.")


# =========================================================================== evaluate and save
def evaluate_validation(ctx: _Ctx, mix: Optional[nn.Module], step: int, stage: str,
                        category: Optional[int] = None) -> Optional[float]:
    """Validation perplexity (an eval line in metrics.jsonl) and a gate snapshot (gates.json); returns the
    category-average perplexity (a stage-1 LoRA: its own category's, on that category's examples, no gates)."""
    with ctx.accelerator.autocast():
        ppl, row, snap = validation_snapshot(ctx.model, mix, ctx.data, ctx.cfg.eval.batch_size, step, stage,
                                             device=ctx.accelerator.device, category=category)
    if category is not None:
        row.update(stage="stage1", category=ctx.data.categories[category])
        snap = None
    ctx.log.validation(row, snap, ctx.data.categories)
    return ppl["average"]


def finish(ctx: _Ctx, mix: nn.Module, step: int) -> None:
    """Final validation + gates ("after") and the trained mixture in final/."""
    evaluate_validation(ctx, mix, step, stage="after")
    if ctx.accelerator.is_main_process:
        with atomic_dir(rundir.final_dir(ctx.run_dir)) as tmp:
            mix.save(str(tmp))
    ctx.log.close()
