"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

A failure or Ctrl-C at any point leaves no partial artifact and never touches an existing output
(unless the write succeeds and --force was given).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ondevice.errors import OndeviceError, OutputExistsError


def check_output_path(path: Path, force: bool) -> None:
    """Fail early (before any expensive work) if the output cannot be written."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OndeviceError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OndeviceError(f"cannot write {path}: folder {parent} is not writable")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_output(path: Path, *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (created as a folder if `directory`); rename on success."""
    path = Path(path)
    check_output_path(path, force)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            # Replacing needs two steps for folders; keep the old one until the new one is in place.
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: Path, text: str, *, force: bool = False) -> None:
    """A small text file (manifest, tokenizer) written whole or not at all."""
    with atomic_output(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
