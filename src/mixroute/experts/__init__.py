"""Expert banks: ``lora`` (stacked LoRA experts, this package) and ``prompt`` (MoP prompt experts)."""

from mixroute.experts.lora import LoraBank, patch_linear, unpatch_linear

__all__ = ["LoraBank", "patch_linear", "unpatch_linear"]
