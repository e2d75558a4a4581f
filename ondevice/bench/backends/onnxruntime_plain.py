"""ONNX folders through plain onnxruntime with ondevice's loop (the KV cache fed back step by step), even where
onnxruntime-genai is installed: the session's own speed, without genai's loop. Not in the default set."""

from __future__ import annotations

from ondevice.bench.backends.onnxruntime import OnnxRuntimeBackend


class OnnxRuntimePlainBackend(OnnxRuntimeBackend):
    name = "onnxruntime-plain"
    listed = False
    use_genai = False


BACKEND = OnnxRuntimePlainBackend
