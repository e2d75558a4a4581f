"""Architecture registry: a new architecture is one file plus one line here."""

from __future__ import annotations

from typing import Any

from ondevice.architectures.base import DecoderArchitecture
from ondevice.architectures.gemma3 import Gemma3
from ondevice.architectures.llama import Llama
from ondevice.architectures.qwen2 import Qwen2
from ondevice.architectures.qwen3 import Qwen3
from ondevice.errors import UnsupportedError

ARCHITECTURES: dict[str, DecoderArchitecture] = {arch.name: arch for arch in (Llama(), Qwen2(), Qwen3(), Gemma3())}


def register_architecture(arch: DecoderArchitecture) -> None:
    """Add an architecture (a plugin's, or a test's) beside the built-in ones."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch


def get_architecture(name: str) -> DecoderArchitecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def architecture_for_hf_config(config: dict[str, Any], where: str) -> DecoderArchitecture:
    names = config.get("architectures") or []
    for arch in ARCHITECTURES.values():
        if any(n in arch.hf_architectures for n in names) or config.get("model_type") == arch.hf_model_type:
            return arch
    label = names[0] if names else config.get("model_type", "unknown")
    supported = ", ".join(a.hf_architectures[0] for a in ARCHITECTURES.values())
    raise UnsupportedError(f"{where}: architecture {label!r} is not supported; supported: {supported}")
