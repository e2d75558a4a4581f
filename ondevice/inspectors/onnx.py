"""`ondevice inspect` reader for ONNX folders (`--to onnx`, onnxruntime-genai layout): genai_config.json, the
decoder graph (read without its external weight data: ops, quantized matmuls, initializer types), tokenizer files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ondevice.errors import InvalidModelError, MissingExtraError
from ondevice.inspectors import disk_size, file_sizes, read_json

# onnx TensorProto data types -> short names (the ones a decoder's initializers use).
ONNX_DTYPES = {1: "f32", 2: "u8", 3: "i8", 6: "i32", 7: "i64", 10: "f16", 16: "bf16", 21: "u4", 22: "i4"}


def _graph_quant(ops: Counter[str], nbits: Counter[tuple[int, int]], float_types: set[str],
                 metadata: dict[str, str]) -> str:
    """The scheme: ondevice's own record when present, else what the graph's ops say."""
    if "ondevice.quant" in metadata:
        block = metadata.get("ondevice.block_size")
        return metadata["ondevice.quant"] + (f" (block {block})" if block and metadata["ondevice.quant"]
                                              in ("int4", "int8") else "")
    if nbits:
        (bits, block), _ = nbits.most_common(1)[0]
        return f"int{bits} (block {block})"
    if ops.get("MatMulInteger") or ops.get("DynamicQuantizeLinear"):
        return "int8"
    return "+".join(sorted(float_types)) or "unknown"


def read(path: Path) -> dict[str, Any]:
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("reading ONNX models needs onnx: pip install onnx") from None
    from ondevice.chat_template import load_chat_template

    folder = path.parent if path.is_file() else path
    config = read_json(folder / "genai_config.json", "onnxruntime-genai config")
    try:
        model_config = config["model"]
        decoder = model_config["decoder"]
        graph_file = folder / decoder["filename"]
    except (KeyError, TypeError):
        raise InvalidModelError(f"{folder}/genai_config.json: no model.decoder.filename") from None
    try:
        proto = onnx.load(str(graph_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / OSError for a bad file
        raise InvalidModelError(f"{graph_file}: not a readable ONNX model ({exc})") from None
    ops: Counter[str] = Counter()
    nbits: Counter[tuple[int, int]] = Counter()
    for node in proto.graph.node:
        ops[f"{node.domain}.{node.op_type}" if node.domain else node.op_type] += 1
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nbits[(int(attrs.get("bits", 4)), int(attrs.get("block_size", 0)))] += 1
    initializer_types: Counter[str] = Counter(ONNX_DTYPES.get(t.data_type, str(t.data_type))
                                              for t in proto.graph.initializer)
    metadata = {p.key: p.value for p in proto.metadata_props}
    float_types = {t for t in initializer_types if t in ("f32", "f16", "bf16")}
    weight_files = [graph_file, *(p for p in folder.glob(f"{graph_file.name}.data"))]
    tok_path = folder / "tokenizer_config.json"
    tok = read_json(tok_path, "tokenizer config") if tok_path.exists() else {}
    spec = {"n_layers": decoder.get("num_hidden_layers"), "hidden_size": decoder.get("hidden_size"),
            "n_heads": decoder.get("num_attention_heads"), "n_kv_heads": decoder.get("num_key_value_heads"),
            "head_dim": decoder.get("head_size"), "vocab_size": model_config.get("vocab_size"),
            "context_length": model_config.get("context_length")}
    return {
        "path": str(folder),
        "format": "onnx",
        "size_bytes": disk_size(folder),
        "weight_bytes": sum(f.stat().st_size for f in weight_files if f.exists()),
        "quant": _graph_quant(ops, nbits, float_types, metadata),
        "architecture": metadata.get("ondevice.arch") or model_config.get("type"),
        "spec": spec,
        "graph": {"file": graph_file.name, "producer": proto.producer_name,
                  "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
                  "nodes": sum(ops.values()), "op_types": len(ops), "ops": dict(ops.most_common()),
                  "matmul_nbits": [{"bits": b, "block_size": k, "count": n} for (b, k), n in sorted(nbits.items())],
                  "initializers": dict(initializer_types), "metadata": metadata,
                  "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output]},
        "files": file_sizes(folder),
        "tokenizer": {"vocab_size": model_config.get("vocab_size"), "bos_id": model_config.get("bos_token_id"),
                      "eos_ids": model_config.get("eos_token_id"), "add_bos": tok.get("add_bos_token")},
        "chat_template": load_chat_template(folder),
    }
