"""Several replies decoded together: continuous batching over the KV cache slots of one model.

A Batch holds N slots (each a sequence's own KV cache region and position, Transformer.ensure_slots). step()
admits waiting requests into free slots, evaluates one prompt chunk of a newcomer (chunked prefill: the others'
streams pause for one chunk, not a whole prompt), then one new token of every decoding reply, their rows going
through the weights together (Transformer.forward_segments). Requests join and leave between steps.

Identity: a decode pass holds at most `Transformer.exact_rows` rows, the most for which each row's logits are
bit-identical to a one-row pass, and a prompt is evaluated in the chunks generate() uses; with temperature 0 a
reply is therefore the one it gets alone (exact=False packs all rows into one pass: faster, equal up to rounding).

Prompt cache: a slot keeps the tokens it evaluated after its reply ends; a newcomer goes to the free slot holding
the longest prefix of its prompt and evaluates only the rest (GenerationStats.cached_tokens); when another slot,
even a busy one, holds a longer prefix, its K/V rows are copied over (a memcpy, not a recomputation).

Context shift (a request with shift_keep, `context_shift=True`): a prompt that leaves too little room is shortened
as generate() shortens it (the oldest tokens after the kept ones go, half at a time), and a slot that fills up
mid-reply drops the older half of its tokens after the kept ones, its keys re-rotated (Transformer.shift), so a
long conversation keeps answering in every slot.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ondevice.errors import OndeviceError
from ondevice.runtime.shift import Dropped, common_prefix, shift_full_slot, shorten_prompt
from ondevice.runtime.transformer import ContextOverflowError

if TYPE_CHECKING:
    from ondevice.runtime.model import Decoding, GenerationStats, LanguageModel, Request


@dataclass(eq=False)
class Sequence:
    """One reply in a Batch: read `pieces` (or `text`) and `stats`; `done` once it ended."""

    request: Request
    stats: GenerationStats
    submitted_at: float = field(default_factory=time.perf_counter)
    pieces: list[str] = field(default_factory=list)
    done: bool = False
    slot: int | None = None
    evaluated: int = 0  # prompt tokens whose K/V are in the slot (prefill progress)
    decoding: Decoding | None = None  # set when the prompt is evaluated and the first token sampled
    prefill_started: float = 0.0
    dropped: int = 0  # prompt tokens a context shift left out (they cost nothing: counted as cached)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def prefilling(self) -> bool:
        return self.slot is not None and self.decoding is None


class Batch:
    """Continuous batching of generate()-style requests on one model (see the module docstring)."""

    def __init__(self, model: LanguageModel, slots: int, *, prefill_chunk: int | None = None,
                 exact: bool = True, on_piece: Callable[[Sequence, str], None] | None = None) -> None:
        transformer = model.transformer
        if not hasattr(transformer, "forward_segments"):
            raise OndeviceError("batched decoding needs ondevice's own runtime (a GGUF model); this backend "
                                "decodes one sequence at a time")
        if slots < 1:
            raise OndeviceError(f"a batch needs at least one slot, got {slots}")
        self.model = model
        self.transformer = transformer
        self.on_piece = on_piece  # called with each piece as soon as it exists (a step prefills several prompts)
        # slot 0 stays the single-sequence cache of model.generate(), so both can be used on one model
        transformer.ensure_slots(slots + 1)
        self.slots = list(range(1, slots + 1))
        self.slot_tokens: dict[int, list[int]] = {s: [] for s in self.slots}  # tokens whose K/V each slot holds
        # (prompt length, logits after it) of a slot's last prompt: the same prompt again needs no evaluation
        self._memo: dict[int, tuple[int, np.ndarray] | None] = {s: None for s in self.slots}
        self._last_used: dict[int, int] = {s: 0 for s in self.slots}
        # context shift: what each slot's conversation left out (ondevice.runtime.shift)
        self._dropped: dict[int, Dropped] = {s: Dropped() for s in self.slots}
        self._free = set(self.slots)
        self._waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []  # in admission order
        self._steps = 0
        self.rows_per_pass = max(1, int(transformer.exact_rows)) if exact else transformer.max_batch
        # generate() evaluates a prompt in chunks of max_batch; the same chunks keep the prefill's numbers
        self.prefill_chunk = min(prefill_chunk or transformer.max_batch, transformer.max_batch)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> Sequence:
        """Queue a request (generate()'s arguments; speculation does not apply: decoding is batched instead)."""
        from ondevice.runtime.model import GenerationStats

        request = self.model.prepare(prompt, **kwargs)
        n = len(request.tokens)
        if n > self.model.n_ctx and request.shift_keep is None:
            raise ContextOverflowError(f"{n} tokens do not fit in the context window of {self.model.n_ctx}; "
                                       "shorten the prompt or load the model with a larger n_ctx")
        if hasattr(request.token_filter, "start_budget"):
            request.token_filter.start_budget(request.max_tokens)
        seq = Sequence(request, GenerationStats(prompt_tokens=n))
        if request.max_tokens == 0:
            seq.stats.finish_reason = "length"
            seq.done = True
        else:
            self._waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End a reply now (a client went away); its slot is free for the next step."""
        if seq.done:
            return
        seq.stats.finish_reason = seq.stats.finish_reason or "stopped"
        if seq in self._waiting:
            self._waiting.remove(seq)
            seq.done = True
        else:
            self._leave(seq)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.active)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def waiting(self) -> int:
        return len(self._waiting)

    def run(self) -> Iterator[tuple[Sequence, str]]:
        """Step until every submitted request is done; (sequence, text piece) as they come."""
        while self.busy:
            yield from self.step()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[tuple[Sequence, str]]:
        """Admit, evaluate one prompt chunk, decode one token of every reply; the (sequence, text) pieces."""
        self._steps += 1
        events: list[tuple[Sequence, str]] = []
        self._admit()
        self._prefill(events)
        self._decode(events)
        return events

    def _shortened(self, seq: Sequence) -> list[int]:
        """A context-shift prompt as its slot will hold it (ondevice.runtime.shift.shorten_prompt)."""
        slot, request = seq.slot, seq.request
        tokens, held = shorten_prompt(self.transformer, slot, self.slot_tokens[slot], self._dropped[slot],
                                      request.tokens, request.shift_keep, min(request.max_tokens, self.model.n_ctx // 4),
                                      self.model.n_ctx)
        if held is not self.slot_tokens[slot]:  # a new list: the prompt was shortened further, so the cache changed
            self.slot_tokens[slot] = held
            self._memo[slot] = None
        seq.dropped = len(request.tokens) - len(tokens)
        return tokens

    def _admit(self) -> None:
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            tokens = seq.request.tokens
            # the free slot holding the longest prefix of the prompt; else the one idle longest
            slot = max(self._free, key=lambda s: (common_prefix(self._dropped[s].conversation(self.slot_tokens[s]), tokens),
                                                  -self._last_used[s]))
            self._free.remove(slot)
            seq.slot = slot
            self.active.append(seq)
            if seq.request.shift_keep is not None:
                tokens = seq.request.tokens = self._shortened(seq)
            else:
                self._dropped[slot] = Dropped()
            common = common_prefix(self.slot_tokens[slot], tokens)
            # another slot (maybe busy: its first positions do not change) may hold more of the prompt: copy it
            source = max(self.slots, key=lambda s: common_prefix(self.slot_tokens[s], tokens))
            shared = common_prefix(self.slot_tokens[source], tokens)
            if shared > common:
                self.transformer.copy_prefix(source, slot, shared)
                self.slot_tokens[slot] = list(tokens[:shared])
                self._memo[slot] = self._memo[source]
                common = shared
            memo = self._memo[slot]
            if not (common >= len(tokens) and memo is not None and memo[0] == len(tokens)):
                common = min(common, len(tokens) - 1)  # evaluate at least one token to get logits
                self._memo[slot] = None
            del self.slot_tokens[slot][common:]
            seq.evaluated = common
            seq.stats.cached_tokens = common + seq.dropped

    def _prefill(self, events: list[tuple[Sequence, str]]) -> None:
        """Whole prompt chunks of newcomers, up to prefill_chunk rows (always at least one chunk)."""
        budget = self.prefill_chunk
        for seq in [s for s in self.active if s.prefilling]:
            while seq.prefilling:
                tokens, slot = seq.request.tokens, seq.slot
                n = min(self.prefill_chunk, len(tokens) - seq.evaluated)
                if n > budget and budget < self.prefill_chunk:
                    return
                if not seq.prefill_started:
                    seq.prefill_started = time.perf_counter()
                memo = self._memo[slot]
                if n == 0 and memo is not None:  # the same prompt as the slot's last one
                    logits = memo[1]
                else:
                    last = seq.evaluated + n == len(tokens)
                    out = self.transformer.forward_segments(
                        [(slot, np.asarray(tokens[seq.evaluated : seq.evaluated + n], np.int32), seq.evaluated)],
                        logits=last)
                    self.slot_tokens[slot].extend(tokens[seq.evaluated : seq.evaluated + n])
                    seq.evaluated += n
                    budget -= n
                    if not last:
                        continue
                    logits = out[0]
                    self._memo[slot] = (len(tokens), logits)
                self._start_decoding(seq, logits, events)
            if budget <= 0:
                return

    def _start_decoding(self, seq: Sequence, logits: np.ndarray, events: list[tuple[Sequence, str]]) -> None:
        from ondevice.runtime.model import Decoding
        from ondevice.runtime.text import StopMatcher

        request, model = seq.request, self.model
        seq.stats.prefill_s = time.perf_counter() - seq.prefill_started
        # with context shift the reply never stops for the window: the slot shifts instead
        n_ctx = model.n_ctx if request.shift_keep is None else sys.maxsize
        seq.decoding = Decoding(seq.stats, request.sampler, list(request.tokens), model.codec,
                                StopMatcher(request.stops), request.max_tokens, request.token_filter, n_ctx,
                                seq.submitted_at)
        self._take(seq, logits, events)

    def _take(self, seq: Sequence, logits: np.ndarray, events: list[tuple[Sequence, str]]) -> None:
        text, more = seq.decoding.take(logits)
        pieces = [text] if more else [text, seq.decoding.tail()]
        for piece in pieces:
            if piece:
                seq.pieces.append(piece)
                events.append((seq, piece))
                if self.on_piece is not None:
                    self.on_piece(seq, piece)
        if not more:
            self._leave(seq)

    def _decode(self, events: list[tuple[Sequence, str]]) -> None:
        ready = [s for s in self.active if s.decoding is not None]
        for first in range(0, len(ready), self.rows_per_pass):
            group = ready[first : first + self.rows_per_pass]
            segments = []
            for seq in group:
                if seq.request.shift_keep is not None and len(self.slot_tokens[seq.slot]) + 1 > self.model.n_ctx:
                    self._shift(seq)
                token = seq.decoding.history[-1]
                segments.append((seq.slot, np.asarray([token], np.int32), len(self.slot_tokens[seq.slot])))
            logits = self.transformer.forward_segments(segments)
            for seq, row in zip(group, logits, strict=True):
                self.slot_tokens[seq.slot].append(seq.decoding.history[-1])
                seq.stats.forward_passes += 1
                self._take(seq, row, events)

    def _shift(self, seq: Sequence) -> None:
        """The slot is full mid-reply: drop the older half of its tokens after the kept ones."""
        slot = seq.slot
        self.slot_tokens[slot] = shift_full_slot(self.transformer, slot, self.slot_tokens[slot], self._dropped[slot],
                                                 seq.request.shift_keep, self.model.n_ctx)
        self._memo[slot] = None

    def _leave(self, seq: Sequence) -> None:
        stats = seq.stats
        if stats.first_token_at:
            stats.decode_s = time.perf_counter() - stats.first_token_at
        seq.done = True
        if seq.slot is not None and seq in self.active:
            self.active.remove(seq)
            self._free.add(seq.slot)
            self._last_used[seq.slot] = self._steps
            if seq.decoding is None:  # cancelled mid-prompt: the slot holds what was evaluated, no memo
                self._memo[seq.slot] = None
