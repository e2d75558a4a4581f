"""GGUF file -> CanonicalModel: tensors dequantized lazily, q/k rows put back in HF order, tokenizer rebuilt."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.architectures.base import ROPE_FREQS_GGUF, unpermute_from_gguf
from ondevice.errors import InvalidModelError
from ondevice.formats.gguf import GGUFFile
from ondevice.formats.safetensors import release_pages
from ondevice.model import CanonicalModel, LazyTensor
from ondevice.quant import QuantType, quant_type_for_ggml


def _vocab_from_gguf(gguf: GGUFFile):
    from ondevice.tokenizer import vocab_from_gguf_metadata

    if gguf.get("tokenizer.ggml.model") is None or gguf.get("tokenizer.ggml.tokens") is None:
        raise InvalidModelError(f"{gguf.path}: the file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    metadata = {}
    for key, field in gguf.fields.items():
        if key.startswith("tokenizer.ggml."):
            value = field.value
            metadata[key] = value.tolist() if isinstance(value, np.ndarray) else value
    try:
        return vocab_from_gguf_metadata(metadata)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{gguf.path}: {exc}") from None


def tokenizer_from_gguf(gguf: GGUFFile) -> tuple[Any, str, Any]:
    """(vocab, tokenizer.json text, tokenizers.Tokenizer) of a GGUF file's metadata, built once and checked here so
    that load, inspect and convert reject the same files: a token a flipped bit renamed leaves a merge naming a
    token that no longer exists, which `tokenizers` refuses with a bare Exception."""
    from ondevice.tokenizer import build_tokenizer, hf_tokenizer_json_from_vocab

    vocab = _vocab_from_gguf(gguf)
    try:
        text = hf_tokenizer_json_from_vocab(vocab)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{gguf.path}: {exc}") from None
    # The position in the JSON we generated means nothing to the user; the token named does.
    what = f"{gguf.path}: tokenizer.ggml.tokens/merges"
    try:
        tokenizer = build_tokenizer(text, what)
    except InvalidModelError as exc:
        raise InvalidModelError(re.sub(r" at line \d+ column \d+", "", str(exc))) from None
    return vocab, text, tokenizer


def runtime_tokenizer_from_gguf(gguf: GGUFFile) -> tuple[Any, Any]:
    """(vocab, tokenizer) for the runtime (ondevice.tokenizer.runtime_tokenizer_from_vocab): a SentencePiece-style
    vocabulary runs llama.cpp's algorithm directly instead of building the tokenizer.json."""
    from ondevice.tokenizer import runtime_tokenizer_from_vocab

    if gguf.get("tokenizer.ggml.model") != "llama":  # decided before the vocabulary is read: read it once
        vocab, _, tokenizer = tokenizer_from_gguf(gguf)
        return vocab, tokenizer
    vocab = _vocab_from_gguf(gguf)
    try:
        return vocab, runtime_tokenizer_from_vocab(vocab)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{gguf.path}: {exc}") from None


def _special_from_vocab(vocab) -> object:
    """Special ids as llama.cpp uses them: generation ends on every end-of-generation token, not only EOS."""
    from ondevice.tokenizer import SpecialTokens, eog_ids

    return SpecialTokens(bos_id=vocab.bos_id, eos_id=vocab.eos_id, eos_ids=eog_ids(vocab), pad_id=vocab.pad_id,
                         unk_id=vocab.unk_id, add_bos=vocab.add_bos, add_eos=vocab.add_eos)


def open_gguf_file(path: str | Path) -> CanonicalModel:
    gguf = GGUFFile(path)
    try:
        arch_name = gguf.get("general.architecture")
        if not isinstance(arch_name, str):
            raise InvalidModelError(f"{gguf.path}: general.architecture is missing")
        arch = get_architecture(arch_name)
        spec = arch.spec_from_gguf(gguf)
        expected = arch.tensor_shapes(spec)
        tensors: dict[str, LazyTensor] = {}
        for gguf_name, info in gguf.tensors.items():
            if gguf_name == ROPE_FREQS_GGUF:  # read into spec.rope_freq_factors
                continue
            hf_name = arch.hf_name(gguf_name)
            if hf_name == "lm_head.weight" and spec.tie_embeddings:
                continue
            if expected.get(hf_name) != info.shape:
                raise InvalidModelError(
                    f"{gguf.path}: tensor {gguf_name!r} has shape {info.shape}, metadata implies {expected.get(hf_name)}"
                )
            qtype = quant_type_for_ggml(info.ggml_type)
            heads = arch.qk_heads(spec, hf_name)
            shift = arch.gguf_norm_shift(spec, hf_name)  # stored norm_offset + w: the HF weight is w
            loader = lambda n=gguf_name, q=qtype, h=heads, s=info.shape: _load(gguf, n, q, h, s)  # noqa: E731
            tensors[hf_name] = LazyTensor(
                hf_name, info.shape, qtype.name,
                loader=(lambda f=loader, o=shift: f() - np.float32(o)) if shift else loader,
                raw=None if shift else lambda n=gguf_name, q=qtype, h=heads: _raw(gguf, n, q, h),
            )
        missing = [n for n in expected if n not in tensors]
        if missing:
            raise InvalidModelError(f"{gguf.path}: tensor {arch.gguf_name(missing[0])!r} is missing")
        vocab, tokenizer_json, _ = tokenizer_from_gguf(gguf)
        if len(vocab.tokens) != spec.vocab_size:
            raise InvalidModelError(f"{gguf.path}: {len(vocab.tokens)} tokens but vocab_size {spec.vocab_size}")
        template = gguf.get("tokenizer.chat_template")
        metadata = {k: tv.value for k, tv in gguf.fields.items()
                    if k.startswith("general.") and not isinstance(tv.value, (list, np.ndarray))}
        return CanonicalModel(
            spec=spec,
            tensors=tensors,
            tokenizer_json=tokenizer_json,
            special=_special_from_vocab(vocab),
            chat_template=str(template) if template is not None else None,
            pre_tokenizer=vocab.pre,
            gguf_vocab=vocab,
            metadata=metadata,
            source_path=str(path),
            source_format="gguf",
            close=gguf.close,
        )
    except BaseException:
        gguf.close()
        raise


def _raw(gguf: GGUFFile, name: str, qtype: QuantType, heads: int | None) -> tuple[QuantType, np.ndarray]:
    rows = gguf.tensor_data(name)
    if heads is not None:
        rows = unpermute_from_gguf(rows, heads)
    return qtype, rows


def _load(gguf: GGUFFile, name: str, qtype: QuantType, heads: int | None, shape: tuple[int, ...]) -> np.ndarray:
    _, rows = _raw(gguf, name, qtype, heads)
    out = qtype.dequantize(rows, shape[-1]).reshape(shape)
    info = gguf.tensors[name]
    release_pages(gguf._mmap, info.offset, info.nbytes)
    return out
