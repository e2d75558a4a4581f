"""The GGUF reader/writer: round trip, and hostile files rejected cleanly (seeded mutation fuzzing)."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from ondevice.errors import InvalidModelError, OndeviceError, OutputExistsError
from ondevice.formats.gguf import GGUFFile, PlannedTensor, TypedValue, ValueType, write_gguf


def small_gguf(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((4, 64)).astype(np.float32),
              "b.weight": rng.standard_normal((8, 32)).astype(np.float16)}
    fields = {
        "general.architecture": TypedValue(ValueType.STRING, "llama"),
        "x.count": TypedValue(ValueType.UINT32, 7),
        "x.eps": TypedValue(ValueType.FLOAT32, 1e-5),
        "x.flag": TypedValue(ValueType.BOOL, True),
        "x.words": TypedValue(ValueType.ARRAY, ["héllo", "wörld", ""], ValueType.STRING),
        "x.ids": TypedValue(ValueType.ARRAY, np.arange(5, dtype=np.int32), ValueType.INT32),
    }
    planned = [PlannedTensor("a.weight", (4, 64), 0, lambda: arrays["a.weight"]),
               PlannedTensor("b.weight", (8, 32), 1, lambda: arrays["b.weight"])]
    write_gguf(path, fields, planned)
    return arrays


def test_round_trip_and_gguf_py_agrees(tmp_path):
    path = tmp_path / "t.gguf"
    arrays = small_gguf(path)
    with GGUFFile(path) as f:
        assert f.get("x.count") == 7 and f.get("x.flag") is True
        assert f.get("x.words") == ["héllo", "wörld", ""]
        assert list(f.get("x.ids")) == [0, 1, 2, 3, 4]
        assert f.tensors["a.weight"].shape == (4, 64)
        np.testing.assert_array_equal(f.tensor_data("a.weight").view(np.float32), arrays["a.weight"])
        np.testing.assert_array_equal(f.tensor_data("b.weight").view(np.float16), arrays["b.weight"])
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(np.asarray(by_name["a.weight"].data), arrays["a.weight"])


def test_existing_output_needs_force(tmp_path):
    path = tmp_path / "t.gguf"
    small_gguf(path)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        small_gguf(path)
    assert path.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "t.gguf"

    def boom():
        raise InvalidModelError("synthetic failure mid-write")

    with pytest.raises(InvalidModelError):
        write_gguf(path, {}, [PlannedTensor("a", (32,), 0, boom)])
    assert list(tmp_path.iterdir()) == []


def _mutations(data: bytes, rng: random.Random, count: int):
    header_end = min(len(data), 600)
    for _ in range(count):
        buf = bytearray(data)
        kind = rng.randrange(5)
        if kind == 0:  # truncate
            yield bytes(buf[: rng.randrange(len(buf))])
            continue
        if kind == 1:  # random byte flips in the header region
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        elif kind == 2:  # an absurd u64 somewhere in the header (counts, lengths, dims, offsets)
            pos = rng.randrange(header_end - 8)
            buf[pos : pos + 8] = struct.pack("<Q", rng.choice([2**63 - 1, 2**64 - 1, 2**40, 2**32 + 1]))
        elif kind == 3:  # a u32 type or count overwritten
            pos = rng.randrange(header_end - 4)
            buf[pos : pos + 4] = struct.pack("<I", rng.choice([9, 13, 255, 2**31, 0xFFFFFFFF]))
        else:  # random bytes anywhere
            for _ in range(rng.randint(1, 32)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        yield bytes(buf)


def _check_hostile(path: Path, opener) -> str:
    start = time.perf_counter()
    try:
        obj = opener(path)
    except OndeviceError as exc:
        assert "\n" not in str(exc)
        outcome = "rejected"
    else:
        outcome = "accepted"
        close = getattr(obj, "close", None)
        close() if close else None
    assert time.perf_counter() - start < 5, "parsing a hostile file must not hang"
    return outcome


def test_fuzz_reader_rejects_hostile_files_cleanly(tmp_path):
    original = tmp_path / "orig.gguf"
    small_gguf(original)
    data = original.read_bytes()
    rng = random.Random(1234)
    outcomes = {"rejected": 0, "accepted": 0}
    target = tmp_path / "mut.gguf"
    for mutated in _mutations(data, rng, 1500):
        target.write_bytes(mutated)
        outcome = _check_hostile(target, GGUFFile)
        if outcome == "accepted":
            with GGUFFile(target) as f:  # every accepted tensor must be readable in bounds
                for name in f.tensors:
                    f.tensor_data(name).sum()
        outcomes[outcome] += 1
    assert outcomes["rejected"] > 500


def test_fuzz_model_loader_on_real_model_header(tiny_models, tmp_path):
    """Mutations of a complete tiny model must be rejected by the model loader with a one-line error."""
    from ondevice.cli import main as cli
    from ondevice.sources.gguf import open_gguf_file

    original = tmp_path / "m.gguf"
    assert cli(["convert", str(tiny_models["qwen2"]), "--to", "gguf", "--quant", "q8_0", "-o", str(original),
                "--pre", "gpt-2", "--no-progress"]) == 0
    data = original.read_bytes()
    rng = random.Random(99)
    target = tmp_path / "mut.gguf"
    for mutated in _mutations(data, rng, 300):
        target.write_bytes(mutated)
        _check_hostile(target, open_gguf_file)


def _tiny_f32_gguf(tiny_models, tmp_path: Path) -> Path:
    from ondevice.cli import main as cli

    original = tmp_path / "m.gguf"
    assert cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "f32", "-o", str(original),
                "--pre", "gpt-2", "--no-progress"]) == 0
    return original


def _rewrite_gguf(original: Path, target: Path, changes: dict[str, TypedValue]) -> None:
    """A copy of `original` with some metadata replaced (the tensors kept as they are)."""
    with GGUFFile(original) as src:
        fields = dict(src.fields)
        blobs = {name: (info, np.array(src.tensor_data(name))) for name, info in src.tensors.items()}
    planned = [PlannedTensor(name, tuple(info.shape), info.ggml_type, lambda b=blob: b.tobytes())
               for name, (info, blob) in blobs.items()]
    write_gguf(target, {**fields, **changes}, planned, force=True)


def _openers():
    """load, inspect and open_source (what convert reads through): they must agree on every file."""
    import ondevice
    from ondevice.inspect import inspect_model
    from ondevice.sources import open_source

    return (lambda p: ondevice.load(p, n_ctx=64), inspect_model, open_source)


HOSTILE_VALUES = [
    TypedValue(ValueType.UINT32, 4294967295), TypedValue(ValueType.INT32, -1), TypedValue(ValueType.INT32, 0),
    TypedValue(ValueType.FLOAT32, float("nan")), TypedValue(ValueType.FLOAT32, float("inf")),
    TypedValue(ValueType.FLOAT32, -1.0), TypedValue(ValueType.UINT64, 10**18), TypedValue(ValueType.STRING, "64"),
    TypedValue(ValueType.BOOL, True), TypedValue(ValueType.ARRAY, np.arange(3, dtype=np.int32), ValueType.INT32),
    TypedValue(ValueType.UINT32, 63), TypedValue(ValueType.UINT32, 3),
]


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                                 "attention.head_count_kv", "attention.key_length", "context_length",
                                 "rope.freq_base", "vocab_size", "attention.layer_norm_rms_epsilon"])
def test_hostile_model_metadata_is_one_validation_everywhere(tiny_models, tmp_path, key):
    """NaN, negative, huge, wrong-typed or array metadata: load, inspect and convert agree, each either works or
    says what is wrong in one line (never another exception, never a table sized by a huge count)."""
    original = _tiny_f32_gguf(tiny_models, tmp_path)
    for index, value in enumerate(HOSTILE_VALUES):
        target = tmp_path / "mut.gguf"
        _rewrite_gguf(original, target, {f"llama.{key}": value})
        outcomes = []
        for opener in _openers():
            outcomes.append(_check_hostile(target, opener))
        assert len(set(outcomes)) == 1, (key, value, outcomes)
        huge_number = isinstance(value.value, int) and value.value > 10**6
        float_key = key in ("rope.freq_base", "attention.layer_norm_rms_epsilon")
        if index < len(HOSTILE_VALUES) - 2 and not (float_key and huge_number):  # the last two are plausible counts
            assert outcomes[0] == "rejected", (key, value)


def _flip_first_byte(text: str) -> str:
    raw = bytearray(text.encode("utf-8"))
    raw[0] ^= 1
    return raw.decode("utf-8")


@pytest.mark.parametrize("change", ["token-used-by-a-merge", "merge", "duplicate-token"])
def test_gguf_tokenizer_with_a_flipped_bit_is_one_line_everywhere(tiny_models, tmp_path, change):
    """A token string or merge one bit off makes `tokenizers` raise a bare Exception; load, inspect and convert
    all say instead, in one line naming the file, which token is wrong."""
    original = _tiny_f32_gguf(tiny_models, tmp_path)
    with GGUFFile(original) as f:
        tokens, merges = list(f.get("tokenizer.ggml.tokens")), list(f.get("tokenizer.ggml.merges"))
    used = tokens.index(merges[1].replace(" ", ""))  # the token merges[1] produces
    if change == "token-used-by-a-merge":
        tokens[used] = _flip_first_byte(tokens[used])
    elif change == "merge":
        merges[0] = _flip_first_byte(merges[0])
    else:
        tokens[used] = tokens[used - 1]
    target = tmp_path / "mut.gguf"
    _rewrite_gguf(original, target, {
        "tokenizer.ggml.tokens": TypedValue(ValueType.ARRAY, tokens, ValueType.STRING),
        "tokenizer.ggml.merges": TypedValue(ValueType.ARRAY, merges, ValueType.STRING)})
    messages = set()
    for opener in _openers():
        with pytest.raises(InvalidModelError) as exc:
            opener(target)
        messages.add(str(exc.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith(f"{target}: ") and "\n" not in message and " at line " not in message, message
    from ondevice.cli import main as cli

    assert cli(["convert", str(target), "--to", "gguf", "-o", str(tmp_path / "out.gguf"), "--no-progress"]) == 1
    assert not (tmp_path / "out.gguf").exists()


def test_fuzz_gguf_token_strings(tiny_models, tmp_path):
    """Seeded bit flips in the bytes of tokenizer.ggml.tokens of a real model file (renamed tokens, invalid UTF-8):
    load, inspect and open_source agree on every mutant, and reject it in one line."""
    original = _tiny_f32_gguf(tiny_models, tmp_path)
    data = original.read_bytes()
    start, end = data.index(b"tokenizer.ggml.tokens"), data.index(b"tokenizer.ggml.token_type")
    letters = [i for i in range(start + len(b"tokenizer.ggml.tokens") + 12, end) if chr(data[i]).isalpha()]
    rng = random.Random(5)
    target = tmp_path / "mut.gguf"
    rejected = 0
    for _ in range(30):
        mutated = bytearray(data)
        mutated[rng.choice(letters)] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(mutated))
        outcomes = {_check_hostile(target, opener) for opener in _openers()}
        assert len(outcomes) == 1, outcomes
        rejected += outcomes == {"rejected"}
    assert rejected >= 10, rejected
