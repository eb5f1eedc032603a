"""Typed configuration: dataclasses with a help text per field, YAML files and ``key=value`` overrides.

Every field carries its documentation in ``metadata["help"]`` (printed by ``mixroute config show``) and every
value is checked against its annotation (``Literal`` choices, numbers, booleans, optional values, lists), so a
typo in a YAML file or an override fails with the key, the bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mixroute.fileio import atomic_write_text


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what is valid."""


def f(default: Any, help: str, **checks: Any) -> Any:
    """A config field with its help text; ``checks`` may hold ``ge``/``gt``/``le``/``lt`` numeric bounds."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: Optional[str] = f(None, "Base model: null for the embedded SmolLM2-135M-Instruct, a local directory, or a "
                              "Hugging Face id already in the local cache. 'tiny' is the random test model.")
    dtype: Literal["float32", "bfloat16", "float16"] = f("float32", "Parameter dtype of the frozen base model.")
    device: str = f("auto", "Where training runs: auto (CUDA when torch sees a GPU, else CPU), cpu or cuda "
                            "(several GPUs: `accelerate launch`). eval/generate/prune/serve take --device.")
    precision: Literal["no", "bf16", "fp16"] = f("no", "Autocast compute precision (the frozen weights keep "
                                                       "dtype): bf16 or fp16 on GPUs, no = dtype.")


@dataclass
class DataConfig:
    path: Optional[str] = f(None, "JSONL/JSON/CSV/Parquet file in the Dolly schema; null for the built-in "
                              "synthetic multi-task suite.")
    columns: dict = f({}, "Column mapping from our fields to yours, e.g. {instruction: prompt, response: "
                          "completion, category: task}. Fields: instruction, context, response, category.")
    categories: Optional[list] = f(None, "Keep only these categories (null = all).")
    max_per_category: Optional[int] = f(None, "Cap on records per category after loading (null = no cap); "
                                              "sampling is seeded.", ge=1)
    synthetic_per_task: int = f(200, "Records per task family of the built-in synthetic suite.", ge=1)
    synthetic_suite: Literal["formats", "conventions", "ciphers"] = f(
        "formats", "Built-in synthetic suite (path: null): 'formats', eight task families with different input "
                   "and output formats; 'conventions', six tasks with the same inputs (dates) and conflicting "
                   "output conventions that a marker in the instruction names; 'ciphers', four tasks with the "
                   "same inputs (8 digits) and conflicting digit substitutions that a marker names (the demo's "
                   "suite, built as the case where one shared LoRA would suffer interference).")
    template: Literal["chat", "plain"] = f("chat", "Prompt template: the tokenizer's chat template or a plain "
                                                   "'### Instruction / ### Response' template.")
    max_length: int = f(256, "Maximum tokens per example; longer examples are truncated (counted and reported).",
                        ge=8)
    val_fraction: float = f(0.1, "Fraction of each category held out for validation.", ge=0.0, lt=1.0)
    test_fraction: float = f(0.1, "Fraction of each category held out for the test split.", ge=0.0, lt=1.0)
    seed: int = f(0, "Seed of the stratified split and any sampling.")


# Which experts run below a per-layer router while router pre-training caches its features; the field below,
# train.gate.router_inputs and bench/router_pretrain.py read the choices from here.
PretrainExperts = Literal["label", "uniform", "none"]
PRETRAIN_EXPERTS: tuple[str, ...] = typing.get_args(PretrainExperts)


@dataclass
class MixtureConfig:
    """What every mixture shares. Each router and each expert kind owns its other settings (its ``Config``
    dataclass, registered with its class): they live in ``routers`` and ``experts``, one mapping per name, so a
    config shared by several methods can hold the settings of every router they use."""
    expert: str = f("lora", "Expert kind (registered in mixroute.experts.EXPERT_KINDS): 'lora' (LoRA expert bank), "
                            "'dora' (DoRA experts: LoRA plus a learned magnitude per output row, PEFT's use_dora; "
                            "routed per sequence or per token; its settings are lora's) or 'prompt' (soft-prompt "
                            "experts, MoP). Its settings: experts.<kind>.")
    router: str = f("task", "Router (registered in mixroute.routers.ROUTERS): single (E=1 plain LoRA / prompt), "
                            "uniform, oracle (route by label), task (MoA), token_topk (MoE-LoRA), poly (Poly/MHR), "
                            "rank (SMoRA), gate (MoP's MLP gate), centroid and arrow (expert library: extend without "
                            "retraining). Prompt experts take the sequence-level ones: single, uniform, oracle, task, "
                            "gate, centroid. Its settings: routers.<name>.")
    num_experts: int = f(8, "Number of experts E (LoRA experts, Poly skills, or prompt groups).", ge=1)
    num_tasks: int = f(8, "Number of tasks with their own allocation (poly) or labels (oracle/task/gate).", ge=1)
    experts: dict = f({}, "Settings of each expert kind, by its settings name: {lora: {rank: 8, alpha: 16}, "
                          "prompt: {num_virtual_tokens: 10}} (dora reads lora's). Unset keys take the kind's "
                          "defaults; `mixroute config show` lists every key.")
    routers: dict = f({}, "Settings of each router, by name: {task: {eta: 0.1}, gate: {gate_hidden: 256}}. Only "
                          "the router the method uses reads its entry; `mixroute config show` lists every key.")
    router_scope: Literal["layer", "global"] = f("layer", "Sequence routers of LoRA experts: one per layer, reading "
                                                          "that layer's input (shared by its attention and MLP "
                                                          "LoRAs; the MoA paper's layout), or one global router "
                                                          "whose single decision per sequence is applied at every "
                                                          "layer (it reads router_layer of the frozen base).")
    router_layer: Optional[int] = f(None, "router_scope='global': the decoder layer whose input the router reads, "
                                          "computed from the frozen base (no experts) in a routing pre-pass that "
                                          "stops at that layer; 0 reads the embeddings (no pre-pass); null = the "
                                          "middle layer.", ge=0)
    gate_pretrain_steps: int = f(500, "Router pre-training (MoP's gate, MoA's task router): cap on optimizer steps "
                                    "of training the label-aligned router alone on category labels, over cached "
                                    "features of the whole train split (batches of 32, cycled by epoch) with the "
                                    "experts frozen, stopping once validation cross-entropy has not improved by 1% "
                                    "for 3 epochs (best kept); run before the experts train, or before MoA's stage 2 "
                                    "(0 = none; train.gate.pretrain_router).", ge=0)
    gate_pretrain_lr: float = f(1e-3, "Learning rate of router pre-training (gate_pretrain_steps).", gt=0.0)
    gate_pretrain_experts: PretrainExperts = f(
        "label", "Router pre-training of per-layer routers (router_scope='layer'): which experts run below each "
                 "router while its features are cached. label: the example's own at every layer (what stage 2 "
                 "runs once routing is right; the label also reaches the features, so every router above the "
                 "first can read it from the experts below); uniform: every expert averaged (no label in the "
                 "features); none: the frozen base. Routers reading the frozen base (MoP's gate, a global "
                 "router) are unaffected.")
    seed: int = f(0, "Seed of expert and router initialisation.")
    route_cost_weight: float = f(0.0, "Expert library: lambda of cost-aware routing, the choice is argmax over "
                                      "experts of predicted quality - lambda * cost (0 = ignore costs).", ge=0.0)


# The flat mixture keys of mixroute before each router and expert kind owned its settings, and the sections
# that declare them now. A frozen record of that old schema (archived run directories and users' files hold
# these keys); a new router's settings never go here.
MOVED: dict[str, tuple[str, ...]] = {
    **{k: ("experts.lora",) for k in ("rank", "alpha", "dropout", "target_modules", "mlp_only", "allow_partial")},
    **{k: ("experts.prompt",) for k in ("num_virtual_tokens", "inject_layer", "gate_layer", "prompt_init",
                                        "prompt_init_text")},
    "top_k": ("routers.task", "routers.token_topk", "routers.centroid"),
    "eta": ("routers.task", "routers.gate"),
    "route_train": ("routers.task",),
    "load_balance": ("routers.token_topk",),
    "n_splits": ("routers.poly",), "poly_mode": ("routers.poly",),
    "rank_top_k": ("routers.rank",), "bias_update_rate": ("routers.rank",),
    "gate_hidden": ("routers.gate",), "gate_top_k": ("routers.gate",),
    "centroid_temperature": ("routers.centroid",),
    "arrow_top_k": ("routers.arrow",), "arrow_temperature": ("routers.arrow",),
}


class MovedKeyWarning(FutureWarning):
    """A flat mixture key of an older mixroute was read and moved into its router's or expert kind's settings."""


def _move_flat_keys(data: dict, prefix: str) -> dict:
    """``data`` (a mixture section) with its old flat keys moved into ``experts`` / ``routers``, with one warning
    naming where each went; a key given both ways is an error."""
    flat = {k: v for k, v in data.items() if k in MOVED}
    if not flat:
        return data
    out = {k: v for k, v in data.items() if k not in MOVED}
    for section in ("experts", "routers"):
        if not isinstance(out.get(section) or {}, dict):
            return out   # from_dict reports the bad section
        out[section] = {n: dict(e) if isinstance(e, dict) else e for n, e in (out.get(section) or {}).items()}
    moved = []
    for k, v in flat.items():
        for where in MOVED[k]:
            section, name = where.split(".")
            entry = out[section].setdefault(name, {})
            if not isinstance(entry, dict):
                break   # from_dict reports it
            if k in entry:
                raise ConfigError(f"{prefix}{k} and {prefix}{where}.{k} are both set; keep {prefix}{where}.{k}")
            entry[k] = v
        moved.append(f"{prefix}{k} -> " + " and ".join(f"{prefix}{w}.{k}" for w in MOVED[k]))
    import warnings

    warnings.warn("flat mixture keys are deprecated (each router and expert kind owns its settings; "
                  "`mixroute config show` lists them); read as: " + "; ".join(moved), MovedKeyWarning, stacklevel=3)
    return out


def settings_of(cls: type, value: Any, where: str, owner: str) -> Any:
    """``value`` (a mapping from YAML, or already a ``cls`` instance) as ``cls``: the typed settings a router or
    expert kind declares, checked key by key; ``where`` is the config key it was read from."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not isinstance(value, cls):
            raise ConfigError(f"{where}: holds {type(value).__name__}; {owner} takes {cls.__name__}")
        return value
    try:
        return from_dict(cls, value, f"{where}.")
    except ConfigError as e:
        raise ConfigError(f"{e} ({owner})") from None


