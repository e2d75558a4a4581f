"""Run an ONNX folder (`--to onnx`): onnxruntime.InferenceSession with the KV cache fed back step by step
(ONNXRunner), or onnxruntime-genai's own Model/Generator loop (GenAIRunner)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import InvalidModelError, MissingExtraError, OndeviceError
from ondevice.runners import ArtifactRunner


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "genai_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidModelError(f"{folder}: not an ONNX model folder ({path.name}: {exc})") from None


class _TextSide:
    """Tokenizer and chat template from the folder's tokenizer.json / chat template (no transformers needed)."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        from ondevice.chat_template import load_chat_template

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.chat_template = load_chat_template(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.bos_token = config.get("bos_token") or ""
        self.eos_token = config.get("eos_token") or ""

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        from ondevice.chat_template import render_chat

        if not self.chat_template:
            raise InvalidModelError("this model folder has no chat template")
        text = render_chat(self.chat_template, messages, add_generation_prompt=True, bos_token=self.bos_token,
                           eos_token=self.eos_token)
        return self.encode(text)


class ONNXRunner(ArtifactRunner):
    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("running ONNX artifacts needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder)
        config = _read_config(folder)
        decoder = config["decoder"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(folder / decoder["filename"]), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise OndeviceError(f"onnxruntime could not load {folder}: {exc}") from None
        self.n_layers = int(decoder["num_hidden_layers"])
        self.n_kv = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        self.vocab_size = int(config["vocab_size"])
        eos = config.get("eos_token_id")
        self.eos_ids = sorted(eos if isinstance(eos, list) else [eos]) if eos is not None else []
        self.text = _TextSide(folder)
        self._past: dict[str, np.ndarray] = {}
        self._length = 0
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.n_kv, 0, self.head_dim), np.float32)
        self._past = {}
        for i in range(self.n_layers):
            self._past[f"past_key_values.{i}.key"] = empty
            self._past[f"past_key_values.{i}.value"] = empty
        self._length = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        feeds = {
            "input_ids": np.asarray([tokens], np.int64),
            "attention_mask": np.ones((1, self._length + n), np.int64),
            **self._past,
        }
        results = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        by_name = dict(zip(names, results, strict=True))
        for i in range(self.n_layers):
            self._past[f"past_key_values.{i}.key"] = by_name[f"present.{i}.key"]
            self._past[f"past_key_values.{i}.value"] = by_name[f"present.{i}.value"]
        self._length += n
        return by_name["logits"][0].astype(np.float32, copy=False)

    def encode(self, text: str) -> list[int]:
        return self.text.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.text.decode(ids)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.text.chat_tokens(messages)


class GenAIRunner:
    """onnxruntime-genai's loop (its tokenizer, its KV cache handling) on the same folder: greedy generation."""

    def __init__(self, folder: str | Path) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise MissingExtraError("this needs onnxruntime-genai: pip install onnxruntime-genai") from None
        self._og = og
        try:
            self.model = og.Model(str(folder))
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError/OrtException
            raise OndeviceError(f"onnxruntime-genai could not load {folder}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, np.int32))

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """At most n greedy tokens after `prompt` (stops at end-of-sequence, as onnxruntime-genai does)."""
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, top_k=1, max_length=len(prompt) + n, batch_size=1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray([prompt], np.int32))
        out: list[int] = []
        while not generator.is_done() and len(out) < n:
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out
