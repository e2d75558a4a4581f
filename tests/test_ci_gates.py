"""The CI gates in tests/conftest.py: under ONDEVICE_REQUIRE_MODELS a skipped SmolLM2 test fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REQUIRE_ENV

TESTS = Path(__file__).resolve().parent

GENERATED_TESTS = '''
import pytest
from conftest import SMOLLM2_MISSING, require_or_skip


@pytest.fixture
def smollm2():
    pytest.skip(SMOLLM2_MISSING)  # what the real fixture does when the fetch failed


def test_needs_the_model(smollm2):
    pass


def test_needs_a_tool():
    require_or_skip("needs a tool")


def test_plain():
    pass
'''


def _run(tmp_path: Path, required: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_generated.py").write_text(GENERATED_TESTS)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    if required:
        env[REQUIRE_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_skips_are_only_skips_locally(tmp_path):
    result = _run(tmp_path, required=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped" in result.stdout


def test_ci_fails_when_a_smollm2_test_skips(tmp_path):
    result = _run(tmp_path, required=True)
    assert result.returncode == 1, result.stdout
    assert "test(s) needing SmolLM2 skipped: test_generated.py::test_needs_the_model" in result.stdout
    assert "1 failed, 1 passed, 1 skipped" in result.stdout  # require_or_skip failed instead of skipping
