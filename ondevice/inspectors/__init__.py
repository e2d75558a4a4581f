"""`ondevice inspect` readers: one small module per artifact format, each with `read(path) -> dict`; adding a format
is a module plus a line in INSPECTOR_MODULES (keyed by ondevice.inspectors.kinds.artifact_kind).

Every reader returns at least: path, format, size_bytes, quant (the scheme, one string), architecture, spec (the
architecture facts it could read), tokenizer and chat_template; then what is particular to its format."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError
from ondevice.model import ModelSpec

# llama.cpp's llama_ftype numbers (general.file_type) -> scheme names.
FTYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
               11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
               17: "q5_k_m", 18: "q6_k", 25: "iq4_nl", 30: "iq4_xs", 32: "bf16"}


INSPECTOR_MODULES: dict[str, str] = {
    "gguf": "ondevice.inspectors.source",
    "hf": "ondevice.inspectors.source",
    "mlx": "ondevice.inspectors.mlx",
    "onnx": "ondevice.inspectors.onnx",
    "pte": "ondevice.inspectors.executorch",
    "coreml": "ondevice.inspectors.coreml",
}


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    from ondevice.inspectors.kinds import artifact_kind

    path = Path(path)
    module = importlib.import_module(INSPECTOR_MODULES[artifact_kind(path)])
    return module.read(path)


def disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def file_sizes(folder: Path) -> dict[str, int]:
    """Bytes of each file in a folder (relative names), in name order."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path}: unreadable {what} ({exc})") from None
    except RecursionError:
        raise InvalidModelError(f"{path}: unreadable {what} (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path}: {what} is not a JSON object")
    return data


def spec_facts(spec: ModelSpec, weight_bytes: int) -> dict[str, Any]:
    """architecture, parameters, spec and bits per weight from a full ModelSpec."""
    n_params = spec.n_params
    return {
        "architecture": spec.arch,
        "parameters": n_params,
        "bits_per_weight": round(weight_bytes * 8 / n_params, 3) if n_params else None,
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
    }


def manifest_text_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """tokenizer and chat_template of an ondevice manifest (ExecuTorch, Core ML)."""
    special = manifest.get("special") or {}
    spec = manifest.get("spec") or {}
    return {
        "tokenizer": {"file": manifest.get("tokenizer"), "vocab_size": spec.get("vocab_size"),
                      "bos_id": special.get("bos_id"), "eos_ids": special.get("eos_ids"),
                      "add_bos": special.get("add_bos")},
        "chat_template": manifest.get("chat_template"),
    }


def layer_schemes(manifest: dict[str, Any]) -> dict[str, int]:
    """How many layers the manifest lists under each scheme."""
    counts: dict[str, int] = {}
    for scheme in (manifest.get("layers") or {}).values():
        counts[str(scheme)] = counts.get(str(scheme), 0) + 1
    return counts
