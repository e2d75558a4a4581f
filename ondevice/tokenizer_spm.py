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

import heapq
import math
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ondevice.errors import InvalidModelError, UnsupportedError

if TYPE_CHECKING:
    from ondevice.tokenizer import GGUFVocab

SPM_MODEL = "llama"
SPACE = "\u2581"  # SentencePiece's visible space
SPACE_CHAR = " "
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
_TOKEN_CONTROL = 3
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


def spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[str]:
    """Every split of a token into two tokens, best score first, as "left right" strings: the BPE merges that
    replay llama.cpp's SPM.

    llama.cpp merges any adjacent pair whose concatenation is a token (control, user-defined and byte tokens
    included), so every type takes part. Equal scores keep token-id order, then the longer left part first. A
    token holding a literal space is never formed (spaces are "▁" before merging), so its splits are left out,
    which also keeps every merge writable in the compact "left right" form. UnsupportedError for the two
    vocabularies BPE cannot replay (see _check_replayable).
    """
    index = {text: tid for tid, text in enumerate(tokens)}
    # Sort keys in flat arrays, not a tuple per merge: a 262k vocabulary has ~515k merges.
    merge_tids = array("q")  # int64 on every platform ("l" is 32-bit on Windows)
    merge_cuts = array("q")
    for tid, text in enumerate(tokens):
        last = len(text) - 1
        for cut in range(1, last + 1):
            left = text[:cut]
            if left in index:
                right = text[cut:]
                if right in index:
                    merge_tids.append(tid)
                    merge_cuts.append(cut)
                elif cut == last:
                    _check_formable_by_char(text, types[tid], left, right, index)
            elif cut == 1:
                _check_formable_by_char(text, types[tid], left, text[1:], index)
    del index
    tids = np.frombuffer(merge_tids, dtype=np.int64)
    cuts = np.frombuffer(merge_cuts, dtype=np.int64)
    _check_replayable(tokens, types, scores, np.unique(tids).tolist())
    token_scores = np.asarray(scores, dtype=np.float64)[tids]
    order = np.lexsort((-cuts, tids, -token_scores))  # the last key sorts first
    merges = []
    for tid, cut in zip(tids[order].tolist(), cuts[order].tolist(), strict=True):
        text = tokens[tid]
        if SPACE_CHAR not in text:
            merges.append(f"{text[:cut]} {text[cut:]}")
    return merges


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


def _check_replayable(tokens: list[str], types: list[int], scores: list[float], mergeable: list[int]) -> None:
    """SPM pops equal scores leftmost first, a BPE rank order cannot: two tokens a merge can form must not share a
    score, or ondevice would tokenize differently from llama.cpp. Real SentencePiece scores are unique; Gemma's
    89 user-defined space/newline/HTML runs share -1000 but are never formed (_cut_out). (The other case BPE
    cannot replay, a token formed with a character that is no token, is refused in spm_merges.)"""
    seen: dict[float, int] = {}
    for tid in mergeable:  # ascending ids
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
# The runtime's tokenizer for a "llama" vocabulary: llama.cpp's algorithm itself, no merge table


@dataclass(frozen=True)
class SpmEncoding:
    ids: list[int]


