"""What server and clients share: loading the frozen base, the data, the partition and the mixture once per
process (``setup``), and one client's local training for one round (``train_round``) with the central
recipe's pieces (``build_optimizer``, ``train_step``, ``seed_everything``)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from mixroute.config import ConfigError, FederatedConfig, RunConfig
from mixroute.data import Partition, RunData, partition_train, to_device
from mixroute.experts import expert_rank
from mixroute.rundir import open_run
from mixroute.train.centralized import (build_mixture, build_optimizer, make_accelerator, seed_everything,
                                        training_device)
from mixroute.train.loop import train_mode, train_step


@dataclass
class Local:
    """A process's frozen base model, data, partition and attached mixture (kept across rounds)."""

    cfg: RunConfig
    model: nn.Module
    tok: Any
    data: RunData
    part: Partition
    mix: nn.Module
    accelerator: Any

    @property
    def num_experts(self) -> int:
        return int(self.mix.cfg.num_experts)

    def axis(self, key: str, shape: tuple) -> Optional[tuple[int, int]]:
        return self.mix.expert_axis(key)   # as the expert bank stacks its experts

    def client_data(self, k: int) -> RunData:
        """Client k's view: its partition of the train split (held-out splits unchanged)."""
        train = self.data.examples["train"]
        idx = self.part.clients[k]
        return dataclasses.replace(self.data, examples={**self.data.examples, "train": [train[i] for i in idx]},
                                   records={**self.data.records,
                                            "train": [self.data.records["train"][i] for i in idx]}, _epoch={})

    def held_out_share(self, k: int, split: str) -> list[dict[str, Any]]:
        """Client k's share of a held-out split, partitioned with the train split's scheme and seed (what a
        client would hold of it)."""
        ex = self.data.examples[split]
        part = partition_train(self.cfg.federated, [e["task_id"] for e in ex], len(self.data.categories))
        return [ex[i] for i in part.clients[k]]


def setup(cfg: RunConfig) -> Local:
    """Load everything a client or the server needs once (the base model stays loaded and frozen)."""
    seed_everything(cfg.train.seed)
    accelerator = make_accelerator(dataclasses.replace(cfg.model, device=client_device(cfg.federated)))
    model, tok, data, mcfg = open_run(cfg, accelerator.device)
    part = partition_train(cfg.federated, [e["task_id"] for e in data.examples["train"]], len(data.categories))
    if mcfg is None:
        raise ConfigError("train.method 'base' trains nothing and cannot be federated")
    mix = build_mixture(model, mcfg, list(cfg.train.stage1_adapters or []) or None, data)
    mix.eval()
    return Local(cfg, model, tok, data, part, mix, accelerator)


def client_device(fed: FederatedConfig) -> str:
    """``federated.device`` checked against this machine (a missing GPU fails before any model loads)."""
    return training_device(fed.device, "federated.device", "Ray gives each client its GPU share "
                                                          "(federated.gpus_per_client)").type


