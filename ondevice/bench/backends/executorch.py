"""ExecuTorch .pte programs, run by executorch.runtime inside ondevice's generate loop (`ondevice.load("x.pte")`):
the same tokenizer, sampling and timing as the native runtime, so only the forward pass differs."""

from __future__ import annotations

from ondevice.bench.backends.base import PTE
from ondevice.bench.backends.ondevice_runtime import OndeviceBackend


class ExecuTorchBackend(OndeviceBackend):
    name = "executorch"
    artifact_kinds = frozenset({PTE})
    module = "executorch.runtime"
    distribution = "executorch"
    install_hint = "pip install 'ondevice[executorch]'"
    kv_bytes_per_element = 4  # float32 K/V cache in the program's mutable buffers

    @classmethod
    def version(cls) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("executorch")
        except PackageNotFoundError:
            return None

    def import_runtime(self) -> None:
        import executorch.runtime  # noqa: F401

        import ondevice.runners.executorch_runner  # noqa: F401


BACKEND = ExecuTorchBackend
