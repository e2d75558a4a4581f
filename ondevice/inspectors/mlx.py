"""`ondevice inspect` reader for MLX folders (mlx-lm layout): config.json with its "quantization" entry,
model*.safetensors (metadata format "mlx"; packed uint32 codes with .scales/.biases), tokenizer files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError
from ondevice.inspectors import disk_size, file_sizes, read_json, spec_facts
from ondevice.inspectors.kinds import safetensors_header


def read(path: Path) -> dict[str, Any]:
    from ondevice.architectures import architecture_for_hf_config
    from ondevice.chat_template import load_chat_template

    config = read_json(path / "config.json", "MLX model config")
    spec = architecture_for_hf_config(config, str(path)).spec_from_hf(config, str(path))
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise InvalidModelError(f"{path}: no .safetensors weights")
    dtypes: Counter[str] = Counter()
    quantized_layers: list[str] = []
    float_layers: list[str] = []
    metadata_format = None
    for file in weight_files:
        header = safetensors_header(file)
        metadata_format = metadata_format or (header.get("__metadata__") or {}).get("format")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtypes[info["dtype"]] += 1
            if name.endswith(".scales"):
                quantized_layers.append(name.removesuffix(".scales"))
            elif name.endswith(".weight") and len(info["shape"]) == 2:
                if f"{name.removesuffix('.weight')}.scales" not in header:
                    float_layers.append(name.removesuffix(".weight"))
    quantization = config.get("quantization")
    if quantization:
        quant = f"int{quantization.get('bits')} (group {quantization.get('group_size')}, " \
                f"{quantization.get('mode', 'affine')})"
    else:
        quant = str(config.get("torch_dtype") or "+".join(sorted(dtypes)).lower()).replace("float", "f")
    tokenizer_config = path / "tokenizer_config.json"
    tok = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.exists() else {}
    weight_bytes = sum(f.stat().st_size for f in weight_files)
    return {
        "path": str(path),
        "format": "mlx",
        "size_bytes": disk_size(path),
        "weight_bytes": weight_bytes,
        "quant": quant,
        **spec_facts(spec, weight_bytes),
        "quantization": quantization,
        "safetensors_format": metadata_format,
        "tensor_dtypes": dict(dtypes),
        "quantized_layers": len(quantized_layers),
        "float_layers": sorted(float_layers),  # 2-D weights left unquantized (width not a multiple of the group)
        "files": file_sizes(path),
        "tokenizer": {"vocab_size": spec.vocab_size, "bos_id": config.get("bos_token_id"),
                      "eos_ids": config.get("eos_token_id"), "add_bos": tok.get("add_bos_token")},
        "chat_template": load_chat_template(path),
    }
