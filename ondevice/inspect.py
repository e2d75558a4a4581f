"""What is in a model artifact: one reader per format in ondevice/inspectors/ (GGUF, Hugging Face, MLX, ONNX,
ExecuTorch, Core ML), chosen from the artifact's kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ondevice.inspectors import inspect_artifact


def inspect_model(path: str | Path) -> dict[str, Any]:
    return inspect_artifact(Path(path))
