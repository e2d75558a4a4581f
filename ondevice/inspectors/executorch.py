"""`ondevice inspect` reader for ExecuTorch programs (`--to executorch`): the .pte's header and the JSON manifest
beside it (scheme, group size, KV cache length, each layer's scheme, tokenizer and chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError
from ondevice.inspectors import layer_schemes, manifest_text_facts, spec_facts
from ondevice.model import ModelSpec


def pte_identifier(path: Path) -> str:
    """The flatbuffer file identifier at bytes 4..8 of a .pte ("ET12" for current ExecuTorch programs)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or not head[4:6] == b"ET":
        raise InvalidModelError(f"{path}: not an ExecuTorch program (no ET identifier in its header)")
    return head[4:8].decode("ascii", errors="replace")


def read(path: Path) -> dict[str, Any]:
    from ondevice.runners.executorch_runner import read_manifest

    if path.is_dir():
        programs = sorted(path.glob("*.pte"))
        if len(programs) != 1:
            raise InvalidModelError(f"{path}: expected one .pte in the folder, found {len(programs)}")
        path = programs[0]
    identifier = pte_identifier(path)
    manifest = read_manifest(path)
    spec = ModelSpec(**manifest["spec"])
    size = path.stat().st_size
    quant = str(manifest.get("quant"))
    if manifest.get("group_size"):
        quant += f" (group {manifest['group_size']})"
    return {
        "path": str(path),
        "format": "pte",
        "size_bytes": size,
        "quant": quant,
        **spec_facts(spec, size),
        "program": {"identifier": identifier, "method": manifest.get("method"), "inputs": manifest.get("inputs"),
                    "max_seq_len": manifest.get("max_seq_len"), "max_chunk": manifest.get("max_chunk")},
        "manifest": path.with_suffix(".json").name,
        "layer_schemes": layer_schemes(manifest),
        "layers": manifest.get("layers"),
        **manifest_text_facts(manifest),
    }