@dataclass
class TrainConfig:
    method: Literal["base", "prompt_tuning", "lora_mixed", "lora_single", "moa", "moe_lora", "moe_lora_naive",
                    "poly", "mhr", "smora", "mop", "mixture"] = f(
        "mixture", "Training recipe; 'mixture' trains whatever the mixture section describes, 'moa' runs stage 1 "
                   "(one LoRA per category) then stage 2 (router), 'base' trains nothing.")
    max_steps: int = f(100, "Optimizer steps.", ge=0)
    batch_size: int = f(8, "Sequences per micro-batch.", ge=1)
    grad_accum: int = f(1, "Micro-batches per optimizer step.", ge=1)
    lr: float = f(2e-4, "Peak learning rate (AdamW).", gt=0.0)
    router_lr: Optional[float] = f(None, "Peak learning rate of router / gate parameters (null = train.lr; 0 = "
                                         "they keep what router pre-training or their initialisation gave them). "
                                         "A linear router trained by cross-entropy needs a larger step than "
                                         "LoRA weights to learn in a few hundred steps.", ge=0.0)
    weight_decay: float = f(0.0, "AdamW weight decay.", ge=0.0)
    warmup_steps: int = f(10, "Linear warm-up steps before the cosine decay.", ge=0)
    clip_grad: float = f(1.0, "Gradient norm clipping (0 = off).", ge=0.0)
    eval_every: int = f(50, "Validation perplexity every N steps (0 = only at the end).", ge=0)
    patience: int = f(0, "Early stopping: stop after this many validations (eval_every steps apart) without a "
                         "lower validation perplexity and keep the best weights; max_steps / stage1_steps stay "
                         "the caps (0 = off, train to the cap).", ge=0)
    stage1_eval_every: Optional[int] = f(None, "MoA stage 1: validation of each category's LoRA on that "
                                               "category's validation examples every N steps, for patience "
                                               "(null = eval_every; 0 = none).", ge=0)
    save_every: int = f(50, "Checkpoint every N steps (0 = only at the end).", ge=0)
    stage1_steps: int = f(50, "MoA stage 1: steps per category LoRA.", ge=0)
    stage1_lr: Optional[float] = f(None, "MoA stage 1: peak learning rate of the category LoRAs (null = "
                                         "train.lr). Stage 2 starts from LoRAs that early stopping left at their "
                                         "validation optimum and needs a smaller step than stage 1.", gt=0.0)
    stage1_adapters: Optional[list] = f(None, "MoA stage 2 from given PEFT adapter directories (skips stage 1).")
    length_grouped: bool = f(False, "Group similar lengths into batches (less padding).")
    seed: int = f(0, "Seed of data order, dropout and initialisation.")


