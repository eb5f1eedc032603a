"""What every expert kind declares, the way ``routers.base.Router`` does for routers."""

from __future__ import annotations

from typing import Any, ClassVar

from mixroute.config import MixtureConfig, settings_of


class ExpertKind:
    """Declarations of an expert kind's class: ``Config`` (its settings, a dataclass with a help text per
    field), ``settings_name`` (its key in ``mixture.experts``; kinds that share settings share it) and
    ``levels`` (the routing levels it can apply, ``routers.base.Level``)."""

    Config: ClassVar[type]
    settings_name: ClassVar[str]
    levels: ClassVar[tuple[str, ...]]

    @classmethod
    def settings(cls, cfg: MixtureConfig) -> Any:
        """This kind's settings under ``cfg``: ``cfg.experts[settings_name]`` typed as ``Config``."""
        return settings_of(cls.Config, (cfg.experts or {}).get(cls.settings_name),
                           f"mixture.experts.{cls.settings_name}", f"expert kind {cfg.expert!r}")
