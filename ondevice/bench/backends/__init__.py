"""Backend registry: one adapter module per runtime; adding one is a new file plus a line in BACKEND_MODULES
("module" for its BACKEND, "module:Class" for another class of it).

Importing an adapter module is cheap: the runtime library itself is imported only when a backend is used.
"""

from __future__ import annotations

import importlib

from ondevice.bench.backends.base import Backend, Prompt, TokenClock
from ondevice.errors import OndeviceError

BACKEND_MODULES: dict[str, str] = {
    "ondevice": "ondevice.bench.backends.ondevice_runtime",
    "llama.cpp": "ondevice.bench.backends.llama_cpp",
    "transformers": "ondevice.bench.backends.transformers_ref",
    "executorch": "ondevice.bench.backends.executorch",
    "mlx": "ondevice.bench.backends.mlx",
    "onnxruntime": "ondevice.bench.backends.onnxruntime",
    "onnxruntime-plain": "ondevice.bench.backends.onnxruntime_plain",
    "coreml": "ondevice.bench.backends.coreml",
    "coreml-interpreter": "ondevice.bench.backends.coreml_interpreter",
    "coreml-fp16": "ondevice.bench.backends.coreml_fp16",
    "coreml-fp16-accumulate": "ondevice.bench.backends.coreml_fp16:CoreMLFp16AccumulateBackend",
    "null": "ondevice.bench.backends.null",
}

__all__ = ["BACKEND_MODULES", "Backend", "Prompt", "TokenClock", "backend_class", "default_backends",
           "parse_backends"]


def backend_class(name: str) -> type[Backend]:
    try:
        module = BACKEND_MODULES[name]
    except KeyError:
        raise OndeviceError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_MODULES)}") from None
    module, _, attribute = module.partition(":")  # "module:Class" when a module holds more than its BACKEND
    return getattr(importlib.import_module(module), attribute or "BACKEND")


def default_backends() -> list[str]:
    return [name for name in BACKEND_MODULES if backend_class(name).listed]


def parse_backends(spec: str | None) -> list[str]:
    """'ondevice,llama.cpp' -> validated names; None -> every listed backend."""
    if not spec:
        return default_backends()
    names = [part.strip() for part in spec.split(",") if part.strip()]
    for name in names:
        backend_class(name)  # raises for unknown names
    return list(dict.fromkeys(names))
