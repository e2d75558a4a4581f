"""Target writers, one module per target; registering a target is one line in TARGET_MODULES."""

from __future__ import annotations

import importlib
from types import ModuleType

from ondevice.errors import UnsupportedError

TARGET_MODULES: dict[str, str] = {
    "gguf": "ondevice.converters.gguf",
    "hf": "ondevice.converters.hf",
    "mlx": "ondevice.converters.mlx",
    "onnx": "ondevice.converters.onnx",
    "executorch": "ondevice.converters.executorch",
    "coreml": "ondevice.converters.coreml",
}


def get_target(name: str) -> ModuleType:
    """The writer module for a target: it has TARGET (a converters.base.Target) and convert(model, out, options)."""
    try:
        module_name = TARGET_MODULES[name]
    except KeyError:
        raise UnsupportedError(f"--to {name} is not a known target; choose from {', '.join(TARGET_MODULES)}") from None
    return importlib.import_module(module_name)
