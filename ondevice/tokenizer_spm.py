"""SentencePiece-style vocabularies ("llama" in GGUF's tokenizer.ggml.model): Gemma, Llama 2, Mistral v0.1...

llama.cpp tokenizes them with llm_tokenizer_spm (src/llama-vocab.cpp): special and user-defined tokens are cut
out of the text first, a space is put in front of each remaining piece that follows a token (or starts the text)
when add_space_prefix is on, every " " becomes "▁", and then, inside each piece, the adjacent pair whose
concatenation is the vocabulary token with the highest *score* is merged, again and again (ties: the leftmost
pair); a character no token covers is written as its UTF-8 bytes, the <0xNN> tokens.

That is BPE whose merge list is every (left, right) split of every token into two tokens, ranked by the score of
the token they form. So the runtime keeps one tokenizer implementation, Hugging Face `tokenizers`, and this module
writes the tokenizer.json that reproduces llama.cpp: a BPE model with those merges and byte_fallback, a normalizer
that maps spaces to "▁" (and prepends one), and a decoder that undoes both. Two kinds of vocabulary BPE ranks
cannot replay (tied scores among formable tokens, and a formable token holding a character that is no token) are
refused with UnsupportedError instead of being tokenized differently; real SentencePiece vocabularies are neither.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ondevice.errors import InvalidModelError, UnsupportedError

if TYPE_CHECKING:
    from ondevice.tokenizer import GGUFVocab

SPM_MODEL = "llama"
SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))

# What llama.cpp assumes for a "llama" vocabulary whose GGUF lacks the keys (llama_vocab::impl::load).
DEFAULT_BOS_ID = 1
DEFAULT_EOS_ID = 2
DEFAULT_UNK_ID = 0
DEFAULT_ADD_BOS = True
DEFAULT_ADD_SPACE_PREFIX = True

_TOKEN_BYTE = 6
TOKEN_USER_DEFINED = 4


def read_scores(raw: Any, n_tokens: int, key: str) -> list[float]:
    """tokenizer.ggml.scores as finite floats, one per token: llama.cpp indexes it by token id without a check,
    and a NaN would make its merge order (a priority queue of scores) undefined."""
    if raw is None:
        raise InvalidModelError(f"GGUF SentencePiece tokenizer has no {key}; llama.cpp needs one score per token")
    if hasattr(raw, "dtype"):  # numpy array from a GGUF reader
        if getattr(raw.dtype, "kind", "") not in "fiu":
            raise InvalidModelError(f"GGUF key {key} should be an array of numbers, got {raw.dtype}")
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise InvalidModelError(f"GGUF key {key} should be an array of numbers, got {type(raw).__name__}")
    if len(raw) != n_tokens:
        raise InvalidModelError(f"GGUF has {len(raw)} token scores for {n_tokens} tokens")
    scores: list[float] = []
    for tid, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidModelError(f"GGUF key {key} should hold numbers; entry {tid} is {type(value).__name__}")
        if not math.isfinite(value):
            raise InvalidModelError(f"GGUF token score {tid} is {value}; scores must be finite numbers")
        scores.append(float(value))
    return scores


def check_spm_vocab(tokens: list[str], types: list[int]) -> None:
    """The byte tokens byte fallback writes must all exist, typed BYTE: llama.cpp aborts on a character it cannot
    spell (and prints a <0xNN> of another type as that text instead of the byte)."""
    index = {text: tid for tid, text in enumerate(tokens)}
    for text in BYTE_TOKENS:
        tid = index.get(text)
        if tid is None:
            raise InvalidModelError(
                f"GGUF SentencePiece vocabulary lacks the byte token {text}; byte fallback needs all 256 <0xNN> tokens"
            )
        if types[tid] != _TOKEN_BYTE:
            raise InvalidModelError(f"GGUF byte token {text} (id {tid}) has token type {types[tid]}, not 6 (byte)")


def spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """Every split of a token into two tokens, best score first: the BPE merges that replay llama.cpp's SPM.

    llama.cpp merges any adjacent pair whose concatenation is a token (control, user-defined and byte tokens
    included), so every type takes part. Equal scores keep token-id order, then the longer left part first.
    UnsupportedError for the two vocabularies BPE cannot replay (see _check_replayable).
    """
    index = {text: tid for tid, text in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tid, text in enumerate(tokens):
        last = len(text) - 1
        for cut in range(1, last + 1):
            left = text[:cut]
            if left in index:
                right = text[cut:]
                if right in index:
                    ranked.append((-scores[tid], tid, -cut, left, right))
                elif cut == last:
                    _check_formable_by_char(text, types[tid], left, right, index)
            elif cut == 1:
                _check_formable_by_char(text, types[tid], left, text[1:], index)
    _check_replayable(tokens, types, scores, {entry[1] for entry in ranked})
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]


def _check_formable_by_char(text: str, token_type: int, left: str, right: str, index: Mapping[str, int]) -> None:
    """A split where one side is no token: llama.cpp still merges it when that side is a single character (one
    symbol of its own), byte fallback cannot (it has become bytes); refuse such a vocabulary."""
    if _symbol(left, index) and _symbol(right, index) and not _cut_out(text, token_type):
        raise UnsupportedError(
            f"GGUF SentencePiece token {text!r} is formed from {left!r} and {right!r}, and "
            f"{right if left in index else left!r} is no token: llama.cpp merges such a character, byte "
            "fallback cannot; ondevice cannot reproduce this vocabulary yet"
        )


def _symbol(text: str, index: Mapping[str, int]) -> bool:
    """Can `text` be one symbol of llama.cpp's merge: a token, or a single character (a space never is: it has
    become "▁" before merging)?"""
    return text in index or (len(text) == 1 and text != " ")


def _cut_out(text: str, token_type: int) -> bool:
    """User-defined tokens are cut out of the text before merging, so a merge never forms one (unless it holds a
    "▁", which only appears after that cut)."""
    return token_type == TOKEN_USER_DEFINED and SPACE not in text


def _check_replayable(tokens: list[str], types: list[int], scores: list[float], mergeable: set[int]) -> None:
    """SPM pops equal scores leftmost first, a BPE rank order cannot: two tokens a merge can form must not share a
    score, or ondevice would tokenize differently from llama.cpp. Real SentencePiece scores are unique; Gemma's
    89 user-defined space/newline/HTML runs share -1000 but are never formed (_cut_out). (The other case BPE
    cannot replay, a token formed with a character that is no token, is refused in spm_merges.)"""
    seen: dict[float, int] = {}
    for tid in sorted(mergeable):
        if _cut_out(tokens[tid], types[tid]):
            continue
        other = seen.setdefault(scores[tid], tid)
        if other != tid:
            raise UnsupportedError(
                f"GGUF SentencePiece vocabulary gives tokens {tokens[other]!r} and {tokens[tid]!r} the same score "
                f"{scores[tid]}; ondevice cannot reproduce llama.cpp's merge order for tied scores yet"
            )


def spm_tokenizer_json(vocab: GGUFVocab, tokens: list[str], added_tokens: list[dict[str, Any]],
                       post_processor: Mapping[str, Any] | None) -> str:
    """The tokenizer.json for a "llama" vocabulary (see the module docstring). `tokens` are the vocabulary's texts
    with llama.cpp's renaming applied, `added_tokens` the CONTROL/USER_DEFINED/UNKNOWN entries tokenizer.py builds
    for every vocabulary type."""
    if len(vocab.scores) != len(tokens):
        raise InvalidModelError(f"{len(vocab.scores)} token scores for {len(tokens)} tokens")
    check_spm_vocab(tokens, vocab.token_types)
    replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizers: list[dict[str, Any]] = [replace_space]
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if vocab.add_space_prefix:
        # `tokenizers` normalizes each piece between added tokens on its own, so this prepends exactly where
        # llama.cpp does (at the start and after every special/user-defined token) ...
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE})
        # ... and llama_detokenize drops one leading space of the first piece.
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    from ondevice.tokenizer import bpe_tokenizer_json

    return bpe_tokenizer_json(
        tokens, spm_merges(tokens, vocab.token_types, vocab.scores),
        added_tokens=added_tokens, normalizer={"type": "Sequence", "normalizers": normalizers},
        pre_tokenizer=None,  # SPM merges across the whole piece: no word splitting
        post_processor=dict(post_processor) if post_processor else None,
        decoder={"type": "Sequence", "decoders": decoders}, byte_fallback=True, ignore_merges=False,
    )


__all__ = [
    "BYTE_TOKENS",
    "DEFAULT_ADD_BOS",
    "DEFAULT_ADD_SPACE_PREFIX",
    "DEFAULT_BOS_ID",
    "DEFAULT_EOS_ID",
    "DEFAULT_UNK_ID",
    "SPACE",
    "SPM_MODEL",
    "check_spm_vocab",
    "read_scores",
    "spm_merges",
    "spm_tokenizer_json",
]
