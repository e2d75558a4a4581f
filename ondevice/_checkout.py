"""Importing ondevice from a source checkout (the repository root on sys.path, where a new user stands).

An install maps the top-level `converters/` folder to `ondevice.converters` (setup.py) and builds the C extension
into the installed package. When Python finds `ondevice/` in the checkout first, neither is true there: this
module makes `ondevice.converters` resolve to the checkout's `converters/`, and `ondevice._kernels` to the
extension built in place or, failing that, to the one of an installed copy of the same version.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_CONVERTERS = _PACKAGE_DIR.parent / "converters"
_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def in_checkout() -> bool:
    return (_CHECKOUT_CONVERTERS / "__init__.py").is_file() and not (_PACKAGE_DIR / "converters").exists()


def _installed_extension() -> Path | None:
    """The `_kernels` extension of another `ondevice` package on sys.path (e.g. `pip install .` into site-packages)."""
    for entry in sys.path:
        try:
            folder = (Path(entry or ".") / "ondevice").resolve()
        except OSError:
            continue
        if folder == _PACKAGE_DIR or not folder.is_dir():
            continue
        for suffix in _EXTENSION_SUFFIXES:
            candidate = folder / f"_kernels{suffix}"
            if candidate.is_file():
                return candidate
    return None


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "ondevice.converters":
            return importlib.util.spec_from_file_location(
                fullname, _CHECKOUT_CONVERTERS / "__init__.py",
                submodule_search_locations=[str(_CHECKOUT_CONVERTERS)])
        if fullname == "ondevice._kernels":
            if any((_PACKAGE_DIR / f"_kernels{suffix}").is_file() for suffix in _EXTENSION_SUFFIXES):
                return None  # built in place: the ordinary finder loads it
            installed = _installed_extension()
            if installed is not None:
                loader = importlib.machinery.ExtensionFileLoader(fullname, str(installed))
                return importlib.util.spec_from_file_location(fullname, installed, loader=loader)
        return None


def install() -> None:
    if in_checkout() and not any(isinstance(finder, _CheckoutFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
