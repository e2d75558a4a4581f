"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

A failure or Ctrl-C at any point leaves no partial artifact and never touches an existing output
(unless the write succeeds and --force was given). Only kill -9 (or a power cut) can leave one behind; its name
carries the writer's pid, so the next write of the same output removes it once that process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
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


def _sibling(path: Path, kind: str) -> Path:
    """.NAME.PID.RANDOM.partial (being written) or .old (being replaced): ours by name, and whose by pid."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, OSError):  # not a pid this system can have
        return False
    return True


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the leftovers of writes of `path` whose writer died (kill -9): siblings named exactly as
    atomic_output names them for this output, whose pid is not a live process. Returns what was removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d{{1,10}})\.[0-9a-f]{{8}}\.(?:partial|old)")
    removed = []
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return []
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove(sibling)
            removed.append(sibling)
    return removed


@contextmanager
def atomic_output(path: Path, *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (created as a folder if `directory`); rename on success."""
    path = Path(path)
    check_output_path(path, force)
    stale = remove_stale_partials(path)
    if stale:
        print(f"ondevice: removed {len(stale)} partial output(s) of {path} left by a killed run: "
              f"{', '.join(p.name for p in sorted(stale))}", file=sys.stderr)
    tmp = _sibling(path, "partial")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            # Replacing needs two steps for folders; keep the old one until the new one is in place.
            old = _sibling(path, "old")
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
