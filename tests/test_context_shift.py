"""Context shift (generate(context_shift=True), --context-shift): a chat that outgrows n_ctx keeps answering; the
shifted keys are the old ones re-rotated to their new positions; later turns reuse the shifted cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import ondevice
from ondevice.bench.backends.ondevice_runtime import EndOfTextBan
from ondevice.cli import main as cli
from ondevice.runtime.transformer import ContextOverflowError, kernels


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shift") / "tiny.gguf"
    assert cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "q8_0", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    return out


def NoEndOfText(model) -> EndOfTextBan:  # noqa: N802 - reads as the filter it makes
    return EndOfTextBan(model.spec.vocab_size, set(model.codec.eos_ids))


def shift_checking_moves(t, tokens: np.ndarray, keep: int, discard: int) -> np.ndarray:
    """Evaluate tokens in slot 0 and shift: the kept keys stay and the later values move, byte for byte. Returns
    the keys from before the shift."""
    n = len(tokens)
    t.forward(tokens, 0)
    before_k, before_v = t.k_cache[:, :, :n].copy(), t.v_cache[:, :, :n].copy()
    t.shift(0, keep, discard, n)
    np.testing.assert_array_equal(t.k_cache[:, :, :keep], before_k[:, :, :keep])
    np.testing.assert_array_equal(t.v_cache[:, :, keep : n - discard], before_v[:, :, keep + discard : n])
    return before_k


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3"])  # interleaved, NEOX, and frequency factors
def test_shift_rerotates_keys_and_moves_values(tiny_models, tmp_path, arch):
    out = tmp_path / f"{arch}.gguf"
    assert cli(["convert", str(tiny_models[arch]), "--to", "gguf", "--quant", "f32", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    with ondevice.load(out, threads=2, n_ctx=128, kv_cache="f32") as model:
        t = model.transformer
        tokens = np.random.default_rng(1).integers(0, model.spec.vocab_size, 60).astype(np.int32)
        keep, discard = 8, 20
        before_k = shift_checking_moves(t, tokens, keep, discard)
        # rotating a shifted key forward by `discard` with the kernels' own RoPE gives back the original key
        K = kernels()
        for layer in range(model.spec.n_layers):
            moved = np.ascontiguousarray(t.k_cache[layer, :, keep:40].transpose(1, 0, 2))
            theta, factors = model.spec.layer_rope_theta(layer), t.freq_factors[layer]
            positions = np.full(len(moved), discard, np.int32)
            if factors is None:
                K.rope(moved, positions, theta, t.neox)
            else:
                K.rope(moved, positions, theta, t.neox, factors)
            np.testing.assert_allclose(moved.transpose(1, 0, 2), before_k[layer, :, keep + discard : 60],
                                       rtol=1e-4, atol=1e-5)
        # layer 0's keys depend on their token only: the shifted ones equal a fresh evaluation at the new positions
        kept = np.concatenate([tokens[:keep], tokens[keep + discard :]])
        shifted_k0 = t.k_cache[0, :, :40].copy()
        model.reset()
        t.forward(kept, 0)
        np.testing.assert_allclose(shifted_k0, t.k_cache[0, :, :40], rtol=1e-4, atol=1e-5)


def test_long_chat_keeps_answering_and_reuses_the_shifted_cache(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=128) as model:
        messages = [{"role": "system", "content": "You are terse."}]
        for turn in range(3):
            messages += [{"role": "user", "content": f"Question number {turn}: tell me more"},
                         {"role": "assistant", "content": "Sure, here is more. " * 4}]
        with pytest.raises(ContextOverflowError, match="--context-shift"):
            "".join(model.generate(messages + [{"role": "user", "content": "x " * 100}], max_tokens=4))
        evaluated = []
        for turn in range(30):
            messages.append({"role": "user", "content": f"Question number {turn}: tell me more"})
            reply = "".join(model.generate(messages, max_tokens=12, temperature=0, context_shift=True,
                                           token_filter=NoEndOfText(model)))
            stats = model.last_stats
            assert stats.generated_tokens == 12 and reply
            evaluated.append(stats.prompt_tokens - stats.cached_tokens)
            messages.append({"role": "assistant", "content": reply})
        assert model.last_stats.prompt_tokens > 3 * model.n_ctx  # the conversation is far past the window
        # each turn evaluates about its new tokens, not the conversation: the cost does not grow with the turns
        assert max(evaluated[-10:]) <= max(evaluated[:10]) + 40, evaluated
        print("evaluated per turn", evaluated)
        system = model.prompt_tokens(messages[:1])
        assert model._cached[:10] == system[:10]  # the system prompt stayed


def test_reply_past_the_window_continues(tiny_gguf):
    with ondevice.load(tiny_gguf, threads=2, n_ctx=64) as model:
        prompt = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "Count to a thousand."}]
        "".join(model.generate(prompt, max_tokens=200, temperature=0, token_filter=NoEndOfText(model)))
        assert model.last_stats.finish_reason == "context"
        "".join(model.generate(prompt, max_tokens=200, temperature=0, token_filter=NoEndOfText(model),
                               context_shift=True))
        assert model.last_stats.finish_reason == "length" and model.last_stats.generated_tokens == 200
        assert len(model._cached) <= model.n_ctx


def test_smollm2_50_turn_chat_at_512(smollm2):
    with ondevice.load(smollm2, threads=2, n_ctx=512) as model:
        messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
        seconds, evaluated = [], []
        for turn in range(50):
            messages.append({"role": "user", "content": f"Give me a fact about the number {turn + 1}."})
            start = time.perf_counter()
            reply = "".join(model.generate(messages, max_tokens=24, temperature=0, context_shift=True))
            seconds.append(time.perf_counter() - start)
            stats = model.last_stats
            evaluated.append(stats.prompt_tokens - stats.cached_tokens)
            assert reply.strip(), turn
            messages.append({"role": "assistant", "content": reply})
        assert model.last_stats.prompt_tokens > 2 * 512
        assert max(evaluated[-10:]) <= max(evaluated[:10]) + 64, evaluated
        print(f"50 turns at n_ctx 512: median s/turn first 10 {np.median(seconds[:10]):.3f}, "
              f"last 10 {np.median(seconds[-10:]):.3f}; evaluated tokens/turn {evaluated}")


def test_server_context_shift(tiny_gguf):
    import http.client
    import json
    import threading

    from ondevice.server import Limits, create_server

    long_prompt = "word " * 200  # past the window of 128
    with ondevice.load(tiny_gguf, threads=2, n_ctx=128) as model:
        for shift, expected, parallel in ((False, 400, 1), (True, 200, 1), (True, 200, 2)):
            srv = create_server(model, "127.0.0.1", 0, limits=Limits(max_tokens=16, context_shift=shift),
                                parallel=parallel)
            thread = threading.Thread(target=srv.serve_forever, daemon=True)
            thread.start()
            try:
                conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
                conn.request("POST", "/v1/completions", json.dumps({"prompt": long_prompt, "max_tokens": 8}),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = json.loads(resp.read())
                assert resp.status == expected, body
                if shift:
                    assert body["usage"]["prompt_tokens"] > 128
                else:
                    assert body["error"]["code"] == "context_length_exceeded"
            finally:
                srv.close()
                thread.join(5)


def _batch_chats(model, ids: list[int], turns: int, slots: int) -> tuple[list[list[str]], list]:
    """Conversations (one per id) each grow by one user turn and its reply per round, all of them in one Batch."""
    from ondevice.runtime.batch import Batch

    batch = Batch(model, slots)
    conversations = [[{"role": "system", "content": f"You are terse, number {c}."}] for c in ids]
    replies: list[list[str]] = [[] for _ in ids]
    stats = []
    for turn in range(turns):
        seqs = []
        for c, messages in zip(ids, conversations, strict=True):
            messages.append({"role": "user", "content": f"Conversation {c}, question {turn}: tell me more"})
            seqs.append(batch.submit(messages, max_tokens=20 + 7 * c, temperature=0, context_shift=True,
                                     token_filter=NoEndOfText(model)))
        for _ in batch.run():
            pass
        for i, (c, messages, seq) in enumerate(zip(ids, conversations, seqs, strict=True)):
            assert seq.stats.generated_tokens == 20 + 7 * c and seq.text, (turn, c)
            messages.append({"role": "assistant", "content": seq.text})
            replies[i].append(seq.text)
            stats.append(seq.stats)
    return replies, stats


def test_context_shift_in_a_batch_keeps_answering_and_each_slot_its_own(tiny_gguf):
    """Two conversations far past the window in one batch: every turn answers, each slot's shifts (of the prompt
    and mid-reply, keys re-rotated) leave the other's reply unchanged: the same as in a batch of its own."""
    with ondevice.load(tiny_gguf, threads=2, n_ctx=96) as model:
        together, stats = _batch_chats(model, [0, 1], 14, slots=2)
        alone, _ = _batch_chats(model, [1], 14, slots=1)
        assert together[1] == alone[0]
        assert max(s.prompt_tokens for s in stats) > 3 * model.n_ctx  # far past the window
        # the later turns reuse the shifted cache: they evaluate about their new tokens, not the conversation
        evaluated = [s.prompt_tokens - s.cached_tokens for s in stats]
        assert max(evaluated[-8:]) <= max(evaluated[:8]) + 40, evaluated
        print("evaluated per turn (2 conversations)", evaluated)
