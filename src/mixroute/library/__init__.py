"""Expert libraries (docs/library.md): a directory of PEFT LoRA experts on one base model, with routers that
extend without retraining the experts (centroid, arrow, a refittable task router) and cost-aware selection."""

from mixroute.library.manifest import LibraryError, Manifest, read_manifest

__all__ = ["Library", "LibraryError", "Manifest", "read_manifest"]


def __getattr__(name: str):
    # Library brings torch and the mixture with it; what only reads a library's files (a report) does not need them
    if name == "Library":
        from mixroute.library.api import Library

        return Library
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
