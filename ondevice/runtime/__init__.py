"""The runtime: `load(path)` picks a loader by artifact kind (GGUF today; more targets join as they land)."""

from __future__ import annotations

from pathlib import Path

from ondevice.errors import InvalidModelError


def load(model: str | Path | None = None, *, threads: int | None = None, n_ctx: int | None = None):
    """Load a model for generation. `model` is a path, an alias, or None for the bundled default."""
    from ondevice.hub import resolve_model
    from ondevice.runtime.model import LanguageModel

    path = resolve_model(None if model is None else str(model))
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return LanguageModel(path, threads=threads, n_ctx=n_ctx)
    raise InvalidModelError(f"{path}: the runtime loads GGUF files (convert it first: ondevice convert "
                            f"{path} --to gguf)")
