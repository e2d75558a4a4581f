"""The runtime: `load(path)` picks a loader by artifact kind; a new kind is one entry in LOADERS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError


def _load_gguf(path: Path, threads: int | None, n_ctx: int | None) -> Any:
    from ondevice.runtime.model import LanguageModel

    return LanguageModel(path, threads=threads, n_ctx=n_ctx)


def _load_pte(path: Path, threads: int | None, n_ctx: int | None) -> Any:
    """An ExecuTorch program: its manifest and tokenizer sit beside it (a .pte carries neither)."""
    from tokenizers import Tokenizer

    from ondevice.model import ModelSpec
    from ondevice.runners.executorch_runner import ExecuTorchTransformer
    from ondevice.runtime.model import LanguageModel
    from ondevice.runtime.text import TextCodec

    transformer = ExecuTorchTransformer(path)
    manifest = transformer.manifest
    try:
        spec = ModelSpec(**manifest["spec"])
        special = manifest["special"]
        tokenizer = Tokenizer.from_file(str(path.parent / manifest["tokenizer"]))
        codec = TextCodec(tokenizer, special.get("bos_id"), list(special.get("eos_ids") or []),
                          bool(special.get("add_bos")))
    except Exception as exc:  # KeyError, TypeError, OSError, or the tokenizers library's own errors
        raise InvalidModelError(f"{path}: its manifest or tokenizer is missing or malformed ({exc})") from None
    return LanguageModel.from_backend(path, transformer, spec, codec, manifest.get("chat_template"), n_ctx=n_ctx)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


# (matches(path), loader(path, threads, n_ctx)) in order of precedence
LOADERS: list[tuple[Callable[[Path], bool], Callable[[Path, int | None, int | None], Any]]] = [
    (lambda p: p.is_file() and _is_gguf(p), _load_gguf),
    (lambda p: p.is_file() and p.suffix == ".pte", _load_pte),
]


def load(model: str | Path | None = None, *, threads: int | None = None, n_ctx: int | None = None):
    """Load a model for generation. `model` is a path (.gguf, .pte), an alias, or None for the bundled default."""
    from ondevice.hub import resolve_model

    path = resolve_model(None if model is None else str(model))
    for matches, loader in LOADERS:
        if matches(path):
            return loader(path, threads, n_ctx)
    raise InvalidModelError(f"{path}: the runtime loads GGUF files and ExecuTorch .pte programs (convert it "
                            f"first: ondevice convert {path} --to gguf)")
