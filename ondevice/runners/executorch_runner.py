"""Run an ExecuTorch `.pte` written by `--to executorch` through `executorch.runtime` (XNNPACK).

ExecuTorchTransformer mirrors ondevice.runtime.transformer.Transformer: forward(tokens, pos0, all_logits) over a
static KV cache held inside the program (its mutable buffers), so ondevice's generate loop can drive it.
ExecuTorchRunner is the ArtifactRunner (tests, bench): tokenizer and chat template from the manifest beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import InvalidModelError, MissingExtraError, OndeviceError
from ondevice.runners import ArtifactRunner

MANIFEST_FORMAT = "ondevice-executorch/1"


def read_manifest(pte: Path) -> dict[str, Any]:
    path = pte.with_suffix(".json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{pte}: its manifest {path.name} is missing (ondevice writes it beside the .pte; "
                                f"re-run ondevice convert --to executorch)") from None
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidModelError(f"{path}: not an ondevice ExecuTorch manifest (format {manifest.get('format')!r})")
    return manifest


class ExecuTorchTransformer:
    """forward(tokens, pos0, all_logits) -> logits of the last (vocab,) or every (n, vocab) token."""

    def __init__(self, pte: str | Path) -> None:
        try:
            import torch
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (llama:: kernels the .pte uses)
            from executorch.runtime import Runtime
        except ImportError:
            raise MissingExtraError("running .pte files needs the executorch extra: "
                                    "pip install 'ondevice[executorch]'") from None
        self._torch = torch
        self.path = Path(pte)
        self.manifest = read_manifest(self.path)
        self.n_ctx = int(self.manifest["max_seq_len"])
        self.max_chunk = int(self.manifest["max_chunk"])
        self.vocab_size = int(self.manifest["spec"]["vocab_size"])
        try:
            program = Runtime.get().load_program(self.path)
            self._method = program.load_method(self.manifest.get("method", "forward"))
        except Exception as exc:  # the runtime raises RuntimeError/ValueError with its own codes
            raise OndeviceError(f"executorch could not load {self.path}: {exc}") from None
        self._program = program  # the method borrows from the program: keep it alive

    def forward(self, tokens: np.ndarray | list[int], pos0: int, all_logits: bool = False) -> np.ndarray:
        from ondevice.runtime.transformer import ContextOverflowError

        torch = self._torch
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = len(ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if pos0 < 0 or pos0 + n > self.n_ctx:
            raise ContextOverflowError(f"{pos0 + n} tokens do not fit in the .pte's KV cache of {self.n_ctx}")
        outs = []
        for start in range(0, n, self.max_chunk):
            chunk = torch.from_numpy(ids[start : start + self.max_chunk].copy())[None]
            (logits,) = self._method.execute([chunk, torch.tensor([pos0 + start], dtype=torch.int64)])
            rows = logits[0] if all_logits else logits[0, -1:]
            # The output lives in the program's planned memory, which the next call overwrites: copy it out.
            outs.append(rows.numpy().astype(np.float32, copy=True))
        return np.concatenate(outs) if all_logits else outs[-1][0]


class ExecuTorchRunner(ArtifactRunner):
    def __init__(self, pte: str | Path) -> None:
        from tokenizers import Tokenizer

        self.transformer = ExecuTorchTransformer(pte)
        manifest = self.transformer.manifest
        self.manifest = manifest
        self.vocab_size = self.transformer.vocab_size
        self.tokenizer = Tokenizer.from_file(str(Path(pte).parent / manifest["tokenizer"]))
        special = manifest["special"]
        self.bos_id: int | None = special.get("bos_id")
        self.eos_ids: list[int] = sorted(special.get("eos_ids") or ([special["eos_id"]] if special.get("eos_id")
                                                                    is not None else []))
        self.chat_template: str | None = manifest.get("chat_template")
        self._length = 0

    def reset(self) -> None:
        # Cache rows past the current position are masked inside the program, so starting at 0 is a reset.
        self._length = 0

    def forward(self, tokens: list[int]) -> np.ndarray:
        logits = self.transformer.forward(np.asarray(tokens, np.int64), self._length, all_logits=True)
        self._length += len(tokens)
        return logits

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _token_text(self, token: int | None) -> str:
        return "" if token is None else (self.tokenizer.id_to_token(token) or "")

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        from ondevice.chat_template import render_chat

        if not self.chat_template:
            raise InvalidModelError(f"{self.transformer.path} has no chat template in its manifest")
        eos = self.eos_ids[0] if self.eos_ids else None
        text = render_chat(self.chat_template, messages, add_generation_prompt=True,
                           bos_token=self._token_text(self.bos_id), eos_token=self._token_text(eos))
        return self.encode(text)