@dataclass
class EvalConfig:
    max_new_tokens: int = f(64, "Greedy generation length for BLEU / ROUGE-L.", ge=1)
    batch_size: int = f(8, "Sequences per evaluation batch.", ge=1)
    max_generate: Optional[int] = f(64, "Test examples per category used for generation metrics (null = all).",
                                    ge=1)
    split: Literal["validation", "test"] = f("test", "Held-out split to evaluate.")
    max_eval: Optional[int] = f(None, "Held-out examples per category for perplexity, router accuracy, gate "
                                      "statistics and validation during training (null = all).", ge=1)


@dataclass
class FederatedConfig:
    clients: int = f(8, "Number of clients (Flower SuperNodes), each holding one partition of the train split.",
                     ge=1)
    rounds: int = f(10, "Federated rounds (of stage 2 for MoA).", ge=1)
    stage1_rounds: Optional[int] = f(None, "MoA (train.method moa): rounds of federated stage 1 before the `rounds` "
                                           "of stage 2. Each client trains the experts of the categories it holds, "
                                           "each sequence routed to its label's expert (routers not run; "
                                           "train.stage1_lr), and sends only those experts; each expert becomes "
                                           "the average over the clients holding its category, weighted by their "
                                           "examples of it. null = as many as `rounds` for moa, 0 for other "
                                           "methods; 0 = none (stage 2 starts from fresh experts).", ge=0)
    patience: int = f(0, "Stage 2: stop after this many rounds without a lower average validation perplexity (the "
                         "server's evaluation after each round) and keep the best round's global state as the "
                         "final mixture; `rounds` stays the cap. Only rounds that trained count (never the "
                         "start). 0 = off: every round runs and the last one is final.", ge=0)
    fraction: float = f(1.0, "Fraction of the clients sampled per round (at least min_clients).", gt=0.0, le=1.0)
    min_clients: int = f(1, "Minimum clients sampled per round, and the nodes the server waits for before the "
                            "first round (so a dead node cannot hang it).", ge=1)
    local_steps: int = f(10, "Optimizer steps per client per round (AdamW restarted every round, cosine decay "
                             "over these steps, no warm-up: train.warmup_steps is not used).", ge=1)
    batch_size: Optional[int] = f(None, "Sequences per local micro-batch (null = train.batch_size).", ge=1)
    aggregation: str = f(
        "fedavg", "A rule registered in mixroute.federated.aggregate.RULES. Built in: fedavg: every tensor "
                  "averaged with weights n_k (client examples); fedprox: the same average, "
                  "clients add (mu/2)||w - w_global||^2 to their loss; usage: each expert's tensors averaged with "
                  "weights n_k * u_ke (client k's routing mass on expert e), an expert no client used keeps its "
                  "previous value.")
    proximal_mu: float = f(0.01, "FedProx: weight mu of the proximal term (aggregation=fedprox only).", ge=0.0)
    personalize_router: bool = f(False, "Keep routers / gates per client (not averaged): each client trains its own "
                                        "router; the global router is the example-weighted average (global test "
                                        "split), per-client evaluation uses the client's own router.")
    round_timeout: Optional[float] = f(600.0, "Seconds the server waits for a round's replies (null = forever); "
                                              "clients that did not answer count as failed.", gt=0.0)
    partition: Literal["iid", "dirichlet", "mop_skew"] = f(
        "mop_skew", "How the train split is divided among clients: iid (shuffled, equal shares), dirichlet "
                    "(per category, shares ~ Dir(alpha)), mop_skew (MoP appendix A: per category one share 15x "
                    "each of the others, shares assigned to clients at random).")
    dirichlet_alpha: float = f(0.5, "dirichlet: concentration alpha (small = more skewed).", gt=0.0)
    partition_total: Optional[int] = f(5000, "mop_skew: samples drawn in total from the train split before "
                                             "partitioning (null or more than available = all).", ge=1)
    skew_factor: float = f(15.0, "mop_skew: the large share of each category is this many times each small one.",
                           ge=1.0)
    partition_seed: int = f(0, "Seed of the partition (and of client sampling per round).")
    cpus_per_client: float = f(1.0, "Simulation: CPU cores Ray gives each client.", gt=0.0)
    device: str = f("cpu", "Where clients train and the server evaluates: cpu (the default, what CI runs), cuda, "
                           "or auto (cuda when torch sees a GPU). `mixroute federate --device`. model.device is "
                           "for central training and is not read here.")
    gpus_per_client: Optional[float] = f(None, "Simulation with device cuda: the GPU share Ray gives each client "
                                               "(null = all clients share the machine's GPUs at once: GPUs / "
                                               "clients, at most 1). Ignored on the CPU.", gt=0.0)


