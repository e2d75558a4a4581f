"""Importance matrices: the numpy reference's sums against an independent computation (transformers forward hooks
on the same float model), llama.cpp's GGUF and legacy .dat forms round-tripped and read by gguf-py, and hostile
files as one-line errors."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondevice.errors import InvalidModelError, OndeviceError
from ondevice.quant.imatrix import Imatrix, bundled_calibration_text, chunk_tokens, compute_imatrix

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("imatrix") / "llama", "llama", tie=True, seed=11)


def hook_sums(folder: Path, chunks: list[list[int]]) -> dict[str, np.ndarray]:
    """Sum of squared inputs of every linear of the blocks, from transformers' own forward pass (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def collect(_module, inputs):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        return collect

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(hook(name + ".weight"))
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]))
    return sums


def compare_with_hooks(folder: Path, ctx: int, n_chunks: int) -> float:
    from ondevice.architectures import get_architecture
    from ondevice.sources import open_source

    model = open_source(folder)
    try:
        chunks = chunk_tokens(model, bundled_calibration_text(), ctx, n_chunks)
        ours = compute_imatrix(model, chunks)
        arch = get_architecture(model.spec.arch)
    finally:
        model.close()
    theirs = hook_sums(folder, chunks)
    assert len(theirs) == len(ours.sums) == 7 * model.spec.n_layers
    worst = 0.0
    for hf_name, expected in theirs.items():
        name = arch.gguf_name(hf_name)
        assert ours.counts[name].tolist() == [ctx * n_chunks]
        got = ours.sums[name][0].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - expected) / (np.abs(expected) + 1e-3 * expected.max()))))
    return worst


def test_sums_match_transformers_hooks(tiny_llama):
    assert compare_with_hooks(tiny_llama, ctx=32, n_chunks=3) < 1e-4


@pytest.mark.slow
def test_sums_match_transformers_hooks_on_smollm2(smollm2, tmp_path):
    """The real model: its f32 reference folder, 2 chunks of 512 tokens; float32 forward passes in two orders of
    summation agree to 1e-4 (relative, per column, floored at 1e-3 of the tensor's largest column); measured
    1.2e-5."""
    folder = tmp_path / "smol-f32"
    subprocess.run([sys.executable, "-m", "ondevice", "convert", str(smollm2), "--to", "hf", "--quant", "f32", "-o",
                    str(folder), "--no-progress"], check=True, cwd=ROOT, capture_output=True)
    worst = compare_with_hooks(folder, ctx=512, n_chunks=2)
    print(f"\nSmolLM2 imatrix vs transformers hooks: worst relative difference {worst:.2e}")
    assert worst < 1e-4


def test_chunks_follow_llama_imatrix(tiny_llama):
    from ondevice.sources import open_source

    model = open_source(tiny_llama)
    try:
        chunks = chunk_tokens(model, bundled_calibration_text(), 64)
        assert all(len(c) == 64 for c in chunks) and len(chunks) > 3
        if model.special.add_bos:
            assert all(c[0] == model.special.bos_id for c in chunks)
        assert len(chunk_tokens(model, bundled_calibration_text(), 64, chunks=2)) == 2
        with pytest.raises(OndeviceError, match="fewer than one chunk"):
            chunk_tokens(model, "two words", 64)
    finally:
        model.close()


# ------------------------------------------------------------------------------------------------ file formats


def sample_imatrix() -> Imatrix:
    rng = np.random.default_rng(3)
    imatrix = Imatrix(datasets=["calibration.txt"], chunk_count=5, chunk_size=512)
    for i in range(3):
        for name, cols in (("attn_q", 64), ("ffn_down", 128)):
            key = f"blk.{i}.{name}.weight"
            imatrix.sums[key] = (rng.random((1, cols)) * 100).astype(np.float32)
            imatrix.counts[key] = np.array([2560], np.int64)
    return imatrix


