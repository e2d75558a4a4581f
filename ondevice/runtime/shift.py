"""Context shift of one KV cache slot, shared by generate() (slot 0) and the batch (its slots).

A slot holds `held`, the tokens whose K/V it keeps, in position order. With context shift the conversation it
stands for is held[:keep] + dropped + held[keep:]: what a shift left out forms one run right after the tokens it
always keeps (the system prompt). Both operations re-rotate cached keys (Transformer.shift) rather than recompute
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ondevice.runtime.transformer import ContextOverflowError


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Dropped:
    """The tokens a context shift left out of a slot's conversation, right after its first `keep` tokens."""

    keep: int = 0
    tokens: list[int] = field(default_factory=list)

    def conversation(self, held: list[int]) -> list[int]:
        return held[: self.keep] + self.tokens + held[self.keep :] if self.tokens else held


def shorten_prompt(transformer: Any, slot: int, held: list[int], dropped: Dropped, tokens: list[int], keep: int,
                   room: int, n_ctx: int) -> tuple[list[int], list[int]]:
    """(the prompt as the slot will hold it, the slot's held tokens after it). A continuation of the slot's
    conversation leaves out what the slot dropped; then, while fewer than `room` positions would be left, half of
    what follows the kept tokens goes: re-rotated in the cache where the slot holds it, else no longer held.
    `dropped` is updated in place."""
    if dropped.tokens and dropped.keep == keep and common_prefix(dropped.conversation(held), tokens) >= keep + len(
            dropped.tokens):  # the same conversation, continued
        tokens = tokens[:keep] + tokens[keep + len(dropped.tokens) :]
    else:
        dropped.tokens = []
    dropped.keep = keep
    while len(tokens) + room > n_ctx and len(tokens) > keep + 1:
        discard = max(1, (len(tokens) - keep) // 2)
        common = common_prefix(held, tokens)
        if common > keep + discard:  # re-rotate what is cached rather than recompute it
            transformer.shift(slot, keep, discard, common)
            held = held[:keep] + held[keep + discard : common]
        else:
            held = held[: min(common, keep)]
        dropped.tokens = dropped.tokens + tokens[keep : keep + discard]
        tokens = tokens[:keep] + tokens[keep + discard :]
    return tokens, held


def shift_full_slot(transformer: Any, slot: int, held: list[int], dropped: Dropped, keep: int,
                    n_ctx: int) -> list[int]:
    """The slot is full mid-reply: drop the older half of its tokens after the kept ones; the held tokens after."""
    discard = (len(held) - keep) // 2
    if discard < 1:
        raise ContextOverflowError(f"context shift keeps {keep} tokens of {n_ctx}: nothing left to drop")
    transformer.shift(slot, keep, discard, len(held))
    dropped.keep = keep
    dropped.tokens = dropped.tokens + held[keep : keep + discard]
    return held[:keep] + held[keep + discard :]