class SpmTokenizer:
    """llama.cpp's SentencePiece tokenization (llm_tokenizer_spm and tokenizer_st_partition), run directly on the
    vocabulary: a dict of token texts and the scores. The BPE replay of spm_tokenizer_json needs ~515k merges for a
    262k vocabulary, which `tokenizers` holds in ~100 MB; this holds the texts the GGUF already gave (~30 MB) and
    loads in a fraction of a second. It answers the part of the `tokenizers.Tokenizer` API the runtime uses
    (encode(...).ids, decode, id_to_token, get_vocab, encode_special_tokens, to_str), with the same results as the
    tokenizer.json that spm_tokenizer_json writes, which the converters still write for other runtimes.
    """

    def __init__(self, vocab: GGUFVocab, tokens: list[str], types: list[int]) -> None:
        if len(vocab.scores) != len(tokens):
            raise InvalidModelError(f"{len(vocab.scores)} token scores for {len(tokens)} tokens")
        check_spm_vocab(tokens, vocab.token_types)
        self._vocab = vocab
        self._tokens = tokens
        self._index = {text: tid for tid, text in enumerate(tokens)}
        self._scores = vocab.scores
        self._byte_ids = [self._index[text] for text in BYTE_TOKENS]
        # What tokenizers' ByteFallback decoder reads as a byte: any token spelled <0xNN> (either case).
        self._byte_values = {tid: int(text[3:5], 16) for tid, text in enumerate(tokens)
                             if len(text) == 6 and text.startswith("<0x") and text.endswith(">")
                             and all(c in "0123456789abcdefABCDEF" for c in text[3:5])}
        # Cut out of the text before merging, longest first (ties: lower id; llama.cpp's std::sort leaves them
        # unordered): control and unknown tokens only when special-token parsing is on.
        cut = [(tid, types[tid] == _TOKEN_USER_DEFINED) for tid, t in enumerate(types)
               if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNKNOWN) and tokens[tid]]
        self._cut_tokens = sorted(cut, key=lambda entry: (-len(tokens[entry[0]]), entry[0]))
        self._special_ids = frozenset(tid for tid, user_defined in cut if not user_defined)
        self.strips_first_space = vocab.add_space_prefix
        self.encode_special_tokens = False  # tokenizers' name: True = parse_special off

    # -- encode
    def encode(self, text: str, add_special_tokens: bool = True) -> SpmEncoding:
        ids: list[int] = []
        vocab = self._vocab
        if add_special_tokens and vocab.add_bos and vocab.bos_id is not None:
            ids.append(vocab.bos_id)
        after_token = True  # llama.cpp prefixes a space at the start and after every cut-out token
        for piece in self._partition(text):
            if isinstance(piece, int):
                ids.append(piece)
                after_token = True
                continue
            if vocab.add_space_prefix and after_token:
                piece = " " + piece
            self._merge(piece.replace(" ", SPACE), ids)
            after_token = False
        if add_special_tokens and vocab.add_eos and vocab.eos_id is not None:
            ids.append(vocab.eos_id)
        return SpmEncoding(ids)

    def _partition(self, text: str) -> list[str | int]:
        """The text split around the cut-out tokens it holds: str for text, int for a token id."""
        pieces: list[str | int] = [text] if text else []
        parse_special = not self.encode_special_tokens
        for tid, user_defined in self._cut_tokens:
            needle = self._tokens[tid]
            if not (user_defined or parse_special) or needle not in text:
                continue
            split: list[str | int] = []
            for piece in pieces:
                if isinstance(piece, int) or needle not in piece:
                    split.append(piece)
                    continue
                for k, part in enumerate(piece.split(needle)):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            pieces = split
        return pieces

    def _merge(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize: merge the adjacent pair that forms the best-scoring token (ties:
        the leftmost) until none does; a character no token covers becomes its UTF-8 byte tokens."""
        n = len(text)
        if n == 0:
            return
        index, scores = self._index, self._scores
        size = [1] * n  # symbol i starts at character i; 0 once merged into its left neighbour
        prev = list(range(-1, n - 1))
        after = list(range(1, n + 1))
        after[-1] = -1
        queue: list[tuple[float, int, int, int]] = []

        def try_pair(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            length = size[left] + size[right]
            tid = index.get(text[left:left + length])
            if tid is not None:
                heapq.heappush(queue, (-scores[tid], left, right, length))

        for i in range(1, n):
            try_pair(i - 1, i)
        while queue:
            _, left, right, length = heapq.heappop(queue)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != length:
                continue  # one side has changed since this pair was queued
            size[left] = length
            size[right] = 0
            after[left] = after[right]
            if after[right] >= 0:
                prev[after[right]] = left
            try_pair(prev[left], left)
            try_pair(left, after[left])
        i = 0
        while i != -1:
            piece = text[i:i + size[i]]
            tid = index.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
            i = after[i]

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        """Token text -> id, every token (the added ones are tokens of the vocabulary here)."""
        return dict(self._index)

    # -- decode
    def id_to_token(self, token_id: int) -> str | None:
        return self._tokens[token_id] if 0 <= token_id < len(self._tokens) else None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """As the tokenizer.json decoder does it: "▁" back to spaces, runs of byte tokens to UTF-8 (an invalid run
        becomes one U+FFFD per byte), and one leading space dropped when the vocabulary prefixes one."""
        parts: list[str] = []
        pending = bytearray()
        n_pending = 0

        def flush() -> None:
            nonlocal n_pending
            if n_pending:
                try:
                    parts.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * n_pending)
                pending.clear()
                n_pending = 0

        for tid in ids:
            text = self.id_to_token(tid)
            if text is None or (skip_special_tokens and tid in self._special_ids):
                continue
            byte = self._byte_values.get(tid)
            if byte is not None:
                pending.append(byte)
                n_pending += 1
                continue
            flush()
            parts.append(text.replace(SPACE, " "))
        flush()
        decoded = "".join(parts)
        if self.strips_first_space and decoded.startswith(" "):
            decoded = decoded[1:]
        return decoded

    def to_str(self) -> str:
        """The equivalent tokenizer.json (built on demand: structured output and bundles need one)."""
        from ondevice.tokenizer import hf_tokenizer_json_from_vocab

        return hf_tokenizer_json_from_vocab(self._vocab)


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
    "SpmEncoding",
    "SpmTokenizer",
    "check_spm_vocab",
    "read_scores",
    "spm_merges",
    "looks_like_spm",
    "spm_scores_from_merges",
    "spm_tokenizer_json",
    "spm_vocab_from_hf",
]