def test_gguf_form_round_trips_and_is_llama_cpps_layout(tmp_path):
    gguf = pytest.importorskip("gguf")
    imatrix = sample_imatrix()
    path = tmp_path / "a.gguf"
    imatrix.save(path)
    back = Imatrix.load(path)
    assert back.datasets == ["calibration.txt"] and (back.chunk_count, back.chunk_size) == (5, 512)
    for name in imatrix.sums:
        assert np.array_equal(back.sums[name], imatrix.sums[name])
        assert back.counts[name].tolist() == [2560]
        np.testing.assert_array_equal(back.importance(name), imatrix.sums[name][0] / np.float32(2560))
    back.save(tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_bytes() == path.read_bytes()
    # What llama.cpp's loader reads: F32 <name>.in_sum2 (ne0 = columns, ne1 = matrices), <name>.counts (1, n_mat),
    # sorted names, the three imatrix.* keys and general.type = imatrix; ggml stores a dense entry's as 1-D.
    reader = gguf.GGUFReader(path)
    names = [t.name for t in reader.tensors]
    assert names == [f"{n}{s}" for n in sorted(imatrix.sums) for s in (".in_sum2", ".counts")]
    first = reader.tensors[0]
    assert first.tensor_type == gguf.GGMLQuantizationType.F32 and list(first.shape) == [64]
    assert list(reader.tensors[1].shape) == [1]
    fields = reader.fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == 5
    assert int(fields["imatrix.chunk_size"].parts[-1][0]) == 512
    assert bytes(fields["imatrix.datasets"].parts[-1]).decode() == "calibration.txt"


def test_legacy_dat_round_trips(tmp_path):
    imatrix = sample_imatrix()
    dat = tmp_path / "a.dat"
    imatrix.save(dat)
    data = dat.read_bytes()
    assert struct.unpack("<i", data[:4])[0] == 6
    back = Imatrix.load(dat)
    for name in imatrix.sums:
        # ncall = ceil(2560 / 512) = 5 calls; the values are sum / count * ncall: the importance is unchanged
        assert back.counts[name].tolist() == [5]
        np.testing.assert_allclose(back.importance(name), imatrix.importance(name), rtol=1e-6)
    assert back.chunk_count == 5 and back.datasets == ["calibration.txt"]
    back.save(tmp_path / "b.dat")
    assert (tmp_path / "b.dat").read_bytes() == data  # a legacy file read and written back is unchanged
    back.save(tmp_path / "c.gguf")  # and converts to the GGUF form
    np.testing.assert_allclose(Imatrix.load(tmp_path / "c.gguf").importance("blk.1.ffn_down.weight"),
                               imatrix.importance("blk.1.ffn_down.weight"), rtol=1e-6)


def hostile(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_hostile_files_are_one_line_errors(tmp_path):
    imatrix = sample_imatrix()
    good_dat, good_gguf = tmp_path / "good.dat", tmp_path / "good.gguf"
    imatrix.save(good_dat)
    imatrix.save(good_gguf)
    dat, gg = good_dat.read_bytes(), good_gguf.read_bytes()
    cases = {
        "truncated.dat": (dat[:40], "truncated"),
        "truncated.gguf": (gg[: len(gg) // 2], "truncated|past the end"),
        "empty.dat": (b"", "truncated"),
        "huge-count.dat": (struct.pack("<i", 1 << 30) + dat[4:], "claims"),
        "negative-name.dat": (dat[:4] + struct.pack("<i", -5) + dat[8:], "name of -5 bytes"),
        "stray.dat": (dat + b"xyz", "stray bytes|truncated"),
        "text.dat": (b"hello world, not an imatrix at all", "not an imatrix|not a valid"),
    }
    for name, (data, pattern) in cases.items():
        with pytest.raises(InvalidModelError, match=pattern) as err:
            Imatrix.load(hostile(tmp_path, name, data))
        assert "\n" not in str(err.value), name
    with pytest.raises(OndeviceError, match="no such file"):
        Imatrix.load(tmp_path / "missing.gguf")

    nan = sample_imatrix()
    nan.sums["blk.1.attn_q.weight"][0, 3] = np.nan
    nan.save(tmp_path / "nan.gguf")
    with pytest.raises(InvalidModelError, match=r"'blk\.1\.attn_q\.weight' has non-finite"):
        Imatrix.load(tmp_path / "nan.gguf")

    # a sums tensor without its counts (llama.cpp: "mismatched sums and counts")
    from ondevice.formats.gguf import GGUFFile, PlannedTensor, TypedValue, ValueType, write_gguf

    with GGUFFile(good_gguf) as f:
        fields = dict(f.fields)
        kept = [PlannedTensor(n, i.shape, 0, (lambda b: lambda: b)(bytes(f.tensor_data(n))))
                for n, i in f.tensors.items() if n != "blk.0.attn_q.weight.counts"]
        write_gguf(tmp_path / "orphan.gguf", fields, kept)
        write_gguf(tmp_path / "nometa.gguf", {"general.type": TypedValue(ValueType.STRING, "imatrix")}, kept)
    with pytest.raises(InvalidModelError, match=r"'blk\.0\.attn_q\.weight' has sums but no counts"):
        Imatrix.load(tmp_path / "orphan.gguf")
    with pytest.raises(InvalidModelError, match="without its metadata"):
        Imatrix.load(tmp_path / "nometa.gguf")


def test_model_checks(tmp_path):
    imatrix = sample_imatrix()
    columns = {f"blk.{i}.{n}.weight": c for i in range(3) for n, c in (("attn_q", 64), ("ffn_down", 128))}
    assert imatrix.check_model({**columns, "blk.0.attn_k.weight": 64}, "x") == ["blk.0.attn_k.weight"]
    with pytest.raises(InvalidModelError, match="another model"):
        imatrix.check_model({**columns, "blk.0.attn_q.weight": 96}, "x")
    with pytest.raises(InvalidModelError, match="no entry for any tensor"):
        imatrix.check_model({"blk.0.ffn_up.weight": 64}, "x")


def test_cli_writes_atomically_and_reports_json(tiny_llama, tmp_path):
    import json

    out = tmp_path / "tiny.imatrix.dat"
    run = subprocess.run([sys.executable, "-m", "ondevice", "imatrix", str(tiny_llama), "--ctx", "32", "--chunks",
                          "4", "-o", str(out), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["tokens"] == 128 and summary["chunks"] == 4 and summary["format"] == "dat"
    assert Imatrix.load(out).summary()["entries"] == summary["entries"] == 14
    again = subprocess.run([sys.executable, "-m", "ondevice", "imatrix", str(tiny_llama), "-o", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "--force" in again.stderr
    chat = subprocess.run([sys.executable, "-m", "ondevice", "imatrix", str(tiny_llama), "--chat", "--ctx", "32",
                           "--chunks", "2", "-o", str(tmp_path / "chat.gguf")], capture_output=True, text=True,
                          cwd=ROOT)
    assert chat.returncode == 0, chat.stderr
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def compare_with_llama_cpp(source: Path, tmp_path: Path, ctx: int, n_chunks: int, pre: str) -> float:
    """Our imatrix against llama-imatrix's collection (its cb_eval callback in llama.cpp's own forward pass over an
    f32 GGUF of the same weights, the same token chunks): worst relative difference per column."""
    from ondevice.bench.llama_cpp_tools import llama_cpp_imatrix
    from ondevice.sources import open_source

    f32 = tmp_path / "f32.gguf"
    subprocess.run([sys.executable, "-m", "ondevice", "convert", str(source), "--to", "gguf", "--quant", "f32", "-o",
                    str(f32), "--pre", pre, "--no-progress"], check=True, cwd=ROOT, capture_output=True)
    model = open_source(source)
    try:
        chunks = chunk_tokens(model, bundled_calibration_text(), ctx, n_chunks)
        ours = compute_imatrix(model, chunks)
    finally:
        model.close()
    theirs = llama_cpp_imatrix(f32, chunks)
    assert sorted(theirs.sums) == sorted(ours.sums)
    worst = 0.0
    for name, sums in theirs.sums.items():
        assert theirs.counts[name].tolist() == ours.counts[name].tolist() == [ctx * n_chunks]
        expected, got = sums[0].astype(np.float64), ours.sums[name][0].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - expected) / (np.abs(expected) + 1e-3 * expected.max()))))
    return worst


def test_sums_match_llama_cpps_own_collection(tiny_llama, tmp_path):
    pytest.importorskip("llama_cpp")
    assert compare_with_llama_cpp(tiny_llama, tmp_path, ctx=32, n_chunks=3, pre="gpt-2") < 1e-4


@pytest.mark.slow
def test_sums_match_llama_cpps_own_collection_on_smollm2(smollm2, tmp_path):
    """SmolLM2, 2 chunks of 512 tokens, llama.cpp's forward pass on the f32 GGUF of the same weights: measured
    1.2e-5 (the same as against transformers: float32 summation orders)."""
    pytest.importorskip("llama_cpp")
    worst = compare_with_llama_cpp(smollm2, tmp_path, ctx=512, n_chunks=2, pre="smollm")
    print(f"\nSmolLM2 imatrix vs llama.cpp's collection: worst relative difference {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slow
def test_ctrl_c_leaves_nothing_behind(smollm2, tmp_path):
    import signal
    import time

    out = tmp_path / "smol.imatrix.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "ondevice", "imatrix", str(smollm2), "-o", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # inside the forward pass (the whole run takes minutes)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "nothing partial was left behind" in err
    assert list(tmp_path.iterdir()) == []


def test_we_read_a_file_ggml_writes_as_llama_imatrix_does(tmp_path):
    """save_imatrix()'s calls (gguf_init_empty, the imatrix.* keys, ggml_new_tensor_2d per entry, gguf_add_tensor,
    gguf_write_to_file) made on libggml-base through ctypes; Imatrix.load reads back the same values."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from ondevice.bench.llama_cpp_tools import _ggml_tensor_struct

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    lib.ggml_init.restype = lib.gguf_init_empty.restype = lib.ggml_new_tensor_2d.restype = ctypes.c_void_p
    lib.ggml_init.argtypes = [InitParams]
    lib.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_set_val_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.gguf_set_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.gguf_set_arr_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]
    lib.gguf_add_tensor.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.gguf_write_to_file.restype = ctypes.c_bool
    lib.gguf_write_to_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]
    lib.gguf_free.argtypes = lib.ggml_free.argtypes = [ctypes.c_void_p]

    expected = sample_imatrix()
    ctx = lib.ggml_init(InitParams(1 << 20, None, False))
    gguf_ctx = lib.gguf_init_empty()
    tensor_type = _ggml_tensor_struct()
    try:
        lib.gguf_set_val_str(gguf_ctx, b"general.type", b"imatrix")
        lib.gguf_set_arr_str(gguf_ctx, b"imatrix.datasets", (ctypes.c_char_p * 1)(b"calibration.txt"), 1)
        lib.gguf_set_val_u32(gguf_ctx, b"imatrix.chunk_count", 5)
        lib.gguf_set_val_u32(gguf_ctx, b"imatrix.chunk_size", 512)
        for name in sorted(expected.sums):
            for suffix, values in ((".in_sum2", expected.sums[name][0]), (".counts", np.array([2560], np.float32))):
                t = lib.ggml_new_tensor_2d(ctx, 0, values.size if suffix == ".in_sum2" else 1, 1)
                lib.ggml_set_name(t, (name + suffix).encode())
                ctypes.memmove(tensor_type.from_address(t).data, values.astype(np.float32).ctypes.data, 4 * values.size)
                lib.gguf_add_tensor(gguf_ctx, t)
        assert lib.gguf_write_to_file(gguf_ctx, str(tmp_path / "ggml.gguf").encode(), False)
    finally:
        lib.gguf_free(gguf_ctx)
        lib.ggml_free(ctx)
    back = Imatrix.load(tmp_path / "ggml.gguf")
    assert back.datasets == ["calibration.txt"] and (back.chunk_count, back.chunk_size) == (5, 512)
    for name, sums in expected.sums.items():
        assert np.array_equal(back.sums[name], sums) and back.counts[name].tolist() == [2560]
    expected.save(tmp_path / "ours.gguf")  # and ours is the same file, byte for byte
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ggml.gguf").read_bytes()


def test_ggml_reads_our_gguf_form_as_llama_cpps_loader_does(tmp_path):
    """ggml's own GGUF reader (libggml-base, through ctypes), walked as common_imatrix_load walks it: the three
    imatrix.* keys, and per entry an F32 <name>.in_sum2 of ne = (columns, 1) and <name>.counts of ne = (1, 1)
    holding our values."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from ondevice.bench.llama_cpp_tools import _ggml_tensor_struct

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_str.restype = ctypes.c_char_p
    lib.gguf_get_arr_str.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_get_first_tensor.restype = lib.ggml_get_next_tensor.restype = ctypes.c_void_p
    lib.ggml_get_first_tensor.argtypes = [ctypes.c_void_p]
    lib.ggml_get_next_tensor.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.gguf_free.argtypes = lib.ggml_free.argtypes = [ctypes.c_void_p]

    imatrix = sample_imatrix()
    path = tmp_path / "ours.gguf"
    imatrix.save(path)
    ggml_ctx = ctypes.c_void_p()
    gguf_ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(False, ctypes.pointer(ggml_ctx)))
    assert gguf_ctx, "ggml could not read the file"
    try:
        key = lambda name: lib.gguf_find_key(gguf_ctx, name.encode())  # noqa: E731
        assert lib.gguf_get_val_str(gguf_ctx, key("general.type")) == b"imatrix"
        assert lib.gguf_get_arr_str(gguf_ctx, key("imatrix.datasets"), 0) == b"calibration.txt"
        assert lib.gguf_get_val_u32(gguf_ctx, key("imatrix.chunk_count")) == 5
        assert lib.gguf_get_val_u32(gguf_ctx, key("imatrix.chunk_size")) == 512
        tensor_type, seen = _ggml_tensor_struct(), {}
        address = lib.ggml_get_first_tensor(ggml_ctx)
        while address:
            t = tensor_type.from_address(address)
            n = t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
            values = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(n,)).copy()
            if t.name.decode().endswith((".in_sum2", ".counts")):  # as the loader (ggml adds a data blob tensor)
                seen[t.name.decode()] = (t.type, tuple(t.ne), values)
            address = lib.ggml_get_next_tensor(ggml_ctx, address)
    finally:
        lib.gguf_free(gguf_ctx)
        lib.ggml_free(ggml_ctx)
    assert len(seen) == 2 * len(imatrix.sums)
    for name, sums in imatrix.sums.items():
        kind, ne, values = seen[name + ".in_sum2"]
        assert kind == 0 and ne == (sums.shape[1], 1, 1, 1) and np.array_equal(values, sums[0])
        kind, ne, values = seen[name + ".counts"]
        assert kind == 0 and ne == (1, 1, 1, 1) and values.tolist() == [2560.0]
