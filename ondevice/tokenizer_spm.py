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
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ondevice.errors import InvalidModelError, UnsupportedError

if TYPE_CHECKING:
    from ondevice.tokenizer import GGUFVocab

SPM_MODEL = "llama"
SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
_BYTE_SET = frozenset(BYTE_TOKENS)

# What llama.cpp assumes for a "llama" vocabulary whose GGUF lacks the keys (llama_vocab::impl::load).
DEFAULT_BOS_ID = 1
DEFAULT_EOS_ID = 2
DEFAULT_UNK_ID = 0
DEFAULT_ADD_BOS = True
DEFAULT_ADD_SPACE_PREFIX = True

# GGUF token types (the values of ondevice.tokenizer's TOKEN_*, which imports this module lazily).
_TOKEN_UNKNOWN = 2
_TOKEN_USER_DEFINED = 4
_TOKEN_BYTE = 6


def read_scores(raw: Any, n_tokens: int, key: str) -> list[float]:
    """tokenizer.ggml.scores as finite floats, one per token: llama.cpp reads the array as float32 by token id
    without a check (an integer array would be reinterpreted, a short one overrun), and a NaN would make its
    merge order (a priority queue of scores) undefined."""
    if raw is None:
        raise InvalidModelError(f"GGUF SentencePiece tokenizer has no {key} (the merge priorities); re-convert it")
    if hasattr(raw, "dtype"):  # numpy array from a GGUF reader
        if getattr(raw.dtype, "kind", "") != "f":
            raise InvalidModelError(f"GGUF key {key} should be an array of float32, got {raw.dtype}")
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise InvalidModelError(f"GGUF key {key} should be an array of float32, got {type(raw).__name__}")
    if len(raw) != n_tokens:
        raise InvalidModelError(f"GGUF has {len(raw)} token scores for {n_tokens} tokens")
    scores: list[float] = []
    for tid, value in enumerate(raw):
        if not isinstance(value, float):
            raise InvalidModelError(f"GGUF key {key} should hold float32 numbers; entry {tid} is "
                                    f"{type(value).__name__}")
        if not math.isfinite(value):
            raise InvalidModelError(f"GGUF token score {tid} is {value}; scores must be finite numbers")
        scores.append(value)
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
    return token_type == _TOKEN_USER_DEFINED and SPACE not in text


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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face SentencePiece-BPE tokenizer.json -> GGUF "llama" vocabulary


def looks_like_spm(data: Mapping[str, Any], component_types: set[str]) -> bool:
    """A SentencePiece-style BPE tokenizer.json (Gemma's, Llama 2's, the ones spm_tokenizer_json writes): byte
    fallback or a Metaspace step, and no byte-level mapping."""
    model = data["model"]
    return model.get("type") in (None, "BPE") and "ByteLevel" not in component_types and (
        bool(model.get("byte_fallback")) or "Metaspace" in component_types)


def _space_handling(data: Mapping[str, Any], walk: Any) -> bool:
    """add_space_prefix of a SentencePiece tokenizer.json; UnsupportedError for steps a GGUF cannot state."""
    escapes = prefix = False
    for component in walk(data.get("normalizer")):
        kind = component.get("type")
        if kind == "Sequence":
            continue
        if kind == "Replace" and (component.get("pattern") or {}).get("String") == " " \
                and component.get("content") == SPACE:
            escapes = True
        elif kind == "Prepend" and component.get("prepend") == SPACE:
            prefix = True
        else:
            raise UnsupportedError(f"tokenizer.json normalizer step {kind!r} has no GGUF equivalent (llama.cpp only "
                                   "maps spaces to '\u2581' and may prepend one)")
    for component in walk(data.get("pre_tokenizer")):
        kind = component.get("type")
        if kind == "Sequence":
            continue
        if kind == "Split" and escapes and (component.get("pattern") or {}).get("String") == " ":
            continue  # transformers 5 writes this for Gemma: after the normalizer's " " -> "▁" it never matches
        if kind != "Metaspace" or component.get("split", True):
            raise UnsupportedError(f"tokenizer.json pre-tokenizer step {kind!r} splits words; llama.cpp's "
                                   "SentencePiece tokenizer merges across the whole text")
        escapes = True
        prefix = prefix or component.get("prepend_scheme", "always") != "never" or bool(
            component.get("add_prefix_space"))
    if not escapes:
        raise UnsupportedError("this byte-fallback BPE tokenizer.json does not map spaces to '\u2581'; it is not "
                               "SentencePiece-style, and not byte-level either")
    return prefix


