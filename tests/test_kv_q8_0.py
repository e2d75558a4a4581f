"""The Q8_0 KV cache (load(kv_cache="q8_0"), --kv-cache q8_0): what is written equals ggml's Q8_0 quantization of
the same values; attention on it equals exact attention on the dequantized cache (every ISA, SIMD vs scalar) and
stays close to the unquantized one; slots stay isolated; a context shift re-rotates the quantized keys; the memory
figures come from the real bytes; bad types and head sizes are one-line errors.

Tolerances: attention on a q8_0 cache vs float64 attention on the same cache dequantized: rtol 1e-4, atol 2e-5
(float summation order only, as for f32 caches); SIMD vs scalar: 1e-5 of the output scale; vs the unquantized f32
cache (unit-normal K/V, |q| ~ 2): max |error| < 0.06 and mean < 0.006 (a Q8_0 half-step of V is ~0.014; K's
rounding moves the probabilities too)."""

from __future__ import annotations

from pathlib import Path

import kernel_ref as ref
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants
from test_batch import assert_segments_equal_single_passes
from test_context_shift import shift_checking_moves

import ondevice
from ondevice.bench.backends.ondevice_runtime import EndOfTextBan
from ondevice.cli import main as cli
from ondevice.errors import OndeviceError
from ondevice.quant.legacy import Q8_0
from ondevice.runtime.kv import KVCacheTypeError, check_kv_cache, kv_element_bytes, kv_row_bytes

K = pytest.importorskip("ondevice._kernels")
ISAS = ref.available_isas(K)


