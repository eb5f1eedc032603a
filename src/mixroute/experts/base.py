"""What every expert kind declares, the way ``routers.base.Router`` does for routers."""

from __future__ import annotations

from typing import Any, ClassVar

from mixroute.config import MixtureConfig, settings_of


class ExpertKind:
    """Declarations of an expert kind's class: ``Config`` (its settings, a dataclass with a help text per
    field), ``settings_name`` (its key in ``mixture.experts``; kinds that share settings share it) and
    ``levels`` (the routing levels it can apply, ``routers.base.Level``); an instance answers
    ``expert_axes()``: how its parameters stack the experts, which is what federated training slices per
    expert (usage-weighted averaging, stage 1's trimmed payloads)."""

    Config: ClassVar[type]
    settings_name: ClassVar[str]
    levels: ClassVar[tuple[str, ...]]

    def expert_axes(self) -> dict[str, tuple[int, int]]:
        """{parameter name: (dim, block)}: expert e owns ``[e*block, (e+1)*block)`` of that dimension; a
        parameter not named is shared by the experts."""
        raise NotImplementedError

    @classmethod
    def settings(cls, cfg: MixtureConfig) -> Any:
        """This kind's settings under ``cfg``: ``cfg.experts[settings_name]`` typed as ``Config``."""
        return settings_of(cls.Config, (cfg.experts or {}).get(cls.settings_name),
                           f"mixture.experts.{cls.settings_name}", f"expert kind {cfg.expert!r}")
