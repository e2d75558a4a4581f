"""What a benchmark backend adapter provides.

An adapter is one small module in ondevice/bench/backends/ defining `BACKEND`, a Backend subclass, and a line in
BACKEND_MODULES. It declares which artifact kinds it runs and whether it returns logits (needed by `ondevice eval`).
The harness owns the clock: an adapter calls `clock.tick()` the moment each generated token is available to its
caller, so every backend is timed at the same points by the same code.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import ClassVar

import numpy as np

from ondevice.errors import OndeviceError, UnsupportedError
from ondevice.inspectors.kinds import ARTIFACT_KINDS, COREML, GGUF, HF, MLX, ONNX, PTE  # noqa: F401 (the backends' kinds)
from ondevice.runners import ArtifactRunner
from ondevice.runtime.kv import kv_element_bytes


class TokenClock:
    """Timestamps of one generation: start() before the request, tick() as each token becomes available."""

    __slots__ = ("start_s", "ticks")

    def __init__(self) -> None:
        self.start_s = 0.0
        self.ticks: list[float] = []

    def start(self) -> None:
        self.ticks = []
        self.start_s = perf_counter()

    def tick(self) -> None:
        self.ticks.append(perf_counter())


@dataclass(frozen=True)
class Prompt:
    text: str  # what a text-only API is given; tokenizes to exactly `ids` with the backend's tokenizer
    ids: list[int]


class Backend(ABC):
    name: ClassVar[str]
    artifact_kinds: ClassVar[frozenset[str]]
    returns_logits: ClassVar[bool] = False
    module: ClassVar[str] = ""  # import name of the runtime library ("" = nothing to import)
    distribution: ClassVar[str] = ""  # PyPI distribution, for the version
    install_hint: ClassVar[str] = ""
    listed: ClassVar[bool] = True  # part of the default `--backend` set (the null backend is not)
    timed: ClassVar[bool] = True  # False: its speed means nothing (an interpreter used for quality only)
    kv_bytes_per_element: ClassVar[float] = 2  # KV cache precision (f16 in llama.cpp), for memory estimates
    kv_cache_types: ClassVar[tuple[str, ...]] = ()  # what bench/eval --kv-cache may ask for; (): not settable
    kv_cache: str | None = None  # set before load() by --kv-cache; None: the backend's default cache

    @classmethod
    def kv_bytes_for(cls, kv_cache: str | None) -> float:
        """Bytes of one cached K or V value with the cache type kv_cache (None: the backend's default)."""
        if kv_cache is None:
            return cls.kv_bytes_per_element
        cls.check_kv_cache(kv_cache)
        return kv_element_bytes(kv_cache)

    @classmethod
    def check_kv_cache(cls, kv_cache: str | None) -> None:
        """A one-line error unless kv_cache is None or a cache type this backend can be asked for."""
        if kv_cache is not None and kv_cache not in cls.kv_cache_types:
            offered = f"offers {', '.join(cls.kv_cache_types)}" if cls.kv_cache_types else "keeps its own cache"
            raise OndeviceError(f"--kv-cache {kv_cache}: the {cls.name} backend {offered}")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the runtime library can be imported, else why not (without importing it)."""
        if cls.module and importlib.util.find_spec(cls.module) is None:
            return f"{cls.module} is not installed ({cls.install_hint})" if cls.install_hint else \
                f"{cls.module} is not installed"
        return None

    @classmethod
    def version(cls) -> str | None:
        if not cls.distribution:
            return None
        try:
            return importlib.metadata.version(cls.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    @classmethod
    def accepts(cls, kind: str) -> bool:
        return kind in cls.artifact_kinds

    def import_runtime(self) -> None:
        """Import the runtime library (the worker does this before it measures its idle RSS)."""
        if self.module:
            importlib.import_module(self.module)

    @abstractmethod
    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        """Load the artifact; `logits` asks for a session that can return all positions' logits."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids for a raw prompt exactly as the backend's generate would see it (BOS included if added)."""

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        """Fresh greedy generation of exactly n_gen tokens (end-of-text ignored), no cache reuse across calls;
        clock.tick() once per token."""

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) float32 logits of every position, from an empty cache."""
        raise UnsupportedError(f"backend {self.name} does not return logits")

    def close(self) -> None:  # noqa: B027 (optional hook: most adapters have something to free, some do not)
        """Free the model."""


class ArtifactRunnerBackend(Backend):
    """A backend over an ondevice.runners.ArtifactRunner (tokenizer, KV cache, logits): a subclass opens the runner;
    generation is the runner's greedy loop (one prefill, then one cached step per token), end-of-text ignored."""

    def __init__(self) -> None:
        self.runner: ArtifactRunner | None = None
        self.prefix_ids: list[int] = []  # what the artifact's tokenizer adds before any text (a BOS, if it adds one)

    @abstractmethod
    def open_runner(self, artifact: Path, *, threads: int, n_ctx: int) -> ArtifactRunner:
        """The runner for the artifact (and set self.prefix_ids)."""

    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        self.runner = self.open_runner(artifact, threads=threads, n_ctx=n_ctx)

    def _loaded(self) -> ArtifactRunner:
        if self.runner is None:
            raise RuntimeError(f"backend {self.name}: load() first")
        return self.runner

    def tokenize(self, text: str) -> list[int]:
        return self.prefix_ids + self._loaded().encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._loaded().decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return int(self._loaded().vocab_size)

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        runner = self._loaded()
        clock.start()
        runner.greedy(prompt.ids, n_gen, on_token=lambda _token: clock.tick())

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self._loaded().logits(list(tokens))

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
