"""Expert libraries (docs/library.md): a directory of PEFT LoRA experts on one base model, with routers that
extend without retraining the experts (centroid, arrow, a refittable task router) and cost-aware selection."""

from mixroute.library.api import Library
from mixroute.library.manifest import LibraryError, Manifest, read_manifest

__all__ = ["Library", "LibraryError", "Manifest", "read_manifest"]
