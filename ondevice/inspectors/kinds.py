"""What kind of artifact a path is: the one answer that `inspect`, the benchmark harness and the runners share.

Only the file's magic, suffix and folder layout decide; what is inside is the inspectors' and readers' business."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError

GGUF, MLX, PTE, ONNX, HF, COREML = "gguf", "mlx", "pte", "onnx", "hf", "coreml"
ARTIFACT_KINDS = (GGUF, MLX, PTE, ONNX, HF, COREML)


def artifact_kind(path: Path) -> str:
    """gguf | mlx | pte | onnx | coreml | hf, or an error naming what was expected."""
    if path.is_dir() and (path.suffix == ".mlpackage" or (path / "Manifest.json").is_file()):
        return COREML
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            return GGUF
        if path.suffix == ".pte":
            return PTE
        if path.suffix == ".onnx":
            return ONNX
    elif path.is_dir():
        config = path / "config.json"
        if config.exists():
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError, RecursionError):  # the reader of the kind found says what is wrong
                data = {}
            if isinstance(data, dict) and "quantization" in data and not (path / "quantize_config.json").exists():
                return MLX
            return MLX if _mlx_safetensors(path) else HF
        if (path / "genai_config.json").is_file():
            return ONNX
        if any(path.glob("*.onnx")):
            return ONNX
        if any(path.glob("*.pte")):
            return PTE
    raise InvalidModelError(f"{path}: not a model artifact (expected a .gguf file, an MLX or Hugging Face folder, "
                            f"a .pte, an ONNX folder or .onnx file, or an .mlpackage)")


def _mlx_safetensors(folder: Path) -> bool:
    """An unquantized MLX folder looks like a Hugging Face one but for its safetensors metadata {"format": "mlx"}."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return False
    try:
        metadata = safetensors_header(files[0]).get("__metadata__")
        return isinstance(metadata, dict) and metadata.get("format") == "mlx"
    except InvalidModelError:
        return False


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor dtypes, shapes, offsets; "__metadata__")."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header
    except RecursionError:
        raise InvalidModelError(f"{path}: not a safetensors file (header JSON nested too deeply)") from None
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidModelError(f"{path}: not a safetensors file ({exc})") from None
