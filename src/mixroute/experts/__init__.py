"""Expert kinds, by ``mixture.expert``: weight banks patched onto the frozen linear layers, ``lora`` (stacked
LoRA experts) and ``dora`` (stacked DoRA experts: LoRA plus a magnitude per expert), and ``prompt`` (MoP's
prompt experts, ``experts/prompt.py``), injected at one layer instead.

``EXPERT_KINDS`` is the registry; ``BANKS`` the weight banks among them. A new kind is one module with an
``ExpertKind`` class (its ``Config`` settings, ``settings_name``, ``levels``; for a weight bank the
``LoraBank``-shaped ``for_module``, ``add_into``, ``expert``) and one line here."""

from __future__ import annotations

import dataclasses
from typing import Any

from mixroute.config import ConfigError, MixtureConfig
from mixroute.experts.base import ExpertKind
from mixroute.experts.dora import DoraBank
from mixroute.experts.lora import LoraBank, LoraExpertConfig, patch_linear, unpatch_linear
from mixroute.experts.prompt import PromptBank, PromptExpertConfig

BANKS: dict[str, type[LoraBank]] = {"lora": LoraBank, "dora": DoraBank}
EXPERT_KINDS: dict[str, type[ExpertKind]] = {**BANKS, "prompt": PromptBank}


def expert_kind(name: str) -> type[ExpertKind]:
    """The expert kind registered as ``name``; an unknown name lists the valid ones."""
    if name not in EXPERT_KINDS:
        raise ConfigError(f"mixture.expert: {name!r} is not valid; expected one of {', '.join(EXPERT_KINDS)}")
    return EXPERT_KINDS[name]


def expert_settings(cfg: MixtureConfig) -> Any:
    """The settings of ``cfg``'s expert kind (``mixture.experts.<its settings_name>``, typed, defaults filled)."""
    return expert_kind(cfg.expert).settings(cfg)


def expert_rank(cfg: MixtureConfig) -> int:
    """The rank of each expert under ``cfg`` (LoRA / DoRA ``rank``; 1 for kinds without ranks)."""
    return int(getattr(expert_settings(cfg), "rank", 1))


def update_expert_settings(cfg: MixtureConfig, **changes: Any) -> None:
    """Set ``changes`` in ``cfg``'s expert kind's settings (in place; the other entries are kept)."""
    kind = expert_kind(cfg.expert)
    cfg.experts = {**(cfg.experts or {}), kind.settings_name: dataclasses.replace(kind.settings(cfg), **changes)}


__all__ = ["BANKS", "DoraBank", "EXPERT_KINDS", "ExpertKind", "LoraBank", "LoraExpertConfig", "PromptBank",
           "PromptExpertConfig", "expert_kind", "expert_rank", "expert_settings", "patch_linear", "unpatch_linear",
           "update_expert_settings"]