class _Local(nn.Module):
    """The mixture as ``train_step`` drives it, plus FedProx's proximal term and usage bookkeeping."""

    def __init__(self, mix: nn.Module, anchor: Optional[dict[str, Tensor]], mu: float, num_categories: int,
                 num_experts: int, rank: int, autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        super().__init__()
        self.mix, self.mu, self.autocast = mix, mu, autocast
        self.named = [(n, p) for n, p in mix.named_parameters() if p.requires_grad and not n.startswith("model.")]
        self.anchor = anchor
        self.mass = torch.zeros(num_categories, num_experts, dtype=torch.float64)
        self.rows = torch.zeros(num_categories, dtype=torch.float64)
        self.rank = rank

    def forward(self, **batch: Any) -> Any:
        # one autocast region per forward, as accelerate's prepare() gives the central recipe: one region around
        # the whole local loop would keep serving each LoRA's bf16 copy from before the first optimizer step
        with self.autocast():
            out = self.mix(**batch)
        self._record(out.routing, batch)
        if self.anchor is not None and self.mu > 0:
            prox = sum(((p - self.anchor[n]) ** 2).sum() for n, p in self.named)
            out = dataclasses.replace(out, loss=out.loss + 0.5 * self.mu * prox)
        return out

    @torch.no_grad()
    def _record(self, routing: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        from mixroute.routers.base import expert_mass

        per_token = {k for k in routing if self.mix.routers[k].level in ("token", "rank")}
        mass = expert_mass(routing, self.mass.shape[1], batch["attention_mask"].bool(), per_token)
        if mass is None:
            return
        per_seq = mass.double().cpu()
        tids = batch["task_ids"].cpu()
        self.mass.index_add_(0, tids, per_seq)
        self.rows.index_add_(0, tids, torch.ones(len(tids), dtype=torch.float64))

    def update_balancing(self) -> None:
        self.mix.update_balancing()

    def usage(self) -> list[float]:
        """Mean routing mass per expert over every sequence this round (sums to 1; uniform when unrouted)."""
        total = self.mass.sum(0)
        if float(total.sum()) <= 0:
            return [1.0 / self.mass.shape[1]] * self.mass.shape[1]
        return (total / total.sum()).tolist()

    def gates(self) -> list[list[float]]:
        """categories x experts average routing weight of this round's training sequences (0 for unseen)."""
        return (self.mass / self.rows.clamp_min(1).unsqueeze(1)).tolist()


def stage1_rounds(cfg: RunConfig) -> int:
    """Rounds of federated stage 1 (``federated.stage1_rounds`` resolved): MoA only, none when its stage-1
    adapters are given."""
    given = cfg.federated.stage1_rounds
    if cfg.train.method != "moa":
        if given:
            raise ConfigError(f"federated.stage1_rounds={given} applies to train.method moa (one expert per "
                              f"category, trained on its category first); this run's method is "
                              f"{cfg.train.method!r}")
        return 0
    if cfg.train.stage1_adapters:
        return 0
    return cfg.federated.rounds if given is None else int(given)


def train_round(local: Local, k: int, state: dict[str, Tensor], rnd: int,
                proximal: bool = False, stage1: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Client k's local training in round ``rnd`` from ``state``: (new adapter state, metrics). A pure function
    of (config, k, state, rnd): data order and RNG are seeded from them (resume gives identical results).
    ``proximal``: add FedProx's (mu/2)||w - w_global||^2; the server says so (its rule may be registered only in
    the server's process). ``stage1``: MoA's stage 1 (``stage1_round``): ``state`` holds the experts only."""
    cfg, fed, mix = local.cfg, local.cfg.federated, local.mix
    seed_everything(cfg.train.seed + 7919 * rnd + 104729 * k)
    if stage1:   # the routers are not run in stage 1: the client keeps its own initial ones
        state = {**mix.adapter_state_dict(), **state}
    mix.load_adapter_state_dict(state, source=f"round {rnd} global state")
    data = local.client_data(k)
    n = len(data.examples["train"])
    wrapper = _Local(mix, None, 0.0, len(data.categories), local.num_experts, expert_rank(mix.cfg),
                     local.accelerator.autocast)
    if n == 0:
        return mix.adapter_state_dict(), {"num-examples": 0, "train_loss": float("nan"), "usage": wrapper.usage(),
                                          "gates": wrapper.gates(), "steps": 0}
    if proximal:
        wrapper.anchor = {name: p.detach().clone() for name, p in wrapper.named}
        wrapper.mu = fed.proximal_mu
    steps = fed.local_steps
    bs = fed.batch_size or cfg.train.batch_size
    # a fresh AdamW every round, cosine decay over the local steps, no warm-up (a per-round warm-up of a few
    # local steps would spend most of them at a tiny learning rate)
    local_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=0))
    if stage1:   # the experts alone, at stage 1's rate (the central recipe's train.stage1_lr)
        routers = {id(p) for p in mix.routers.parameters()}
        opt, sched = build_optimizer([p for p in mix.adapter_parameters() if id(p) not in routers], local_cfg, steps,
                                     lr=cfg.train.stage1_lr)
    else:
        opt, sched = build_optimizer(mix.adapter_parameters(), local_cfg, steps, list(mix.routers.parameters()))
    train_mode(mix)
    seed = cfg.train.seed + k
    try:
        with mix.routed_by_label() if stage1 else contextlib.nullcontext():
            losses = _steps(local, wrapper, data, opt, sched, rnd, steps, bs, seed)
    finally:
        mix.eval()
    return ({kk: v.detach().clone() for kk, v in mix.adapter_state_dict().items()},
            {"num-examples": n, "train_loss": sum(losses) / len(losses), "usage": wrapper.usage(),
             "gates": wrapper.gates(), "steps": steps})


def _steps(local: Local, wrapper: "_Local", data: RunData, opt: Any, sched: Any, rnd: int, steps: int, bs: int,
           seed: int) -> list[float]:
    cfg = local.cfg
    accum = cfg.train.grad_accum
    losses = []
    for step in range(steps):
        micro = [to_device(data.train_batch(((rnd - 1) * steps + step) * accum + a, bs, seed),
                           local.accelerator.device) for a in range(accum)]
        stats = train_step(wrapper, micro, opt, sched, local.accelerator, cfg.train.clip_grad, step + 1)
        losses.append(stats.loss)
    return losses


def stage1_round(local: Local, k: int, experts: dict[str, Tensor], rnd: int) -> tuple[dict[str, Tensor], dict]:
    """Client k's MoA stage 1 in round ``rnd``: every expert whose category the client holds trains on that
    category's examples (each sequence routed to its label's expert), from the global ``experts``. Returns the
    slices of those experts only (``payload.trim_experts``) and metrics with ``experts`` (their indices) and
    ``expert-examples`` (the client's examples of each): a client sends nothing for a category it lacks."""
    from mixroute.federated.payload import is_router, trim_experts

    state, metrics = train_round(local, k, experts, rnd, stage1=True)
    counts = torch.bincount(torch.tensor([e["task_id"] for e in local.client_data(k).examples["train"]],
                                         dtype=torch.long), minlength=local.num_experts)
    held = [e for e in range(local.num_experts) if int(counts[e]) > 0]
    trimmed = trim_experts({kk: v for kk, v in state.items() if not is_router(kk)}, held, local.axis)
    return trimmed, {**metrics, "experts": held, "expert-examples": [int(counts[e]) for e in held]}


def pretrains_routers(local: Local) -> bool:
    """Whether the run starts with a router pre-training round: a label-aligned router (MoA's task router,
    MoP's gate) and ``mixture.gate_pretrain_steps`` > 0, as the central recipe decides."""
    from mixroute.train.gate import label_aligned_keys

    return bool(label_aligned_keys(local.mix)) and local.mix.cfg.gate_pretrain_steps > 0


def pretrain_round(local: Local, k: int, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Client k's router pre-training, the central recipe's ``train.gate.pretrain_router`` on what the client
    holds: the label-aligned routers fitted alone on its partition's labels (experts frozen), early stopping on
    its own share of the validation split. Returns (its router tensors only, metrics)."""
    from mixroute.data import make_batches
    from mixroute.federated.payload import is_router
    from mixroute.train.gate import pretrain_router

    cfg, mix, dev = local.cfg, local.mix, local.accelerator.device
    seed_everything(cfg.train.seed + 104729 * k)
    mix.load_adapter_state_dict(state, source="the global state before router pre-training")
    data = local.client_data(k)
    bs = cfg.eval.batch_size
    every = len(data.examples["train"])   # every example the client holds, not eval.max_eval of each category
    train = [to_device(b, dev) for b in data.batches("train", bs, max_per_category=every)] if every else []
    val = [to_device(b, dev) for b in make_batches(local.held_out_share(k, "validation"), data.collate, bs)]
    with local.accelerator.autocast():
        res = pretrain_router(mix, train, mix.cfg.gate_pretrain_steps, mix.cfg.gate_pretrain_lr, val_batches=val,
                              seed=cfg.train.seed + k)
    routers = {key: v.detach().clone() for key, v in mix.adapter_state_dict().items() if is_router(key)}
    return routers, {"num-examples": res.train_examples, "steps": res.steps, "epochs": res.epochs,
                     "best_epoch": res.best_epoch, "val_examples": sum(len(b["task_ids"]) for b in val),
                     "val_accuracy": -1.0 if res.val_accuracy is None else float(res.val_accuracy)}


class PersonalRouters:
    """A client's own routers (``personalize_router``), kept on the client and never sent: one file per round
    in which it trained them, in its own directory (``client_dir``), so that a resumed run finds them as of
    the server's checkpoint. The last ``keep`` files are kept: a run killed mid-round loses at most that round."""

    keep = 2

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def _rounds(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("round-*.safetensors"))

    def save(self, rnd: int, routers: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".round-{rnd}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in routers.items()}, str(tmp))
        tmp.replace(self.dir / f"round-{rnd}.safetensors")
        for old in [r for r in self._rounds() if r != rnd][: -(self.keep - 1) or None]:
            (self.dir / f"round-{old}.safetensors").unlink(missing_ok=True)

    def load(self, before: int) -> Optional[dict[str, Tensor]]:
        """The routers as of the last round before ``before`` (None: this client has none yet)."""
        from safetensors.torch import load_file

        rounds = [r for r in self._rounds() if r < before]
        return load_file(str(self.dir / f"round-{rounds[-1]}.safetensors")) if rounds else None


def client_dir(cfg: RunConfig, k: int, given: Optional[str] = None) -> Path:
    """Where client k keeps its own state: ``given`` (a SuperNode's node config ``client-dir``), else
    RUN_DIR/clients/client-<k> (a simulation: the clients share the server's disk)."""
    return Path(given) if given else Path(cfg.output_dir) / "clients" / f"client-{k}"


def evaluate_personal(local: Local, k: int, global_state: dict[str, Tensor], own: Optional[dict[str, Tensor]],
                      out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Client k's own router and the global one on its share of the test split (partitioned like the train
    split): {"partition-id", "examples", "own_router", "global_router"} perplexities. With ``out_dir`` the
    client's final mixture (the global experts, its own router) is saved there."""
    from mixroute.data import make_batches
    from mixroute.evaluate import held_out_pass, perplexity
    from mixroute.federated.aggregate import client_state

    cfg, mix, cats = local.cfg, local.mix, local.data.categories
    ex = local.held_out_share(k, "test")
    row: dict[str, Any] = {"partition-id": k, "examples": len(ex)}
    batches = list(make_batches(ex, local.data.collate, cfg.eval.batch_size)) if ex else []
    for name, state in (("own_router", client_state(global_state, own)), ("global_router", global_state)):
        mix.load_adapter_state_dict(state, source=f"client {k} ({name})")
        if batches:
            held = held_out_pass(local.model, mix, batches, device=local.accelerator.device)
            row[name] = perplexity(held.nll, held.tokens, held.task_ids, cats)
        if out_dir is not None and name == "own_router":   # beside personal/, which it must not replace
            out_dir.mkdir(parents=True, exist_ok=True)
            mix.save(str(out_dir))
    return row