@dataclass
class RunConfig:
    output_dir: str = f("runs/run", "Run directory (config.yaml, metrics.jsonl, checkpoints/, eval.json, gates.json).")
    model: ModelConfig = f(None, "Base model.")
    data: DataConfig = f(None, "Data set, template and split.")
    mixture: MixtureConfig = f(None, "Experts and router.")
    train: TrainConfig = f(None, "Optimisation.")
    eval: EvalConfig = f(None, "Evaluation.")
    federated: FederatedConfig = f(None, "Federated training (mixroute federate; ignored by mixroute train).")

    def __post_init__(self) -> None:
        for fl in dataclasses.fields(self):
            if getattr(self, fl.name) is None and dataclasses.is_dataclass(_resolve(fl.type)):
                setattr(self, fl.name, _resolve(fl.type)())


# ---------------------------------------------------------------------------------------------------------
# Validation (hand-written: ~60 lines buy exact error messages; pydantic would add a model layer per section)


def _resolve(tp: Any) -> Any:
    if isinstance(tp, str):
        return eval(tp, globals())  # annotations are strings under `from __future__ import annotations`
    return tp


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner[:-1]:
            try:
                return _check_value(key, value, a, meta)
            except ConfigError:
                continue
        try:
            return _check_value(key, value, inner[-1], meta)
        except ConfigError:
            if len(inner) == 1:
                raise
            raise ConfigError(f"{key}: {value!r} ({type(value).__name__}) is not valid; expected "
                              f"{_describe(tp)}") from None
    if origin is Literal:
        # YAML 1.1 reads a bare no / yes as a boolean; a choice named "no" (model.precision) means the word
        if isinstance(value, bool) and str(value).lower() not in typing.get_args(tp):
            value = {False: "no", True: "yes"}[value]
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not valid; expected {_describe(tp)}")
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }.get(tp)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 5e-5 (no dot, unsigned exponent) as a string; it is the number a user means
        try:
            value = float(value)
        except ValueError:
            pass
    if ok is not None and not ok(value):
        raise ConfigError(f"{key}: {value!r} ({type(value).__name__}) is not valid; expected {_describe(tp)}")
    if tp is float:
        value = float(value)
    for name, test, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                             ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        if name in meta and not test(value, meta[name]):
            raise ConfigError(f"{key}: {value!r} is out of range; must be {word} {meta[name]}")
    return value


