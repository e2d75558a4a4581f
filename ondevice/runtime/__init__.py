"""The runtime: `load(path)` picks a loader by artifact kind; a new kind is one entry in LOADERS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError, OndeviceError


def _load_gguf(path: Path, threads: int | None, n_ctx: int | None, kv_cache: str | None) -> Any:
    from ondevice.runtime.kv import DEFAULT_KV_CACHE
    from ondevice.runtime.model import LanguageModel

    return LanguageModel(path, threads=threads, n_ctx=n_ctx, kv_cache=kv_cache or DEFAULT_KV_CACHE)


def _load_pte(path: Path, threads: int | None, n_ctx: int | None, kv_cache: str | None) -> Any:
    """An ExecuTorch program: its manifest and tokenizer sit beside it (a .pte carries neither)."""
    if kv_cache is not None:
        raise OndeviceError(f"{path}: an ExecuTorch program's KV cache type is fixed when it is exported")
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


# (matches(path), loader(path, threads, n_ctx, kv_cache)) in order of precedence
LOADERS: list[tuple[Callable[[Path], bool], Callable[[Path, int | None, int | None, str | None], Any]]] = [
    (lambda p: p.is_file() and _is_gguf(p), _load_gguf),
    (lambda p: p.is_file() and p.suffix == ".pte", _load_pte),
]


def load(model: str | Path | None = None, *, threads: int | None = None, n_ctx: int | None = None,
         kv_cache: str | None = None, draft: str | Path | None = None):
    """Load a model for generation. `model` is a path (.gguf, .pte), an alias, or None for the bundled default.

    threads: default the physical cores; n_ctx: default the model's context length, capped (see LanguageModel);
    kv_cache: "f16" (default for GGUF: half the memory, and the numerics of llama.cpp's default) or "f32";
    draft: a second model with the same vocabulary (path or alias) that drafts for `speculate="draft"`.
    """
    from ondevice.hub import resolve_model

    path = resolve_model(None if model is None else str(model))
    for matches, loader in LOADERS:
        if matches(path):
            loaded = loader(path, threads, n_ctx, kv_cache)
            if draft is not None:
                try:
                    loaded.set_draft(load(draft, threads=threads, n_ctx=loaded.n_ctx, kv_cache=kv_cache))
                except BaseException:
                    loaded.close()
                    raise
            return loaded
    raise InvalidModelError(_not_loadable(path))


def _not_loadable(path: Path) -> str:
    """Say what the path is not, and suggest a conversion only for what `convert` can read (HF folders)."""
    loads = "the runtime loads GGUF files and ExecuTorch .pte programs"
    if path.is_dir():
        if (path / "config.json").is_file():
            return f"{path}: a Hugging Face folder; {loads} (convert it first: ondevice convert {path} --to gguf)"
        return f"{path}: a folder that is not a model; {loads}"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return f"{path}: an empty file, not a GGUF file or .pte program"
    return f"{path}: not a GGUF file (it starts with {head!r}, not b'GGUF'); {loads}"
