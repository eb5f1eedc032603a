"""Expert banks. Weight banks patched onto the frozen linear layers, by ``mixture.expert``: ``lora`` (stacked
LoRA experts) and ``dora`` (stacked DoRA experts: LoRA plus a magnitude per expert); ``prompt`` (MoP's prompt
experts, ``experts/prompt.py``) is injected at one layer instead.

``BANKS`` is the registry of weight banks: a new kind is one module with a ``LoraBank``-shaped class
(``for_module``, ``add_into``, ``expert``, the routing ``levels`` it accepts) and one line here."""

from mixroute.experts.dora import DoraBank
from mixroute.experts.lora import LoraBank, patch_linear, unpatch_linear

BANKS: dict[str, type[LoraBank]] = {"lora": LoraBank, "dora": DoraBank}

__all__ = ["BANKS", "DoraBank", "LoraBank", "patch_linear", "unpatch_linear"]