def q8_cache(values: np.ndarray) -> np.ndarray:
    """values [c, hkv, d] (as the model writes them, position-major) -> a Q8_0 cache [hkv, c, d/32*34]."""
    c, hkv, d = values.shape
    cache = np.zeros((hkv, c, d // 32 * 34), np.uint8)
    K.kv_store_q8_0(cache, np.ascontiguousarray(values, np.float32), 0)
    return cache


def dequantized(cache: np.ndarray) -> np.ndarray:
    return Q8_0().dequantize(cache, cache.shape[-1] // 34 * 32)


# ------------------------------------------------------------------ KV type round trip


@pytest.mark.parametrize("isa", ISAS)
def test_kv_store_equals_ggml_q8_0(isa):
    with ref.forced_isa(K, isa):
        check_kv_store_equals_ggml_q8_0()


def check_kv_store_equals_ggml_q8_0() -> None:
    rng = np.random.default_rng(1)
    hkv, c, d = 3, 40, 64
    values = (rng.standard_normal((c, hkv, d)) * rng.uniform(1e-3, 50, (c, hkv, 1))).astype(np.float32)
    values[3, 1, :32] = 0.0  # an all-zero block: d = 0, codes 0
    # exact halves after scaling (amax 127 -> d = 1): ggml rounds half away from zero, not to even
    values[4, 0, :32] = [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5] + [0.0] * 24
    cache = np.zeros((hkv, c + 5, d // 32 * 34), np.uint8)
    K.kv_store_q8_0(cache, values[:30], 0)
    K.kv_store_q8_0(cache, values[30:], 30)  # a second write appends at its positions
    as_rows = np.ascontiguousarray(values.transpose(1, 0, 2))  # [hkv, c, d]
    ggml = quants.quantize(as_rows, QT.Q8_0)  # gguf-py: ggml's reference quantize_row_q8_0
    np.testing.assert_array_equal(cache[:, :c], ggml)
    np.testing.assert_array_equal(cache[:, :c], Q8_0().quantize(as_rows))
    assert not cache[:, c:].any()  # nothing written past the rows
    assert cache[0, 4, 2:10].view(np.int8).tolist() == [127, 3, -3, 1, -1, 2, -2, 127]
    # and read back: the values ggml dequantizes
    np.testing.assert_array_equal(dequantized(cache[:, :c]), quants.dequantize(ggml, QT.Q8_0))
    assert np.abs(dequantized(cache[:, :c]) - as_rows).max() <= np.abs(as_rows).max() / 127 / 2 * 1.01


def test_kv_store_errors():
    cache = np.zeros((2, 8, 34), np.uint8)
    with pytest.raises(ValueError, match="multiple of 32|D % 32"):
        K.kv_store_q8_0(np.zeros((2, 8, 17), np.uint8), np.zeros((1, 2, 16), np.float32), 0)
    with pytest.raises(ValueError, match="do not fit"):
        K.kv_store_q8_0(cache, np.zeros((3, 2, 32), np.float32), 6)
    with pytest.raises(ValueError, match="cache"):
        K.kv_store_q8_0(np.zeros((3, 8, 34), np.uint8), np.zeros((1, 2, 32), np.float32), 0)


# ------------------------------------------------------------------ attention on a q8_0 cache


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("h", "hkv", "d"), [(9, 3, 64), (4, 4, 32), (8, 1, 128), (16, 1, 64), (4, 2, 256)])
def test_attention_q8_0(isa, h, hkv, d):
    with ref.forced_isa(K, isa):
        check_attention_q8_0(isa, h, hkv, d)


def check_attention_q8_0(isa: str, h: int, hkv: int, d: int) -> None:
    rng = np.random.default_rng(6)
    c = 300
    keys, values = rng.standard_normal((2, c, hkv, d)).astype(np.float32)
    k_cache, v_cache = q8_cache(keys), q8_cache(values)
    k_exact, v_exact = dequantized(k_cache), dequantized(v_cache)
    for m, pos0 in [(1, 0), (1, 200), (7, 0), (20, 5), (37, 263)]:
        q = (rng.standard_normal((m, h, d)) * 2).astype(np.float32)
        out = np.empty((m, h * d), np.float32)
        K.attention(out, q, k_cache, v_cache, pos0, 1 / np.sqrt(d))
        np.testing.assert_allclose(out, ref.attention(q, k_exact, v_exact, pos0, 1 / np.sqrt(d)), rtol=1e-4, atol=2e-5)
        unquantized = ref.attention(q, keys.transpose(1, 0, 2), values.transpose(1, 0, 2), pos0, 1 / np.sqrt(d))
        err = np.abs(out - unquantized)
        assert err.max() < 0.06 and err.mean() < 0.006  # seen: max 0.044, mean 0.0046
        if isa != "scalar":  # the SIMD path against the scalar reference
            scalar = np.empty_like(out)
            with ref.forced_isa(K, "scalar"):
                K.attention(scalar, q, k_cache, v_cache, pos0, 1 / np.sqrt(d))
            np.testing.assert_allclose(out, scalar, rtol=0, atol=1e-5 * max(1.0, float(np.abs(scalar).max())))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("h", "hkv"), [(9, 3), (4, 1), (16, 8)])
def test_decode_step_split_over_keys(isa, h, hkv):
    """One query row with many keys runs as key ranges combined by their maxima and sums (2 threads): the same
    attention as one pass, to float order."""
    rng = np.random.default_rng(9)
    c, d = 2100, 64
    keys, values = rng.standard_normal((2, c, hkv, d)).astype(np.float32)
    k_cache, v_cache = q8_cache(keys), q8_cache(values)
    with ref.forced_isa(K, isa):
        for pos0 in (511, 512, 1337, 2099):
            q = (rng.standard_normal((1, h, d)) * 2).astype(np.float32)
            outs, before = [], K.get_threads()
            for threads in (2, 1):  # split, then whole
                K.set_threads(threads)
                outs.append(np.empty((1, h * d), np.float32))
                K.attention(outs[-1], q, k_cache, v_cache, pos0, 0.125)
            K.set_threads(before)
            expected = ref.attention(q, dequantized(k_cache), dequantized(v_cache), pos0, 0.125)
            np.testing.assert_allclose(outs[0], expected, rtol=1e-4, atol=2e-5)
            np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_sliding_window_attention_q8_0(isa):
    with ref.forced_isa(K, isa):
        check_sliding_window_attention_q8_0()


def check_sliding_window_attention_q8_0() -> None:
    rng = np.random.default_rng(16)
    h, hkv, d, c = 4, 2, 32, 120
    keys, values = rng.standard_normal((2, c, hkv, d)).astype(np.float32)
    k_cache, v_cache = q8_cache(keys), q8_cache(values)
    for m, pos0, window in [(1, 100, 8), (30, 0, 8), (40, 70, 50)]:
        q = (rng.standard_normal((m, h, d)) * 2).astype(np.float32)
        out = np.empty((m, h * d), np.float32)
        K.attention(out, q, k_cache, v_cache, pos0, 0.2, window)
        expected = ref.attention(q, dequantized(k_cache), dequantized(v_cache), pos0, 0.2, window)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=2e-5)


def test_attention_q8_0_errors():
    q = np.zeros((1, 2, 48), np.float32)
    bad = np.zeros((1, 4, 48 // 32 * 34), np.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.attention(np.empty((1, 96), np.float32), q, bad, bad, 0, 0.1)
    q = np.zeros((1, 2, 64), np.float32)
    with pytest.raises(ValueError, match="float32, float16 or uint8"):
        K.attention(np.empty((1, 128), np.float32), q, np.zeros((1, 4, 68), np.uint8), np.zeros((1, 4, 64), np.float16),
                    0, 0.1)
    with pytest.raises(ValueError, match="shape"):
        K.attention(np.empty((1, 128), np.float32), q, np.zeros((1, 4, 64), np.uint8), np.zeros((1, 4, 64), np.uint8),
                    0, 0.1)


# ------------------------------------------------------------------ in a model


@pytest.fixture(scope="module")
def llama32(tmp_path_factory) -> Path:
    """A tiny llama (interleaved RoPE) with head size 32, the smallest a q8_0 cache takes."""
    pytest.importorskip("torch")
    from tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("kvq8")
    source = make_tiny_model(folder / "hf", "llama", hidden=128, heads=4, kv_heads=2, seed=11)
    out = folder / "llama32.gguf"
    assert cli(["convert", str(source), "--to", "gguf", "--quant", "q8_0", "-o", str(out), "--no-progress",
                "--pre", "gpt-2"]) == 0
    return out


@pytest.fixture(scope="module")
def qwen3(tiny_models, tmp_path_factory) -> Path:  # NEOX RoPE, head size 32
    out = tmp_path_factory.mktemp("kvq8-qwen3") / "qwen3.gguf"
    assert cli(["convert", str(tiny_models["qwen3"]), "--to", "gguf", "--quant", "q8_0", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    return out


def test_memory_is_the_real_bytes(llama32):
    with ondevice.load(llama32, n_ctx=64, kv_cache="q8_0") as q8, ondevice.load(llama32, n_ctx=64) as f16:
        spec = q8.spec
        assert q8.transformer.k_cache.dtype == np.uint8 and q8.transformer.k_cache.shape[-1] == 34
        assert q8.kv_bytes_per_position == 2 * spec.n_layers * spec.n_kv_heads * kv_row_bytes("q8_0", 32)
        assert q8.kv_bytes_per_position * 2 * 32 == f16.kv_bytes_per_position * 34  # 34/64 of f16
    assert kv_element_bytes("q8_0") == 34 / 32 and kv_element_bytes("f16") == 2


def test_key_rotation_is_orthonormal_and_keeps_dot_products():
    from ondevice.runtime.transformer import block_hadamard, rotate_heads

    h = block_hadamard(96)  # 3 blocks of 32
    np.testing.assert_allclose(h @ h, np.eye(96), atol=1e-6)
    assert np.count_nonzero(h[:32, 32:]) == 0  # block-diagonal: each Q8_0 block rotated on its own
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((5, 4, 96)).astype(np.float32), rng.standard_normal((5, 4, 96)).astype(np.float32)
    rq, rk = rotate_heads(q, h), rotate_heads(k, h)
    np.testing.assert_allclose((rq * rk).sum(-1), (q * k).sum(-1), rtol=1e-5, atol=1e-5)
    outlier = np.zeros((1, 1, 96), np.float32)
    outlier[0, 0, 5] = 10.0  # one large channel is spread over its block
    assert np.abs(rotate_heads(outlier, h)[0, 0, :32]).max() < 2


def test_logits_close_to_f16_cache(llama32):
    tokens = np.random.default_rng(3).integers(0, 300, 60).astype(np.int32)
    with ondevice.load(llama32, n_ctx=64, kv_cache="q8_0") as q8, ondevice.load(llama32, n_ctx=64) as f16:
        a, b = q8.transformer.forward(tokens, 0, all_logits=True), f16.transformer.forward(tokens, 0, all_logits=True)
    pa, pb = (np.exp(x - x.max(-1, keepdims=True)) for x in (a.astype(np.float64), b.astype(np.float64)))
    pa, pb = pa / pa.sum(-1, keepdims=True), pb / pb.sum(-1, keepdims=True)
    kl = float(np.mean(np.sum(pb * (np.log(pb) - np.log(pa)), axis=-1)))
    assert 0 < kl < 1e-3, kl  # quantized (not identical), and close


def test_slots_stay_isolated(qwen3):
    """Rows of several q8_0 slots in one pass equal each slot's own pass, bit for bit, and a batch of replies
    equals the replies alone."""
    with ondevice.load(qwen3, threads=2, n_ctx=128, kv_cache="q8_0") as model:
        assert_segments_equal_single_passes(model)
        texts = ["The capital of France is", "One, two, three,", "Why is the sky blue?", "def f(x):"]
        alone = ["".join(model.generate(p, max_tokens=24, temperature=0)) for p in texts]
        assert model.generate_many(texts, parallel=4, max_tokens=24, temperature=0) == alone


@pytest.mark.parametrize("which", ["llama32", "qwen3"])  # interleaved and NEOX RoPE
def test_shift_of_a_q8_0_cache(request, which):
    """Shifted keys are the old ones dequantized, re-rotated and quantized again (values move as bytes); against
    recomputation, layer 0's shifted keys (they depend on their token only) equal a fresh evaluation at the new
    positions to the Q8_0 roundings. Keys are stored Hadamard-rotated (key_rotation), so the roundings are bounded
    in L2 per head (an orthonormal rotation keeps a rounding's norm, not its largest element): each is at most
    half a step per element, sqrt(head_dim) / 2 steps in norm."""
    path = request.getfixturevalue(which)
    with ondevice.load(path, threads=2, n_ctx=128, kv_cache="q8_0") as model:
        t = model.transformer
        h, hd = t.key_rotation, model.spec.head_dim
        tokens = np.random.default_rng(1).integers(0, model.spec.vocab_size, 60).astype(np.int32)
        keep, discard = 8, 20
        before_k = shift_checking_moves(t, tokens, keep, discard)  # values move as bytes

        def close(a: np.ndarray, b: np.ndarray, roundings: float) -> bool:
            step = np.abs(b).max(axis=-1) / 127
            return bool((np.linalg.norm(a - b, axis=-1) <= roundings * np.sqrt(hd) / 2 * step + 1e-5).all())

        for layer in range(model.spec.n_layers):  # rotating back by +discard gives the old keys
            moved = np.ascontiguousarray((dequantized(t.k_cache[layer, :, keep:40]) @ h).transpose(1, 0, 2))
            K.rope(moved, np.full(len(moved), discard, np.int32), model.spec.layer_rope_theta(layer), t.neox)
            old = dequantized(before_k[layer, :, keep + discard : 60]) @ h
            assert close(moved.transpose(1, 0, 2), old, 1.5)
        kept = np.concatenate([tokens[:keep], tokens[keep + discard :]])
        shifted_k0 = dequantized(t.k_cache[0, :, :40])
        model.reset()
        t.forward(kept, 0)
        fresh = dequantized(t.k_cache[0, :, :40])
        assert close(shifted_k0, fresh, 3)
        # and a chat past the window keeps answering on the shifted q8_0 cache
        prompt = [{"role": "user", "content": "Count to a thousand."}]
        model.reset()
        no_eos = EndOfTextBan(model.spec.vocab_size, set(model.codec.eos_ids))
        "".join(model.generate(prompt, max_tokens=200, temperature=0, context_shift=True, token_filter=no_eos))
        assert model.last_stats.finish_reason == "length" and model.last_stats.generated_tokens == 200
        assert len(model._cached) <= model.n_ctx


# ------------------------------------------------------------------ errors


def test_bad_kv_cache_type_is_one_line(llama32, capsys):
    with pytest.raises(KVCacheTypeError, match="one of f16, f32, q8_0"):
        check_kv_cache("q4")
    assert cli(["run", str(llama32), "--kv-cache", "q4", "-p", "hi", "-n", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "ondevice: error: KV cache type must be one of f16, f32, q8_0, got 'q4'"


def test_head_size_not_a_multiple_of_32_is_one_line(tiny_models, tmp_path, capsys):
    out = tmp_path / "llama16.gguf"  # the tiny llama's head size is 16
    assert cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "q8_0", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    capsys.readouterr()
    assert cli(["run", str(out), "--kv-cache", "q8_0", "-p", "hi", "-n", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "multiple of 32" in err and "is 16: use --kv-cache f16" in err


# ------------------------------------------------------------------ fit, bench and eval take the real bytes


def test_fit_bench_and_eval_take_the_q8_0_bytes(llama32, tmp_path, capsys):
    import json

    from ondevice.bench.artifacts import describe_artifact
    from ondevice.bench.backends import backend_class
    from ondevice.bench.evaluate import _load
    from ondevice.bench.runner import plan_jobs

    with ondevice.load(llama32, n_ctx=64, kv_cache="q8_0") as model:
        real = model.kv_bytes_per_position
    shape = describe_artifact(llama32).shape
    assert shape.kv_bytes_per_position(backend_class("ondevice").kv_bytes_for("q8_0")) == real
    assert backend_class("llama.cpp").kv_bytes_for("q8_0") == 34 / 32
    db = str(tmp_path / "none.db")
    assert cli(["fit", str(llama32), "--device", "iphone-15-pro", "--db", db, "--json", "--ctx", "1000",
                "--kv-cache", "q8_0", "--backend", "ondevice,llama.cpp,onnxruntime"]) == 0
    rows = {b["backend"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert rows["ondevice"]["kv_cache_bytes"] == rows["llama.cpp"]["kv_cache_bytes"] == real * 1000
    assert rows["ondevice"]["kv_cache"] == "q8_0"
    assert rows["onnxruntime"]["kv_cache"] is None  # keeps its own float32 cache: its own figure
    assert rows["onnxruntime"]["kv_bytes_per_position"] == shape.kv_bytes_per_position(4)
    assert cli(["fit", str(llama32), "--device", "iphone-15-pro", "--db", db, "--kv-cache", "q4"]) == 1
    assert capsys.readouterr().err.strip() == "ondevice: error: KV cache type must be one of f16, f32, q8_0, got 'q4'"
    # bench: one job per cache type for the backends that take one, a note for the others
    artifact = describe_artifact(llama32)
    jobs, notes = plan_jobs([artifact], ["ondevice", "onnxruntime"], threads=[2], prompts=[16], gen_tokens=4,
                            repeat=1, warmup=0, kv_caches=["f16", "q8_0"])
    assert [(j.backend, j.settings.kv_cache) for j in jobs] == [("ondevice", "f16"), ("ondevice", "q8_0")]
    assert "kv-q8_0" in jobs[1].describe() and any("onnxruntime" in n for n in notes)
    # eval: the backend is loaded with the cache asked for; a backend without that choice says so in one line
    backend = _load("ondevice", artifact, 2, 64, "q8_0")
    try:
        assert backend.model.transformer.kv_cache_type == "q8_0"
    finally:
        backend.close()
    with pytest.raises(OndeviceError, match="the onnxruntime backend keeps its own cache"):
        _load("onnxruntime", artifact, 2, 64, "q8_0")
