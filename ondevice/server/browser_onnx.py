"""The ONNX graph as served to the in-browser page: MatMulNBits rewritten so onnxruntime-web runs it fast.

onnxruntime-web's WebAssembly build has MatMulNBits but not MLAS's packed n-bit GEMM kernels (those are x86-64
and ARM64 only): it dequantizes the whole weight on every call. SmolLM2-135M int4 decodes at ~0.3 tok/s that way.
Here every MatMulNBits(A, B, scales[, zero_points][, g_idx, bias]) becomes MatMul(A, W) where W is computed from
the same initializers by standard ops (Cast, Div, Sub, Mul, Reshape, Slice, Transpose): all inputs are
constant, so onnxruntime folds W into a float32 initializer once, when the session is created, and then runs
its SIMD SGEMM. The download stays the int4 file (model.onnx.data is served unchanged; only the ~200 KB graph is
rewritten); memory holds float32 weights (4 bytes per weight) while the tab runs. GatherBlockQuantized (the
embedding) reads only the rows it gathers and stays as it is.
"""

from __future__ import annotations

from pathlib import Path

from ondevice.errors import OndeviceError


def browser_graph(model_path: Path) -> tuple[bytes, int]:
    """The rewritten graph (serialized, weights still external) and how many MatMulNBits nodes it replaced."""
    try:
        import onnx
    except ImportError as exc:  # the onnx extra is missing: the caller serves the graph as it is
        raise OndeviceError("rewriting the ONNX graph for the browser needs onnx: pip install 'ondevice[onnx]'") \
            from exc

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    builder = _Builder()
    new_nodes = []
    replaced = 0
    for node in graph.node:
        made = builder.dequantized_matmul(node) if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" \
            else None
        new_nodes.extend(made if made is not None else [node])
        replaced += made is not None
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(builder.consts)
    return model.SerializeToString(), replaced


class _Builder:
    def __init__(self) -> None:
        self.consts: list = []
        self.taken: set[str] = set()
        self.nodes: list = []

    def const(self, name: str, values: object, dtype: type | None = None) -> str:
        import numpy as np
        from onnx import numpy_helper

        assert name not in self.taken, name  # a clash would silently feed one node the other's constant
        self.taken.add(name)
        self.consts.append(numpy_helper.from_array(np.asarray(values, dtype or np.int64), name))
        return name

    def op(self, kind: str, inputs: list[str], out: str, **attrs: object) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def unpack4(self, packed: str, shape: list[int], p: str) -> str:
        """uint8 bytes holding two 4-bit codes (low nibble first) -> float codes of the given shape. The shifts
        stay in uint8 (4 = the nibble width), so the only 4-byte-per-weight tensors are the float ones."""
        import numpy as np
        from onnx import TensorProto

        four = self.const(f"{p}_4", [4], np.uint8)
        high = self.op("BitShift", [packed, four], f"{p}_high", direction="RIGHT")
        low = self.op("BitShift", [self.op("BitShift", [packed, four], f"{p}_shifted", direction="LEFT"), four],
                      f"{p}_low", direction="RIGHT")
        axis = self.const(f"{p}_axis", [-1])
        pairs = self.op("Concat", [self.op("Unsqueeze", [low, axis], f"{p}_low1"),
                                   self.op("Unsqueeze", [high, axis], f"{p}_high1")], f"{p}_pairs", axis=-1)
        codes = self.op("Reshape", [pairs, self.const(f"{p}_shape", shape)], f"{p}_codes")
        return self.op("Cast", [codes], f"{p}_float", to=TensorProto.FLOAT)

    def dequantized_matmul(self, node: object) -> list | None:
        """MatMul(A, W) + the constant subgraph computing W (K, N) for one MatMulNBits node, or None to keep it."""
        import numpy as np
        from onnx import TensorProto, helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)), int(attrs["block_size"])
        a, b, scales, zero_points, g_idx, bias = (list(node.input) + [""] * 6)[:6]
        if g_idx or bits not in (4, 8):  # act-order or other widths: not what ondevice writes; keep the node
            return None
        self.nodes = []
        p = f"{node.name or node.output[0]}/browser"
        blocks = (k + block - 1) // block
        codes = self.unpack4(b, [n, blocks, block], f"{p}/w") if bits == 4 else \
            self.op("Cast", [b], f"{p}/w_float", to=TensorProto.FLOAT)
        if not zero_points:
            zero = self.const(f"{p}/zero", float(1 << (bits - 1)), np.float32)
        else:
            if bits == 4:
                unpacked = self.unpack4(zero_points, [n, -1], f"{p}/z")  # padded to an even count of blocks
                used = self.op("Slice", [unpacked, self.const(f"{p}/zero_start", [0]),
                                         self.const(f"{p}/zero_end", [blocks]), self.const(f"{p}/zero_axis", [1])],
                               f"{p}/zero_used")
            else:
                used = self.op("Cast", [zero_points], f"{p}/z_float", to=TensorProto.FLOAT)
            zero = self.op("Reshape", [used, self.const(f"{p}/zero_shape", [n, blocks, 1])], f"{p}/zero")
        scale = self.op("Reshape", [scales, self.const(f"{p}/scale_shape", [n, blocks, 1])], f"{p}/scale")
        values = self.op("Mul", [self.op("Sub", [codes, zero], f"{p}/centered"), scale], f"{p}/values")
        rows = self.op("Reshape", [values, self.const(f"{p}/rows_shape", [n, blocks * block])], f"{p}/rows")
        if blocks * block != k:  # the last block was padded
            rows = self.op("Slice", [rows, self.const(f"{p}/k_start", [0]), self.const(f"{p}/k_end", [k]),
                                     self.const(f"{p}/k_axis", [1])], f"{p}/rows_k")
        # Gemm with transB reads the (N, K) rows as they are (no transposed copy); it wants 2-D activations.
        flat = self.op("Reshape", [a, self.const(f"{p}/a_shape", [-1, k])], f"{p}/a_2d")
        product = self.op("Gemm", [flat, rows] + ([bias] if bias else []), f"{p}/gemm", transB=1)
        out_shape = self.op("Concat", [self.op("Shape", [a], f"{p}/a_dims", end=-1),
                                       self.const(f"{p}/n", [n])], f"{p}/out_dims", axis=0)
        self.nodes.append(helper.make_node("Reshape", [product, out_shape], [node.output[0]], name=f"{p}/out"))
        return self.nodes
