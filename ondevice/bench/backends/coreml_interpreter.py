"""Core ML packages evaluated by ondevice's numpy interpreter of the saved MIL program (no macOS needed):
for `ondevice eval` only. Its speed says nothing about Core ML's, so `ondevice bench` never times it."""

from __future__ import annotations

from pathlib import Path

from ondevice.bench.backends.coreml import CoreMLBackend, bos_prefix
from ondevice.runners import ArtifactRunner


class CoreMLInterpreterBackend(CoreMLBackend):
    name = "coreml-interpreter"
    listed = False  # quality only: not part of the default bench set
    timed = False
    needs_macos = False  # coremltools reads the package on any OS
    precision = "fp32"  # the interpreter's arithmetic (coreml_interpreter.PRECISIONS)

    def import_runtime(self) -> None:
        import ondevice.runners.coreml_interpreter  # noqa: F401

    def open_runner(self, artifact: Path, *, threads: int, n_ctx: int) -> ArtifactRunner:
        from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

        self.prefix_ids = bos_prefix(artifact)
        return CoreMLInterpreterRunner(artifact, precision=self.precision)


BACKEND = CoreMLInterpreterBackend
