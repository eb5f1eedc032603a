"""Training methods (``TrainConfig.method``) mapped to mixture configs.

Each method is a ``MixtureConfig`` derived from the run's ``mixture`` section plus, for some, a stage 1:

| method | experts / router | stage 1 |
|---|---|---|
| ``base`` | nothing attached, nothing trained | - |
| ``prompt_tuning`` | one soft prompt at the input: MoP path, prompt expert E=1, ``single`` router, inject_layer=0 | - |
| ``lora_mixed`` | one LoRA (``single``) on the mixed data | - |
| ``lora_single`` | one LoRA per category, ``oracle`` routing by label | the LoRAs *are* stage 1 |
| ``moa`` | stage-1 LoRAs loaded as experts + ``task`` router (routing CE weighted by eta) | yes |
| ``moe_lora`` | stage-1 LoRAs + ``token_topk`` router (no label information) | yes |
| ``moe_lora_naive`` | randomly initialised experts + ``token_topk`` router | - |
| ``poly`` / ``mhr`` | ``poly`` router (MHR: ``n_splits`` > 1) | - |
| ``smora`` | ``rank`` router | - |
| ``mop`` | prompt experts + ``gate`` router | - |
| ``mixture`` | the ``mixture`` section as written | - |

Methods with one expert per category set ``num_experts`` to the number of categories; every method sets
``num_tasks`` to it (labels are category ids). The LoRA methods train DoRA experts instead when the
``mixture`` section says ``expert: dora`` (MoA's stage-1 experts too); a method whose router mixes inside an
expert (``smora``, ``poly``, ``mhr``) then fails with the valid routers named.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from mixroute.config import ConfigError, MixtureConfig, RunConfig

STAGE1_METHODS = ("lora_single", "moa", "moe_lora")
PER_CATEGORY_METHODS = ("lora_single", "moa", "moe_lora", "moe_lora_naive")


def needs_stage1(cfg: RunConfig) -> bool:
    """Whether the method trains (or loads) one LoRA per category before the mixture."""
    return cfg.train.method in STAGE1_METHODS


def mixture_config(cfg: RunConfig, num_categories: int) -> Optional[MixtureConfig]:
    """The ``MixtureConfig`` that ``cfg.train.method`` trains (None for ``base``), its router's and expert
    kind's settings filled in; raises ConfigError."""
    from mixroute.experts import update_expert_settings
    from mixroute.mixture import settle
    from mixroute.routers import router_settings, update_router_settings

    method = cfg.train.method
    m = copy.deepcopy(cfg.mixture)
    m.num_tasks = num_categories
    if method == "base":
        return None
    weights = "dora" if m.expert == "dora" else "lora"   # the LoRA methods keep a DoRA choice
    if method in PER_CATEGORY_METHODS:
        m.expert, m.num_experts = weights, num_categories
    if method == "prompt_tuning":
        m.expert, m.router, m.num_experts = "prompt", "single", 1
        update_expert_settings(m, inject_layer=0)
    elif method == "lora_mixed":
        m.expert, m.router, m.num_experts = weights, "single", 1
    elif method == "lora_single":
        m.router = "oracle"
    elif method == "moa":
        m.router = "task"
    elif method in ("moe_lora", "moe_lora_naive"):
        m.router = "token_topk"
    elif method == "poly":
        m.expert, m.router = weights, "poly"
        update_router_settings(m, n_splits=1)
    elif method == "mhr":
        m.expert, m.router = weights, "poly"
        if (n := router_settings(m).n_splits) < 2:
            raise ConfigError("train.method 'mhr' needs mixture.routers.poly.n_splits > 1 (heads splitting the "
                              f"input dimension); got {n}. Use method 'poly' for n_splits = 1")
    elif method == "smora":
        m.expert, m.router = weights, "rank"
    elif method == "mop":
        m.expert, m.router = "prompt", "gate"
    check_mixture(m, num_categories, method)
    return settle(m)


def recorded_mixture(cfg: RunConfig, used_only: bool = False) -> MixtureConfig:
    """``cfg.mixture`` as a run records it: the settings of every registered router and expert kind, typed,
    defaults filled (so a later change of a default cannot alter what an old run says it ran). ``used_only``:
    only the settings of the router and expert kind the method trains, what decides whether two runs are the
    same (an old flat key such as top_k was recorded for every router that reads it)."""
    from mixroute.experts import EXPERT_KINDS, expert_kind
    from mixroute.mixture import settle
    from mixroute.routers import ROUTERS

    m = settle(cfg.mixture)
    m.routers = {name: cls.settings(m) for name, cls in ROUTERS.items()}
    m.experts = {kind.settings_name: kind.settings(m) for kind in EXPERT_KINDS.values()}
    if used_only:
        used = mixture_config(cfg, cfg.mixture.num_tasks) if cfg.train.method not in ("base", "mixture") else m
        m.routers = {} if used is None else {used.router: m.routers[used.router]}
        m.experts = {} if used is None else {expert_kind(used.expert).settings_name:
                                             m.experts[expert_kind(used.expert).settings_name]}
    # plain mappings, as a config.yaml reads back: a recorded config equals the one read from its run
    m.routers = {name: dataclasses.asdict(s) for name, s in m.routers.items()}
    m.experts = {name: dataclasses.asdict(s) for name, s in m.experts.items()}
    return m


def check_mixture(m: MixtureConfig, num_categories: int, method: str) -> None:
    """Config errors of the method's mixture (``num_tasks`` is already the number of categories), raised
    before anything is built; the message names the method."""
    from mixroute.mixture import validate_mixture

    try:
        validate_mixture(m)
    except ConfigError as e:
        raise ConfigError(f"train.method {method!r} ({num_categories} categories): {e}") from None


def stage1_config(cfg: RunConfig) -> MixtureConfig:
    """Stage 1 of MoA / lora_single / moe_lora: one LoRA (or DoRA) expert (E=1) with the run's LoRA shape."""
    from mixroute.mixture import settle

    m = copy.deepcopy(cfg.mixture)
    m.expert = "dora" if m.expert == "dora" else "lora"
    m.router, m.num_experts = "single", 1
    return settle(m)


def is_label_aligned(m: Optional[MixtureConfig]) -> bool:
    """Routers whose expert e stands for category e (router accuracy, classifier baseline)."""
    from mixroute.routers import router_class

    return m is not None and router_class(m.router).label_aligned and m.num_experts > 1
