"""Running from the repository root, where a new user stands after `pip install .`: the checkout's `ondevice/`
shadows the installed package, so `ondevice.converters` and the C extension must still resolve."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ondevice._kernels

ROOT = Path(__file__).resolve().parents[1]
# An editable install of this repository (the test set-up) would supply both through its own finder: drop it,
# so the probe sees what a plain `pip install .` gives.
PROBE = ("import sys\n"
         "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
         "import ondevice, ondevice.converters, ondevice.converters.gguf\n"
         "print(ondevice.__file__); print(ondevice.converters.__file__)\n"
         "from ondevice.runtime.transformer import kernels\n"
         "print(kernels().__file__)\n")


def _checkout_without_extension(tmp_path: Path) -> Path:
    checkout = tmp_path / "checkout"
    for folder in ("ondevice", "converters"):
        shutil.copytree(ROOT / folder, checkout / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "_kernels*.so", "_kernels*.pyd"))
    return checkout


def _run(cwd: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_checkout_finds_its_converters_and_an_installed_extension(tmp_path: Path) -> None:
    checkout = _checkout_without_extension(tmp_path)
    installed = tmp_path / "site" / "ondevice"
    installed.mkdir(parents=True)
    shutil.copy(ondevice._kernels.__file__, installed / Path(ondevice._kernels.__file__).name)
    result = _run(checkout, str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    package, converters, extension = result.stdout.split()
    assert Path(package).parent == (checkout / "ondevice").resolve()
    assert Path(converters).parent == (checkout / "converters").resolve()
    assert Path(extension).parent == installed.resolve()


def test_missing_extension_says_how_to_build_it(tmp_path: Path) -> None:
    result = _run(_checkout_without_extension(tmp_path))
    assert result.returncode != 0
    assert "build_ext --inplace" in result.stderr and "pip install ." in result.stderr
