"""`ondevice inspect` reader for Core ML packages (`--to coreml`): the mlprogram spec read back with coremltools
(no macOS needed: ops, blockwise int4/int8 weights, linear layers fed by them, states, inputs) and the manifest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ondevice.errors import UnsupportedError
from ondevice.inspectors import disk_size, layer_schemes, manifest_text_facts, spec_facts
from ondevice.model import ModelSpec


def _weight_dtype(op: Any) -> str | None:
    """The data type of a constexpr op's "data" input (e.g. "INT4"), read from the proto."""
    from coremltools.proto import MIL_pb2

    arguments = op.inputs.get("data")
    if arguments is None or not arguments.arguments:
        return None
    value = arguments.arguments[0].value
    return MIL_pb2.DataType.Name(value.type.tensorType.dataType) if value.HasField("type") else None


def program_facts(package: Path) -> dict[str, Any]:
    from ondevice.runners.coreml_interpreter import _coremltools

    ct = _coremltools()
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    if not spec.HasField("mlProgram"):
        raise UnsupportedError(f"{package}: not an mlprogram (neural network packages are not supported)")
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    ops: Counter[str] = Counter(op.type for op in operations)
    blockwise: Counter[str] = Counter()
    quantized_outputs: set[str] = set()
    for op in operations:
        if op.type.startswith("constexpr_"):
            blockwise[f"{op.type}:{_weight_dtype(op)}"] += 1
            quantized_outputs.update(o.name for o in op.outputs)
    linear = [op for op in operations if op.type == "linear"]
    linear_quantized = sum(1 for op in linear if "weight" in op.inputs and op.inputs["weight"].arguments
                           and op.inputs["weight"].arguments[0].name in quantized_outputs)
    description = spec.description
    return {
        "specification_version": spec.specificationVersion,
        "opset": function.opset,
        "operations": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "constexpr_weights": dict(blockwise),
        "blockwise_int4": blockwise.get("constexpr_blockwise_shift_scale:INT4", 0),
        "blockwise_int8": blockwise.get("constexpr_blockwise_shift_scale:INT8", 0),  # int8 weights or int4 offsets
        "linear_ops": len(linear),
        "linear_with_compressed_weight": linear_quantized,
        "inputs": [i.name for i in description.input],
        "outputs": [o.name for o in description.output],
        "states": [s.name for s in description.state],
        "description": description.metadata.shortDescription,
    }


def read(path: Path) -> dict[str, Any]:
    from ondevice.runners.coreml_interpreter import read_manifest

    manifest = read_manifest(path)
    spec = ModelSpec(**manifest["spec"])
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    weight_bytes = disk_size(weights) if weights.exists() else disk_size(path)
    quant = str(manifest.get("quant"))
    if manifest.get("quant") == "int4":
        quant += f" (block {manifest.get('block_size') or 32})"
    return {
        "path": str(path),
        "format": "coreml",
        "size_bytes": disk_size(path),
        "weight_bytes": weight_bytes,
        "quant": quant,
        **spec_facts(spec, weight_bytes),
        "program": program_facts(path),
        "max_seq_len": manifest.get("max_seq_len"),
        "manifest": path.with_suffix(".json").name,
        "layer_schemes": layer_schemes(manifest),
        "layers": manifest.get("layers"),
        **manifest_text_facts(manifest),
    }