def spm_scores_from_merges(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """Scores under which llama.cpp's SPM merges in the order these BPE merges do: each token formed by a merge
    scores -k for the k-th token in merge order, the rest score below them all.

    That holds only if the merges list every split of a token into two tokens (SPM tries them all) and keep each
    token's splits together (SPM ranks by token); UnsupportedError otherwise, naming the token.
    """
    index = {text: tid for tid, text in enumerate(tokens)}
    order: dict[int, int] = {}
    listed: Counter[int] = Counter()
    last = -1
    for left, right in merges:
        tid = index.get(left + right)
        if tid is None or left not in index or right not in index:
            raise InvalidModelError(f"tokenizer.json merge {left!r} + {right!r} names a token not in the vocabulary")
        if tid != last and tid in order:
            raise UnsupportedError(f"tokenizer.json merges for {tokens[tid]!r} are not listed together; SentencePiece "
                                   "scores cannot express that order")
        order.setdefault(tid, len(order))
        listed[tid] += 1
        last = tid
    for tid, text in enumerate(tokens):
        if len(text) < 2 or _cut_out(text, types[tid]):  # never formed by a merge (see _cut_out)
            continue
        splits = sum(1 for cut in range(1, len(text)) if text[:cut] in index and text[cut:] in index)
        if splits != listed[tid]:
            raise UnsupportedError(f"tokenizer.json lists {listed[tid]} of the {splits} merges that form "
                                   f"{text!r}; llama.cpp's SentencePiece tokenizer would use them all")
    rest = len(order)
    return [-float(order[tid]) if tid in order else -float(rest + tid) for tid in range(len(tokens))]


def spm_vocab_from_hf(data: Mapping[str, Any], special: Any, tokens: list[str], types: list[int],
                      merges: list[tuple[str, str]], walk: Any) -> GGUFVocab:
    """The GGUF "llama" vocabulary of a SentencePiece-style tokenizer.json, given what tokenizer.vocab_from_hf
    read from it (tokens padded to the model's rows with their added-token types, merges as pairs)."""
    from ondevice.tokenizer import TOKEN_NORMAL, GGUFVocab

    add_space_prefix = _space_handling(data, walk)
    unk = data["model"].get("unk_token")
    types = list(types)
    for tid, text in enumerate(tokens):
        if tid == special.unk_id or (types[tid] == TOKEN_NORMAL and text == unk):
            types[tid] = _TOKEN_UNKNOWN  # an added special token to `tokenizers`; UNKNOWN to SentencePiece
        elif types[tid] == TOKEN_NORMAL and text in _BYTE_SET:
            types[tid] = _TOKEN_BYTE
    check_spm_vocab(tokens, types)
    return GGUFVocab(
        model=SPM_MODEL, pre="default", tokens=tokens, token_types=types, merges=[],
        bos_id=special.bos_id, eos_id=special.eos_id, unk_id=special.unk_id, pad_id=special.pad_id,
        add_bos=special.add_bos, add_eos=special.add_eos, scores=spm_scores_from_merges(tokens, types, merges),
        add_space_prefix=add_space_prefix,
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
    "looks_like_spm",
    "spm_scores_from_merges",
    "spm_tokenizer_json",
    "spm_vocab_from_hf",
]
