"""Model sources: each reader turns a path into a lazy CanonicalModel."""

from __future__ import annotations

from pathlib import Path

from ondevice.errors import InvalidModelError
from ondevice.model import CanonicalModel


def open_source(path: str | Path, *, allow_pickle: bool = False) -> CanonicalModel:
    """Open a Hugging Face folder or a GGUF file."""
    from ondevice.sources.gguf import open_gguf_file
    from ondevice.sources.hf import open_hf_folder

    p = Path(path)
    if p.is_dir():
        return open_hf_folder(p, allow_pickle=allow_pickle)
    if not p.exists():
        raise InvalidModelError(f"{p}: no such file or folder (give a Hugging Face folder, a .gguf file or an alias)")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return open_gguf_file(p)
    raise InvalidModelError(f"{p}: not a GGUF file or a Hugging Face model folder")
