"""Evaluate a saved Core ML mlprogram (from `--to coreml`) with numpy, without macOS.

The package is read back as Core ML would get it: the spec from the .mlpackage (MLModel(skip_model_load=True)
.get_spec()), the MIL program rebuilt from that spec with its weights read from the package's weight file
(coremltools' milproto loader). The interpreter then runs the program's operations in order, for exactly the op
types our converter emits; anything else is an error, never skipped. Arithmetic is float32 on the stored
values (fp16 weights, dequantized int4/int8 blocks); the KV cache states are kept in fp16 like the device does.

precision="fp16" emulates a device that runs the fp16 program in fp16 (the GPU and the Neural Engine do; the
coremltools "Typed Execution" guide): every op's fp16 result is rounded to fp16, overflowing to inf. Inside an
op the GPU accumulates in fp32 unless the app sets MLModelConfiguration.allowLowPrecisionAccumulationOnGPU;
the Neural Engine's accumulator is not documented. "fp16-accumulate" brackets that: matmul, linear, mean and
softmax sums are accumulated in fp16 too, 32 products at a time (each group summed in fp32, then rounded;
an approximation of hardware whose grouping is unknown). `ranges` records every float op's largest |value|.

On macOS, CoreMLRunner runs the same package with coremltools' predict (the code path is present; not run here).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import InvalidModelError, MissingExtraError, OndeviceError, UnsupportedError
from ondevice.runners import ArtifactRunner

MANIFEST_FORMAT = "ondevice-coreml/1"


def _coremltools() -> Any:
    try:
        import coremltools as ct
    except ImportError:
        raise MissingExtraError("reading .mlpackage files needs the coreml extra: pip install 'ondevice[coreml]'") \
            from None
    return ct


def load_program(package: str | Path) -> Any:
    """The MIL program of a saved .mlpackage, weights read from its weight file."""
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise InvalidModelError(f"{package}: not an .mlpackage (no Manifest.json)")
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    if not spec.HasField("mlProgram"):
        raise UnsupportedError(f"{package}: not an mlprogram (neural network packages are not supported)")
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights))


def _expand_blocks(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block scale/offset along each axis to the data's shape."""
    for axis, (s, n) in enumerate(zip(scale.shape, shape, strict=True)):
        if s != n:
            scale = np.repeat(scale, n // s, axis=axis)
    return scale


def _slice(x: np.ndarray, begin: Any, end: Any, stride: Any, begin_mask: Any, end_mask: Any,
           squeeze_mask: Any) -> np.ndarray:
    rank = x.ndim
    stride = [1] * rank if stride is None else list(stride)
    index = []
    for axis in range(rank):
        b = None if begin_mask is not None and begin_mask[axis] else int(begin[axis])
        e = None if end_mask is not None and end_mask[axis] else int(end[axis])
        if squeeze_mask is not None and squeeze_mask[axis]:
            index.append(int(begin[axis]))
        else:
            index.append(slice(b, e, int(stride[axis])))
    return x[tuple(index)]


PRECISIONS = ("fp32", "fp16", "fp16-accumulate")
ACCUMULATE_GROUP = 32  # products summed in fp32 before each fp16 accumulation (fp16-accumulate)


def to_fp16(x: Any) -> np.ndarray:
    """Round to fp16 as the device stores it: out of range becomes inf (not an error). An fp16 array is returned
    as it is (a state read stays the state buffer)."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16)


def _fold16(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of the partial sums `parts`, accumulated in fp16 (each part and each running total rounded)."""
    acc = None
    for part in parts:
        part = to_fp16(part)
        acc = part if acc is None else to_fp16(acc.astype(np.float32) + part)
    return acc.astype(np.float32)


def _matmul16(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y accumulated in fp16, ACCUMULATE_GROUP products at a time."""
    g = ACCUMULATE_GROUP
    return _fold16(x[..., s:s + g] @ y[..., s:s + g, :] for s in range(0, x.shape[-1], g))


def _sum16(x: np.ndarray, axis: int) -> np.ndarray:
    """Sum along axis (keeping it) accumulated in fp16, ACCUMULATE_GROUP values at a time."""
    x, g = np.moveaxis(x, axis, -1), ACCUMULATE_GROUP
    total = _fold16(x[..., s:s + g].sum(axis=-1, keepdims=True) for s in range(0, x.shape[-1], g))
    return np.moveaxis(total, -1, axis)


class Interpreter:
    """Runs function "main" of a MIL program; states persist between calls."""

    def __init__(self, program: Any, precision: str = "fp32") -> None:
        from coremltools.converters.mil.mil import types

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        self.precision = precision
        self.accumulate16 = precision == "fp16-accumulate"
        self.ranges: dict[str, float] | None = None  # set to {} to record each float op's max |value|
        self.function = program.functions["main"]
        self.operations = list(self.function.operations)
        self._fp16_result = [types.builtin_to_string(op.outputs[0].dtype) == "fp16" for op in self.operations]
        self._last_uses = self._plan_last_uses()
        self.fp16_results = {op.outputs[0].name for op, fp16 in zip(self.operations, self._fp16_result, strict=True)
                             if fp16 and op.op_type != "const" and not op.op_type.startswith("constexpr_")}
        self.states: dict[str, np.ndarray] = {}
        self._consts: dict[str, np.ndarray] = {}  # const and constexpr results, computed once
        for name, var in self.function.inputs.items():
            from coremltools.converters.mil.mil import types

            if types.is_state(var.sym_type):
                self.states[name] = np.zeros(var.shape, np.float16)
        unknown = sorted({op.op_type for op in self.operations} - set(self._OPS) - {"const"})
        if unknown:
            raise UnsupportedError(f"the numpy Core ML interpreter does not know the ops {', '.join(unknown)}")

    def _plan_last_uses(self) -> list[list[str]]:
        """Per operation, the non-const values it is the last to read (never the program's outputs)."""
        last: dict[str, int] = {}
        for index, op in enumerate(self.operations):
            for value in op.inputs.values():
                for var in value if isinstance(value, (list, tuple)) else (value,):
                    last[var.name] = index
        keep = {v.name for v in self.function.outputs} | set(self.function.inputs)
        plan: list[list[str]] = [[] for _ in self.operations]
        for name, index in last.items():
            if name not in keep:
                plan[index].append(name)
        return plan

    def reset(self) -> None:
        for state in self.states.values():
            state.fill(0)

    def _const(self, op: Any) -> np.ndarray:
        name = op.outputs[0].name
        value = self._consts.get(name)
        if value is None:
            if op.op_type == "const":
                value = np.asarray(op.outputs[0].val)
            else:
                value = self._OPS[op.op_type](self, op, {k: self._const(v.op) if v.op is not None else
                                                          np.asarray(v.val) for k, v in op.inputs.items()})
            self._consts[name] = value
        return value

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = {}
        for name in self.function.inputs:
            env[name] = self.states[name] if name in self.states else feeds[name]
        for op, fp16_result, done in zip(self.operations, self._fp16_result, self._last_uses, strict=True):
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                env[op.outputs[0].name] = self._const(op)
                continue
            args: dict[str, Any] = {}
            for key, value in op.inputs.items():
                if isinstance(value, (list, tuple)):
                    args[key] = [env[v.name] if v.name in env else np.asarray(v.val) for v in value]
                else:
                    args[key] = env[value.name] if value.name in env else np.asarray(value.val)
            result = self._OPS[op.op_type](self, op, args)
            if fp16_result and self.precision != "fp32":
                result = to_fp16(result)
            if self.ranges is not None and np.asarray(result).dtype.kind == "f":
                self._record(op.outputs[0].name, result)
            env[op.outputs[0].name] = result
            for name in done:  # intermediates die after their last reader (a prefill's would fill gigabytes)
                env.pop(name, None)
        return {v.name: env[v.name] for v in self.function.outputs}

    def _record(self, name: str, result: Any) -> None:
        values = np.asarray(result)
        top = float(np.abs(values).max()) if values.size else 0.0
        top = float("inf") if not np.isfinite(top) else top
        self.ranges[name] = max(self.ranges.get(name, 0.0), top)

    # ---- ops (each takes the evaluated inputs by name)
    def _f(x: Any) -> np.ndarray:  # noqa: N805 (helper used inside the table)
        x = np.asarray(x)
        return x.astype(np.float32) if x.dtype == np.float16 else x

    def op_blockwise(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        data = np.asarray(a["data"]).astype(np.float32)
        scale = _expand_blocks(np.asarray(a["scale"], np.float32), data.shape)
        if "offset" in a and a["offset"] is not None and np.asarray(a["offset"]).size:
            data = data - _expand_blocks(np.asarray(a["offset"], np.float32), data.shape)
        return data * scale

    def op_linear(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        x, w = Interpreter._f(a["x"]), Interpreter._f(a["weight"])
        out = _matmul16(x, w.T) if self.accumulate16 else x @ w.T
        if "bias" in a and a["bias"] is not None:
            out = out + Interpreter._f(a["bias"])
        return out

    def op_matmul(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        x, y = Interpreter._f(a["x"]), Interpreter._f(a["y"])
        if bool(a.get("transpose_x", False)):
            x = np.swapaxes(x, -1, -2)
        if bool(a.get("transpose_y", False)):
            y = np.swapaxes(y, -1, -2)
        return _matmul16(x, y) if self.accumulate16 else x @ y

    def op_gather(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        return np.take(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a.get("axis", 0)))

    def op_slice_update(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        x = np.array(a["x"], copy=True)
        index = tuple(slice(int(b), int(e)) for b, e in zip(a["begin"], a["end"], strict=True))
        x[index] = np.asarray(a["update"]).astype(x.dtype)
        return x

    def op_update_state(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        name = op.inputs["state"].name
        self.states[name][...] = np.asarray(a["value"]).astype(np.float16)
        return self.states[name]

    def op_range(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        return np.arange(int(a["start"]), int(a["end"]), int(a["step"]), dtype=np.int32)

    def op_reshape(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        return np.reshape(a["x"], [int(s) for s in a["shape"]])

    def op_softmax(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        x = Interpreter._f(a["x"])
        axis = int(a.get("axis", -1))
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        if self.accumulate16:
            e = to_fp16(e).astype(np.float32)
            return e / _sum16(e, axis)
        return e / e.sum(axis=axis, keepdims=True)

    def op_reduce_mean(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        x, axes = Interpreter._f(a["x"]), tuple(int(x) for x in a["axes"])
        keep = bool(a.get("keep_dims", False))
        if not self.accumulate16:
            return x.mean(axis=axes, keepdims=keep)
        if len(axes) != 1:
            raise UnsupportedError("fp16-accumulate emulates reduce_mean over one axis only")
        mean = _sum16(x, axes[0]) / np.float32(x.shape[axes[0]])
        return mean if keep else np.squeeze(mean, axis=axes[0])

    def op_rsqrt(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        return 1.0 / np.sqrt(Interpreter._f(a["x"]) + float(a.get("epsilon", 1e-12)))

    def op_slice_by_index(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        return _slice(np.asarray(a["x"]), a["begin"], a["end"], a.get("stride"), a.get("begin_mask"),
                      a.get("end_mask"), a.get("squeeze_mask"))

    def op_gelu(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        if str(a.get("mode", "EXACT")) != "TANH_APPROXIMATION":
            raise UnsupportedError(f"gelu mode {a.get('mode')!r} is not one this interpreter runs")
        x = Interpreter._f(a["x"])
        return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))

    def op_concat(self, op: Any, a: dict[str, Any]) -> np.ndarray:
        values = [np.atleast_1d(np.asarray(v)) for v in a["values"]]
        if values[0].dtype.kind == "f":
            values = [Interpreter._f(v) for v in values]
        return np.concatenate(values, axis=int(a["axis"]))

    _OPS: dict[str, Any] = {
        "constexpr_blockwise_shift_scale": op_blockwise,
        "linear": op_linear,
        "matmul": op_matmul,
        "gather": op_gather,
        # the state buffer itself: Core ML updates states in place, and coremltools merges the read_states of one
        # state (every layer's slice of the one KV cache) into a single read on that assumption
        "read_state": lambda self, op, a: a["input"],
        "coreml_update_state": op_update_state,
        "slice_update": op_slice_update,
        "slice_by_index": op_slice_by_index,
        "shape": lambda self, op, a: np.asarray(np.shape(a["x"]), np.int32),
        "squeeze": lambda self, op, a: np.squeeze(a["x"], axis=None if a.get("axes") is None
                                                  else tuple(int(x) for x in a["axes"])),
        "expand_dims": lambda self, op, a: np.expand_dims(a["x"], tuple(int(x) for x in a["axes"])),
        "range_1d": op_range,
        "less_equal": lambda self, op, a: np.asarray(a["x"]) <= np.asarray(a["y"]),
        "greater_equal": lambda self, op, a: np.asarray(a["x"]) >= np.asarray(a["y"]),
        "select": lambda self, op, a: np.where(a["cond"], Interpreter._f(a["a"]), Interpreter._f(a["b"])),
        "add": lambda self, op, a: Interpreter._f(a["x"]) + Interpreter._f(a["y"]),
        "sub": lambda self, op, a: Interpreter._f(a["x"]) - Interpreter._f(a["y"]),
        "mul": lambda self, op, a: Interpreter._f(a["x"]) * Interpreter._f(a["y"]),
        "reduce_mean": op_reduce_mean,
        "reduce_max": lambda self, op, a: Interpreter._f(a["x"]).max(
            axis=tuple(int(x) for x in a["axes"]), keepdims=bool(a.get("keep_dims", False))),
        "abs": lambda self, op, a: np.abs(Interpreter._f(a["x"])),
        "maximum": lambda self, op, a: np.maximum(Interpreter._f(a["x"]), Interpreter._f(a["y"])),
        "real_div": lambda self, op, a: Interpreter._f(a["x"]) / Interpreter._f(a["y"]),
        "rsqrt": op_rsqrt,
        "reshape": op_reshape,
        "transpose": lambda self, op, a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
        "concat": op_concat,
        "softmax": op_softmax,
        "silu": lambda self, op, a: Interpreter._f(a["x"]) / (1.0 + np.exp(-Interpreter._f(a["x"]))),
        "gelu": op_gelu,
        "cast": lambda self, op, a: np.asarray(a["x"]).astype(
            {"fp16": np.float16, "fp32": np.float32, "bool": np.bool_}.get(str(a["dtype"]), str(a["dtype"]))),
    }


def read_manifest(package: Path) -> dict[str, Any]:
    path = package.with_suffix(".json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{package}: its manifest {path.name} is missing or unreadable ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidModelError(f"{path}: not an ondevice Core ML manifest")
    return manifest


class _CoreMLText:
    def __init__(self, package: Path, manifest: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(package.parent / manifest["tokenizer"]))
        special = manifest["special"]
        self.bos_id = special.get("bos_id")
        self.eos_ids = sorted(special.get("eos_ids") or [])
        self.chat_template = manifest.get("chat_template")


class CoreMLInterpreterRunner(ArtifactRunner):
    """The saved package evaluated by the numpy interpreter (quality checks; not a speed measurement)."""

    def __init__(self, package: str | Path, precision: str = "fp32") -> None:
        self.package = Path(package)
        self.manifest = read_manifest(self.package)
        self.vocab_size = int(self.manifest["spec"]["vocab_size"])
        self.n_ctx = int(self.manifest["max_seq_len"])
        self.interpreter = Interpreter(load_program(self.package), precision)
        self.text = _CoreMLText(self.package, self.manifest)
        self._length = 0

    def reset(self) -> None:
        self.interpreter.reset()
        self._length = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if self._length + n > self.n_ctx:
            raise OndeviceError(f"{self._length + n} tokens do not fit in the package's KV cache of {self.n_ctx}")
        out = self.interpreter.run({"input_ids": np.asarray([tokens], np.int32),
                                    "position": np.asarray([self._length], np.int32)})
        self._length += n
        return np.asarray(next(iter(out.values()))[0], np.float32)

    def encode(self, text: str) -> list[int]:
        return list(self.text.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.text.tokenizer.decode(list(ids), skip_special_tokens=False)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        from ondevice.chat_template import render_chat

        if not self.text.chat_template:
            raise InvalidModelError(f"{self.package} has no chat template in its manifest")
        tok = self.text.tokenizer
        bos = tok.id_to_token(self.text.bos_id) if self.text.bos_id is not None else ""
        eos = tok.id_to_token(self.text.eos_ids[0]) if self.text.eos_ids else ""
        return self.encode(render_chat(self.text.chat_template, messages, add_generation_prompt=True,
                                       bos_token=bos or "", eos_token=eos or ""))


class CoreMLRunner(CoreMLInterpreterRunner):
    """macOS only: the package run by Core ML itself through coremltools' predict with its KV cache state."""

    def __init__(self, package: str | Path) -> None:
        import sys

        if sys.platform != "darwin":
            raise UnsupportedError("running Core ML packages needs macOS; on Linux use CoreMLInterpreterRunner")
        ct = _coremltools()
        self.package = Path(package)
        self.manifest = read_manifest(self.package)
        self.vocab_size = int(self.manifest["spec"]["vocab_size"])
        self.n_ctx = int(self.manifest["max_seq_len"])
        self.text = _CoreMLText(self.package, self.manifest)
        self.model = ct.models.MLModel(str(self.package))
        self._state = self.model.make_state()
        self._length = 0

    def reset(self) -> None:
        self._state = self.model.make_state()
        self._length = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        out = self.model.predict({"input_ids": np.asarray([tokens], np.int32),
                                  "position": np.asarray([self._length], np.int32)}, state=self._state)
        self._length += len(tokens)
        return np.asarray(out["logits"][0], np.float32)
