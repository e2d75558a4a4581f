"""Core ML packages evaluated as a device that computes in fp16 runs them (ondevice's interpreter with every op's
result rounded to fp16, accumulating in fp32 as the GPU does by default): for `ondevice eval` only."""

from __future__ import annotations

from pathlib import Path

from ondevice.bench.backends.coreml import bos_prefix
from ondevice.bench.backends.coreml_interpreter import CoreMLInterpreterBackend
from ondevice.runners import ArtifactRunner


class CoreMLFp16Backend(CoreMLInterpreterBackend):
    name = "coreml-fp16"
    precision = "fp16"  # coreml_interpreter.PRECISIONS

    def open_runner(self, artifact: Path, *, threads: int, n_ctx: int) -> ArtifactRunner:
        from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

        self.prefix_ids = bos_prefix(artifact)
        return CoreMLInterpreterRunner(artifact, precision=self.precision)


class CoreMLFp16AccumulateBackend(CoreMLFp16Backend):
    """fp16 accumulation inside matmuls and sums too (allowLowPrecisionAccumulationOnGPU; the Neural Engine's
    accumulator is undocumented): the pessimistic end of what a device computes."""

    name = "coreml-fp16-accumulate"
    precision = "fp16-accumulate"


BACKEND = CoreMLFp16Backend
