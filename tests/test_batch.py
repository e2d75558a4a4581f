"""Batched decoding (ondevice.runtime.batch): a reply is the same alone or in a batch; slots stay isolated;
cancelled replies leave without disturbing the others; a shared prompt prefix is reused from a slot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ondevice
from ondevice.cli import main as cli
from ondevice.errors import OndeviceError
from ondevice.runtime.batch import Batch

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "One, two, three,",
           "def reverse(xs):", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batch") / "tiny-q8.gguf"
    assert cli(["convert", str(tiny_models["qwen2"]), "--to", "gguf", "--quant", "q8_0", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    return out


def alone_and_batched(model, prompts: list, **kwargs) -> tuple[list[str], list[str]]:
    alone = ["".join(model.generate(p, **kwargs)) for p in prompts]
    return alone, model.generate_many(prompts, parallel=4, **kwargs)


def test_tiny_batch_of_4_equals_alone(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=256) as model:
        # a repeat penalty and a stop string make the per-request state matter too
        alone, batched = alone_and_batched(model, PROMPTS, max_tokens=40, temperature=0, repeat_penalty=1.1)
        assert batched == alone
        assert any(alone)  # the random model says something
        # sampled replies with seeds: the same per-request random streams
        alone, batched = alone_and_batched(model, PROMPTS, max_tokens=30, temperature=0.9, seed=7)
        assert batched == alone


def assert_segments_equal_single_passes(model) -> None:
    """Rows of slots 1..3 in one pass: each row's logits equal its sequence's one-row pass, bit for bit."""
    t = model.transformer
    t.ensure_slots(4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.spec.vocab_size, 5 + 3 * s).astype(np.int32) for s in range(3)]
    for slot, tokens in enumerate(prompts, start=1):
        t.forward_segments([(slot, tokens[:-1], 0)], logits=False)
    together = t.forward_segments([(s, tokens[-1:], len(tokens) - 1) for s, tokens in enumerate(prompts, 1)])
    for slot, tokens in enumerate(prompts, start=1):
        single = t.forward_segments([(slot, tokens[-1:], len(tokens) - 1)])[0]
        np.testing.assert_array_equal(together[slot - 1], single)
        # and the same as the slot-0 path generate() uses
        np.testing.assert_array_equal(t.forward(tokens, 0), single)


def test_forward_segments_rows_equal_single_passes(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=128) as model:
        assert_segments_equal_single_passes(model)


def test_cancel_mid_batch_and_slot_reuse(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=256) as model:
        alone = ["".join(model.generate(p, max_tokens=30, temperature=0)) for p in PROMPTS[:3]]
        batch = Batch(model, 2)
        seqs = [batch.submit(p, max_tokens=30, temperature=0) for p in PROMPTS[:3]]
        batch.step()
        assert batch.waiting() == 1  # two slots: the third waits
        for _ in range(3):
            batch.step()
        assert not seqs[0].done
        batch.cancel(seqs[0])  # leaves mid-reply; the third joins in its slot
        assert seqs[0].done and seqs[0].stats.finish_reason == "stopped"
        for _ in batch.run():
            pass
        assert [s.text for s in seqs[1:]] == alone[1:]
        assert alone[0].startswith(seqs[0].text)


def test_prompt_cache_reuses_a_slot_prefix(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=256) as model:
        system = "You are a helpful assistant. " * 6
        batch = Batch(model, 2)
        first = batch.submit(system + "Hello", max_tokens=8, temperature=0)
        for _ in batch.run():
            pass
        second = batch.submit(system + "Goodbye", max_tokens=8, temperature=0)
        for _ in batch.run():
            pass
        shared = len(model.tokenize(system))
        assert shared - 2 <= second.stats.cached_tokens < second.stats.prompt_tokens
        assert first.stats.cached_tokens == 0
        # the same prompt again reuses everything, and the reply is unchanged
        again = batch.submit(system + "Goodbye", max_tokens=8, temperature=0)
        for _ in batch.run():
            pass
        assert again.stats.cached_tokens == again.stats.prompt_tokens and again.text == second.text
        assert second.text == "".join(model.generate(system + "Goodbye", max_tokens=8, temperature=0))
        # two at once: the newcomer copies the shared prefix from the busy slot, and its reply is unchanged
        batch = Batch(model, 2)
        busy = batch.submit(system + "Hello", max_tokens=8, temperature=0)
        batch.step()
        newcomer = batch.submit(system + "Goodbye", max_tokens=8, temperature=0)
        for _ in batch.run():
            pass
        assert busy.stats.cached_tokens == 0 and newcomer.stats.cached_tokens >= shared - 2
        assert newcomer.text == second.text and busy.text == first.text


def test_batch_errors(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=32) as model:
        with pytest.raises(OndeviceError, match="at least one slot"):
            Batch(model, 0)
        batch = Batch(model, 1)
        with pytest.raises(OndeviceError, match="context window"):
            batch.submit("word " * 100)
        assert batch.submit("hi", max_tokens=0).done


def test_smollm2_batch_of_4_equals_alone(smollm2):
    with ondevice.load(smollm2, threads=2, n_ctx=1024) as model:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        alone, batched = alone_and_batched(model, prompts, max_tokens=48, temperature=0, stop=["\n\n"])
        assert batched == alone
        # slot isolation: each reply is its own prompt's, none another's
        assert len(set(alone)) == len(alone)


def test_smollm2_structured_replies_in_a_batch_equal_alone(smollm2):
    """A json_schema per request in a batch: each reply parses and equals the one generate() gives (which drafts
    the grammar's forced tokens; the batch decodes them one by one)."""
    import json

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    with ondevice.load(smollm2, threads=2, n_ctx=1024) as model:
        prompts = [[{"role": "user", "content": f"Invent a person called {name} as JSON."}]
                   for name in ("Ann", "Bob", "Chen", "Dana")]
        alone, batched = alone_and_batched(model, prompts, max_tokens=40, temperature=0, json_schema=schema)
        assert batched == alone
        for reply in batched:
            assert set(json.loads(reply)) == {"name", "age"}
