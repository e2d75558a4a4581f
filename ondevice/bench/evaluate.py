"""`ondevice eval`: perplexity of an artifact on the bundled text, and the KL divergence / top-1 agreement of its
next-token distributions against a reference (a Hugging Face folder through transformers, or another artifact).
Both models see the very same token ids, cut into windows of `ctx` tokens (each opened by the BOS if the
tokenizer adds one)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ondevice.bench.artifacts import Artifact
from ondevice.bench.backends import BACKEND_MODULES, Backend, backend_class
from ondevice.bench.prompt import bundled_text
from ondevice.bench.quality import QualityTotals
from ondevice.errors import OndeviceError, UnsupportedError
from ondevice.runtime.kv import kv_quant_label


def pick_logits_backend(kind: str, wanted: str | None = None, prefer: str | None = None) -> str:
    """The backend that computes logits for an artifact kind: the one asked for, else `prefer`, else the first
    available one in registry order (ondevice's runtime before llama.cpp; Core ML itself before its numpy
    interpreter, which is not in the default bench set)."""
    if wanted:
        cls = backend_class(wanted)
        if not cls.returns_logits:
            raise UnsupportedError(f"backend {wanted} does not return logits, so it cannot be evaluated")
        if not cls.accepts(kind):
            raise UnsupportedError(f"backend {wanted} does not run {kind} artifacts")
        reason = cls.unavailable_reason()
        if reason:
            raise OndeviceError(f"backend {wanted} is not available: {reason}")
        return wanted
    candidates = ([prefer] if prefer else []) + list(BACKEND_MODULES)
    reasons = []
    for name in candidates:
        cls = backend_class(name)
        if cls.returns_logits and cls.accepts(kind):
            reason = cls.unavailable_reason()
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
    raise OndeviceError(f"no available backend returns logits for {kind} artifacts"
                        + (f" ({'; '.join(reasons)})" if reasons else ""))


@dataclass
class EvalWindowing:
    ctx: int = 256  # tokens per window, BOS included
    max_tokens: int = 1024  # text tokens evaluated at most (the bundled text has about 1,400)


@dataclass(frozen=True)
class EvalText:
    """The text perplexity and KL are measured on: the bundled one, or the user's (`--text FILE`, `--text -`)."""

    text: str
    label: str  # recorded with the results: which text they are about
    sha256: str

    @classmethod
    def bundled(cls) -> EvalText:
        text = bundled_text()
        return cls(text, "ondevice/data/eval_text.txt", hashlib.sha256(text.encode()).hexdigest())

    @classmethod
    def read(cls, spec: str, stdin: BinaryIO | None = None) -> EvalText:
        """`spec` is a file path, or "-" for standard input; a one-line error for anything that is not text."""
        if spec == "-":
            name = "standard input"
            if stdin is None and sys.stdin.isatty():
                print("reading the evaluation text from the terminal; end it with Ctrl-D", file=sys.stderr)
            data = (stdin or sys.stdin.buffer).read()
        else:
            path = Path(spec).expanduser()
            name = str(path)
            if path.is_dir():
                raise OndeviceError(f"--text {path}: is a folder, not a text file")
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise OndeviceError(f"--text {path}: no such file") from None
            except OSError as exc:
                raise OndeviceError(f"--text {path}: cannot read it ({exc.strerror or exc})") from None
        try:
            text = data.decode("utf-8-sig")  # a BOM from Windows editors is not part of the text
        except UnicodeDecodeError as exc:
            raise OndeviceError(f"--text {name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                f"{exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
        if not text.strip():
            raise OndeviceError(f"--text {name} is empty")
        return cls(text, name if spec != "-" else "<stdin>", hashlib.sha256(data).hexdigest())


def windows(backend: Backend, text: str, setup: EvalWindowing) -> list[list[int]]:
    prefix = backend.tokenize("")  # the BOS, when the tokenizer adds one
    body = backend.tokenize(text)[len(prefix):][: setup.max_tokens]
    step = setup.ctx - len(prefix)
    if step < 2:
        raise OndeviceError(f"--ctx {setup.ctx} is too small for evaluation")
    needed = min(step, setup.max_tokens)  # one full window (or all that --max-tokens allows)
    if len(body) < needed:
        raise OndeviceError(f"the evaluation text is {len(body)} tokens, shorter than one window of {needed}: "
                            f"give a longer text or a smaller --ctx")
    out = [prefix + body[i:i + step] for i in range(0, len(body), step)]
    return [w for w in out if len(w) >= 2]


def _load(name: str, artifact: Artifact, threads: int, n_ctx: int, kv_cache: str | None = None) -> Backend:
    backend = backend_class(name)()
    backend.check_kv_cache(kv_cache)
    backend.kv_cache = kv_cache
    backend.import_runtime()
    backend.load(artifact.path, threads=threads, n_ctx=n_ctx, logits=True)
    return backend


def evaluate(artifact: Artifact, reference: Artifact, *, backend: str | None = None, ref_backend: str | None = None,
             threads: int = 2, setup: EvalWindowing | None = None, progress: bool = True,
             text: EvalText | None = None, kv_cache: str | None = None,
             ref_kv_cache: str | None = None) -> dict[str, Any]:
    """kv_cache / ref_kv_cache: the KV cache type asked of each side's backend (None: its default)."""
    from tqdm import tqdm

    setup = setup or EvalWindowing()
    text = text or EvalText.bundled()
    name = pick_logits_backend(artifact.kind, backend)
    ref_name = pick_logits_backend(reference.kind, ref_backend, prefer=name if reference.kind == artifact.kind
                                   else None)
    test = _load(name, artifact, threads, setup.ctx, kv_cache)
    try:
        ref = _load(ref_name, reference, threads, setup.ctx, ref_kv_cache)
        try:
            if test.vocab_size != ref.vocab_size:
                raise OndeviceError(f"the artifact's vocabulary ({test.vocab_size}) differs from the reference's "
                                    f"({ref.vocab_size}): they are not the same model")
            chunks = windows(test, text.text, setup)
            totals = QualityTotals()
            for window in tqdm(chunks, desc="eval", unit="window", file=sys.stderr,
                               disable=not progress or None, leave=False):
                test_logits = test.logits(window)
                ref_logits = ref.logits(window)
                totals.add(ref_logits[:-1], test_logits[:-1], np.asarray(window[1:]))
            sample = text.text[:400]
            same_tokens = test.tokenize(sample) == ref.tokenize(sample)
        finally:
            ref.close()
    finally:
        test.close()
    result = totals.result()
    return {**result, "backend": name, "ref_backend": ref_name, "backend_version": backend_class(name).version(),
            "ctx": setup.ctx, "max_tokens": setup.max_tokens, "windows": len(chunks),
            "tokenizers_agree": same_tokens, "text": text.label, "text_sha256": text.sha256, "kv_cache": kv_cache,
            "ref_kv_cache": ref_kv_cache}


def quality_row(artifact: Artifact, reference: Artifact, result: dict[str, Any],
                environment: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "quality", "status": "ok", "backend": result["backend"], "backend_version": result["backend_version"],
        "model": artifact.model, "quant": kv_quant_label(artifact.quant, result.get("kv_cache")),
        "artifact": str(artifact.path), "artifact_kind": artifact.kind, "artifact_size_bytes": artifact.size_bytes,
        "weight_bytes_per_token": artifact.weight_bytes_per_token,
        "reference": f"{reference.path} ({result['ref_backend']}, "
                     f"{kv_quant_label(reference.quant, result.get('ref_kv_cache'))})",
        "eval_tokens": result["tokens"], "perplexity": result["perplexity"],
        "ref_perplexity": result["ref_perplexity"], "kl_mean": result["kl_mean"], "kl_max": result["kl_max"],
        "top1_agreement": result["top1_agreement"],
        "settings": {"ctx": result["ctx"], "max_tokens": result["max_tokens"], "windows": result["windows"],
                     "ref_backend": result["ref_backend"], "text": result.get("text", "ondevice/data/eval_text.txt"),
                     "text_sha256": result.get("text_sha256"),
                     "kl_p99": result["kl_p99"], "tokenizers_agree": result["tokenizers_agree"],
                     "kv_cache": result.get("kv_cache"), "ref_kv_cache": result.get("ref_kv_cache"),
                     "source": artifact.source},
        "environment": environment,
    }
