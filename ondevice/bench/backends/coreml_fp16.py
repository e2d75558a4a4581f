"""Core ML packages evaluated as a device that computes in fp16 runs them (ondevice's interpreter with every op's
result rounded to fp16, accumulating in fp32 as the GPU does by default): for `ondevice eval` only."""

from __future__ import annotations

from ondevice.bench.backends.coreml_interpreter import CoreMLInterpreterBackend


class CoreMLFp16Backend(CoreMLInterpreterBackend):
    name = "coreml-fp16"
    precision = "fp16"


class CoreMLFp16AccumulateBackend(CoreMLFp16Backend):
    """fp16 accumulation inside matmuls and sums too (allowLowPrecisionAccumulationOnGPU; the Neural Engine's
    accumulator is undocumented): the pessimistic end of what a device computes."""

    name = "coreml-fp16-accumulate"
    precision = "fp16-accumulate"


BACKEND = CoreMLFp16Backend
