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
from typing import Optional

from mixroute.config import ConfigError, MixtureConfig, RunConfig

STAGE1_METHODS = ("lora_single", "moa", "moe_lora")
PER_CATEGORY_METHODS = ("lora_single", "moa", "moe_lora", "moe_lora_naive")


def needs_stage1(cfg: RunConfig) -> bool:
    """Whether the method trains (or loads) one LoRA per category before the mixture."""
    return cfg.train.method in STAGE1_METHODS


def mixture_config(cfg: RunConfig, num_categories: int) -> Optional[MixtureConfig]:
    """The ``MixtureConfig`` that ``cfg.train.method`` trains (None for ``base``); raises ConfigError."""
    method = cfg.train.method
    m = copy.deepcopy(cfg.mixture)
    m.num_tasks = num_categories
    if method == "base":
        return None
    weights = "dora" if m.expert == "dora" else "lora"   # the LoRA methods keep a DoRA choice
    if method in PER_CATEGORY_METHODS:
        m.expert, m.num_experts = weights, num_categories
    if method == "prompt_tuning":
        m.expert, m.router, m.num_experts, m.inject_layer, m.eta = "prompt", "single", 1, 0, 0.0
    elif method == "lora_mixed":
        m.expert, m.router, m.num_experts = weights, "single", 1
    elif method == "lora_single":
        m.router = "oracle"
    elif method == "moa":
        m.router = "task"
    elif method in ("moe_lora", "moe_lora_naive"):
        m.router = "token_topk"
    elif method == "poly":
        m.expert, m.router, m.n_splits = weights, "poly", 1
    elif method == "mhr":
        m.expert, m.router = weights, "poly"
        if m.n_splits < 2:
            raise ConfigError("train.method 'mhr' needs mixture.n_splits > 1 (heads splitting the input "
                              f"dimension); got {m.n_splits}. Use method 'poly' for n_splits = 1")
    elif method == "smora":
        m.expert, m.router = weights, "rank"
    elif method == "mop":
        m.expert, m.router = "prompt", "gate"
    check_mixture(m, num_categories, method)
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
    m = copy.deepcopy(cfg.mixture)
    m.expert = "dora" if m.expert == "dora" else "lora"
    m.router, m.num_experts = "single", 1
    return m


def is_label_aligned(m: Optional[MixtureConfig]) -> bool:
    """Routers whose expert e stands for category e (router accuracy, classifier baseline)."""
    from mixroute.routers import router_class

    return m is not None and router_class(m.router).label_aligned and m.num_experts > 1