class RetiredKeyWarning(UserWarning):
    """A config key an older mixroute wrote was read and ignored."""


# Keys older versions wrote into config.yaml files. Archived run directories and users' files must still load,
# so such a key is dropped with a warning that says what replaced it, instead of failing as unknown.
RETIRED: dict[str, str] = {
    "federated.inject_failures": "failure injection is a test aid, no longer a setting: tests wrap the ClientApp "
                                 "(tests/federated/test_federated.py)",
}


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build a config dataclass from a dict, checking every key and value (retired keys: ``RETIRED``)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    retired = [k for k in data if f"{prefix}{k}" in RETIRED]
    if retired:
        import warnings

        data = {k: v for k, v in data.items() if k not in retired}
        for k in retired:
            warnings.warn(f"config key {prefix}{k} is retired and ignored: {RETIRED[prefix + k]}", RetiredKeyWarning,
                          stacklevel=2)
    if cls is MixtureConfig:
        data = _move_flat_keys(data, prefix)
    fields = {fl.name: fl for fl in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)   # in the class's own module: routers and expert kinds declare settings too
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML: ``3``, ``0.1``, ``true``, ``null``, ``[a, b]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=300)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or defaults when path is None) with ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every field, recursively: the source of `mixroute config show`."""
    rows = []
    inst = cls()
    hints = typing.get_type_hints(cls)
    for fl in dataclasses.fields(cls):
        tp = hints[fl.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{fl.name}.")
        else:
            rows.append((f"{prefix}{fl.name}", _describe(tp), getattr(inst, fl.name), fl.metadata.get("help", "")))
    return rows
