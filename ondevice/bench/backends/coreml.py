"""Core ML packages (`--to coreml`, .mlpackage) through Core ML itself: coremltools' predict with the package's
KV cache state (ondevice.runners.coreml_interpreter.CoreMLRunner). Core ML runs only on macOS: elsewhere the
backend is recorded as unavailable ("needs macOS") and the run goes on. Quality without a Mac goes through the
`coreml-interpreter` backend (ondevice/bench/backends/coreml_interpreter.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

from ondevice.bench.backends.base import COREML, ArtifactRunnerBackend
from ondevice.runners import ArtifactRunner


def bos_prefix(package: Path) -> list[int]:
    """[bos id] when the package's manifest says the tokenizer adds a BOS, else []."""
    from ondevice.runners.coreml_interpreter import read_manifest

    special = read_manifest(package).get("special") or {}
    return [int(special["bos_id"])] if special.get("add_bos") and special.get("bos_id") is not None else []


class CoreMLBackend(ArtifactRunnerBackend):
    name = "coreml"
    artifact_kinds = frozenset({COREML})
    returns_logits = True
    module = "coremltools"
    distribution = "coremltools"
    install_hint = "pip install 'ondevice[coreml]'"
    needs_macos: ClassVar[bool] = True  # Core ML itself predicts only on macOS

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls.needs_macos and sys.platform != "darwin":
            return f"needs macOS (Core ML prediction is not available on {sys.platform})"
        return super().unavailable_reason()

    def open_runner(self, artifact: Path, *, threads: int, n_ctx: int) -> ArtifactRunner:
        from ondevice.runners.coreml_interpreter import CoreMLRunner

        self.prefix_ids = bos_prefix(artifact)
        return CoreMLRunner(artifact)


BACKEND = CoreMLBackend
