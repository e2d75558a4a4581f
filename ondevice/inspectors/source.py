"""`ondevice inspect` reader for the sources: GGUF files and Hugging Face folders (architecture, sizes, quantization
mix or dtypes, tokenizer, pre-tokenizer and chat template)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ondevice.formats.gguf import GGUFFile
from ondevice.inspectors import FTYPE_NAMES, disk_size
from ondevice.sources import open_source


def _gguf_details(path: Path) -> dict[str, Any]:
    from ondevice.quant import quant_type_for_ggml

    with GGUFFile(path) as gguf:
        mix: Counter[str] = Counter()
        nbytes: Counter[str] = Counter()
        for info in gguf.tensors.values():
            name = quant_type_for_ggml(info.ggml_type).name
            mix[name] += 1
            nbytes[name] += info.nbytes
        metadata = {k: (v.value if not hasattr(v.value, "__len__") or isinstance(v.value, str)
                        else f"[{len(v.value)} items]") for k, v in gguf.fields.items()
                    if k != "tokenizer.chat_template"}
        return {
            "format": "gguf",
            "gguf_version": gguf.version,
            "tensor_count": len(gguf.tensors),
            "quant_mix": {k: {"tensors": mix[k], "bytes": nbytes[k]} for k in mix},
            "metadata": metadata,
        }


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    model = open_source(path)
    try:
        spec = model.spec
        n_params = sum(t.numel for t in model.tensors.values())
        size = disk_size(path)
        info: dict[str, Any] = {
            "path": str(path),
            "format": model.source_format,
            "architecture": spec.arch,
            "name": spec.name,
            "parameters": n_params,
            "size_bytes": size,
            "bits_per_weight": round(size * 8 / n_params, 3),
            "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
            "tokenizer": {
                "vocab_size": spec.vocab_size,
                "pre_tokenizer": model.pre_tokenizer,
                "bos_id": model.special.bos_id,
                "eos_ids": model.special.eos_ids,
                "add_bos": model.special.add_bos,
            },
            "chat_template": model.chat_template,
        }
        if model.source_format == "hf":
            info["dtypes"] = dict(Counter(t.source_dtype for t in model.tensors.values()))
            try:
                from tokenizers import Tokenizer

                from ondevice.tokenizer import detect_pre_tokenizer

                info["tokenizer"]["pre_tokenizer"] = detect_pre_tokenizer(Tokenizer.from_str(model.tokenizer_json))
            except Exception:  # detection is informative here, never fatal
                info["tokenizer"]["pre_tokenizer"] = None
            info["quant"] = "+".join(sorted(info["dtypes"])).lower()
        else:
            info.update(_gguf_details(path))
            ftype = info["metadata"].get("general.file_type")
            info["quant"] = FTYPE_NAMES.get(int(ftype), f"ftype{int(ftype)}") if ftype is not None else "unknown"
        return info
    finally:
        model.close()
