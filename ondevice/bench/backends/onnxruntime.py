"""ONNX folders (`--to onnx`: model.onnx + genai_config.json) through ONNX Runtime.

Speed: onnxruntime-genai's own generation loop (og.Model / og.Generator: its KV cache handling, greedy search)
where it is installed, else plain onnxruntime with ondevice's loop (the KV cache fed back step by step,
ondevice.runners.onnx_runner.ONNXRunner). `onnxruntime-plain` forces the plain loop. Logits always come from
the plain InferenceSession (genai does not return every position's logits)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.bench.backends.base import ONNX, ArtifactRunnerBackend, Prompt, TokenClock
from ondevice.errors import OndeviceError
from ondevice.runners import ArtifactRunner


def onnx_folder(artifact: Path) -> Path:
    """The model folder of an ONNX artifact given as the folder or as its .onnx file."""
    return artifact.parent if artifact.is_file() else artifact


def bos_prefix(folder: Path) -> list[int]:
    """[bos id] when the folder's tokenizer_config.json says a BOS is added, else []."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError):
        return []
    bos = genai.get("bos_token_id")
    return [int(bos)] if config.get("add_bos_token") and bos is not None else []


class _GenAIGenerator:
    """onnxruntime-genai's model loaded with the benchmark's thread count, generating exactly n tokens."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError / OrtException
            raise OndeviceError(f"onnxruntime-genai could not load {folder}: {exc}") from None

    def generate(self, prompt_ids: list[int], n_gen: int, clock: TokenClock) -> None:
        og = self._og
        params = og.GeneratorParams(self.model)
        total = len(prompt_ids) + n_gen
        # min_length = max_length: end-of-text cannot stop it, exactly n_gen tokens (as llama-bench does).
        params.set_search_options(do_sample=False, top_k=1, max_length=total, min_length=total, batch_size=1)
        generator = og.Generator(self.model, params)
        clock.start()
        generator.append_tokens(np.asarray([prompt_ids], np.int32))
        produced = 0
        while produced < n_gen and not generator.is_done():
            generator.generate_next_token()
            clock.tick()
            produced += 1
        del generator


class OnnxRuntimeBackend(ArtifactRunnerBackend):
    name = "onnxruntime"
    artifact_kinds = frozenset({ONNX})
    returns_logits = True
    module = "onnxruntime"
    distribution = "onnxruntime"
    install_hint = "pip install onnxruntime (and onnxruntime-genai for its generation loop)"
    kv_bytes_per_element = 4  # float32 present/past tensors
    use_genai: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.genai: _GenAIGenerator | None = None
        self._text: Any = None  # the tokenizer side (ondevice.runners.onnx_runner._TextSide) when genai runs
        self._folder: Path | None = None
        self._genai_vocab_size = 0

    @classmethod
    def genai_available(cls) -> bool:
        return cls.use_genai and importlib.util.find_spec("onnxruntime_genai") is not None

    @classmethod
    def version(cls) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ort = f"onnxruntime {version('onnxruntime')}"
            return f"onnxruntime-genai {version('onnxruntime-genai')} / {ort}" if cls.genai_available() else ort
        except PackageNotFoundError:
            return None

    def import_runtime(self) -> None:
        import onnxruntime  # noqa: F401

        if self.genai_available():
            import onnxruntime_genai  # noqa: F401

    def open_runner(self, artifact: Path, *, threads: int, n_ctx: int) -> ArtifactRunner:
        from ondevice.runners.onnx_runner import ONNXRunner

        return ONNXRunner(self._folder or onnx_folder(artifact), threads=threads)

    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        from ondevice.runners.onnx_runner import _TextSide

        self._folder = onnx_folder(artifact)
        self.prefix_ids = bos_prefix(self._folder)
        if logits or not self.genai_available():
            super().load(artifact, threads=threads, n_ctx=n_ctx)
            return
        # Speed through genai: only its session is loaded (a second copy of the weights would inflate the RSS).
        self.genai = _GenAIGenerator(self._folder, threads)
        self._text = _TextSide(self._folder)
        config = json.loads((self._folder / "genai_config.json").read_text(encoding="utf-8"))
        self._genai_vocab_size = int(config["model"]["vocab_size"])

    def tokenize(self, text: str) -> list[int]:
        return self.prefix_ids + (self._text.encode(text) if self.genai else self._loaded().encode(text))

    def detokenize(self, ids: list[int]) -> str:
        return self._text.decode(ids) if self.genai else self._loaded().decode(ids)

    @property
    def vocab_size(self) -> int:
        if self.genai is not None:
            return self._genai_vocab_size
        return int(self._loaded().vocab_size)

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        if self.genai is not None:
            self.genai.generate(prompt.ids, n_gen, clock)
        else:
            super().generate(prompt, n_gen, clock)

    def close(self) -> None:
        self.genai = None
        super().close()


BACKEND = OnnxRuntimeBackend
