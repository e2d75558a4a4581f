"""Tokenizer built from GGUF metadata, a UTF-8-safe streaming detokenizer and stop-string handling."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from ondevice.formats.gguf import GGUFFile
from ondevice.tokenizer_spm import SpmTokenizer


def _decoder_strips_first_space(tokenizer: Tokenizer | SpmTokenizer) -> bool:
    """SentencePiece-style decoders with a dummy prefix drop the first piece's leading space (as llama_detokenize
    does for a whole text); a stream of pieces must not."""
    if isinstance(tokenizer, SpmTokenizer):
        return tokenizer.strips_first_space
    decoder = tokenizer.decoder
    if decoder is None:
        return False
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError):
        return False
    steps = state.get("decoders") or [state]
    return any(isinstance(step, dict) and step.get("type") == "Strip" and step.get("start") for step in steps)


class TextCodec:
    """Text <-> ids. `tokenizer` is a `tokenizers.Tokenizer` or, for a SentencePiece-style GGUF vocabulary,
    ondevice.tokenizer_spm.SpmTokenizer, which answers the same calls."""

    def __init__(self, tokenizer: Tokenizer | SpmTokenizer, bos_id: int | None, eos_ids: list[int], add_bos: bool) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_ids = set(eos_ids)
        self.add_bos = add_bos
        # A token decoded ahead of a stream's first token so that the decoder's leading-space strip hits it, not
        # the generated text ("▁Paris" streams as " Paris", as llama.cpp's token_to_piece gives it).
        self.stream_anchor = bos_id if bos_id is not None and _decoder_strips_first_space(tokenizer) else None

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> TextCodec:
        from ondevice.sources.gguf import _special_from_vocab, runtime_tokenizer_from_gguf

        vocab, tokenizer = runtime_tokenizer_from_gguf(gguf)
        special = _special_from_vocab(vocab)
        return cls(tokenizer, vocab.bos_id, list(special.eos_ids), vocab.add_bos)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids as llama.cpp gives them with special-token parsing on (chat markup becomes single tokens)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Turns generated ids into text pieces, never emitting half of a multi-byte character."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        anchor = codec.stream_anchor
        self.ids: list[int] = [] if anchor is None else [anchor]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.codec.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            piece = text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        prefix = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.codec.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class StopMatcher:
    """Holds back text that might be the start of a stop string; reports when one is complete."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, stopped?)."""
        self.pending += piece
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out = self.pending[:at]
                self.pending = ""
                return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
