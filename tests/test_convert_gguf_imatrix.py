"""`ondevice convert --to gguf --imatrix FILE / --calibrate`: the whole file's tensors byte-identical to llama.cpp's
llama_model_quantize given the same importance vectors (real SmolLM2, q4_0 and q4_k_m), llama.cpp's recipe rule for
q4_0 with an imatrix, and bad imatrices as one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondevice.formats.gguf import GGUFFile
from ondevice.quant.imatrix import Imatrix
from ondevice.quant.recipes import plan_tensor_type

ROOT = Path(__file__).resolve().parent.parent


def ondevice(*args: str) -> subprocess.CompletedProcess:
    if args[0] == "convert" and "gguf" in args and "--pre" not in args:
        args = (*args, "--pre", "gpt-2")  # the tiny models' tokenizer is no known family's
    return subprocess.run([sys.executable, "-m", "ondevice", *args], capture_output=True, text=True, cwd=ROOT)


def test_q4_0_with_an_imatrix_guards_the_first_ffn_down_layers():
    plan = lambda name, imatrix: plan_tensor_type("q4_0", name, (576, 1536), 30, True, "llama", imatrix).name  # noqa: E731
    assert [plan(f"blk.{i}.ffn_down.weight", True) for i in (0, 2, 3)] == ["q4_1", "q4_1", "q4_0"]
    assert plan("blk.0.ffn_down.weight", False) == "q4_0"
    assert plan("blk.0.ffn_up.weight", True) == "q4_0"
    assert plan_tensor_type("q5_0", "blk.1.ffn_down.weight", (576, 1536), 30, True, "llama", True).name == "q5_1"
    assert plan_tensor_type("q4_k_m", "blk.1.ffn_down.weight", (576, 1536), 30, True, "llama", True).name == "q6_k"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("convert-imatrix") / "llama", "llama", tie=True, seed=12,
                           hidden=256, ffn=512)


def test_calibrate_and_imatrix_flags(tiny, tmp_path):
    out = tmp_path / "cal.gguf"
    run = ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_0", "--calibrate", "--method", "imatrix",
                   "-o", str(out), "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert any("importance weights" in note for note in result["notes"])
    with GGUFFile(out) as f:
        assert f.get("quantize.imatrix.file") == "calibrate"
        assert f.get("quantize.imatrix.entries_count") == 14
        assert f.get("quantize.imatrix.dataset") == "ondevice/data/calibration_text.txt"
    # the same imatrix from a file gives the same bytes
    imx = tmp_path / "tiny.imatrix.gguf"
    assert ondevice("imatrix", str(tiny), "-o", str(imx)).returncode == 0
    again = tmp_path / "file.gguf"
    assert ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_0", "--imatrix", str(imx), "-o",
                    str(again)).returncode == 0
    with GGUFFile(out) as a, GGUFFile(again) as b:
        assert all(bytes(a.tensor_data(n)) == bytes(b.tensor_data(n)) for n in a.tensors)
    both = ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_0", "--imatrix", str(imx), "--calibrate",
                    "-o", str(tmp_path / "x.gguf"))
    assert both.returncode == 1 and "exclude each other" in both.stderr
    other = ondevice("convert", str(tiny), "--to", "mlx", "--imatrix", str(imx), "-o", str(tmp_path / "m"))
    assert other.returncode == 1 and "--imatrix does not apply to --to mlx" in other.stderr


def test_wrong_or_broken_imatrix_is_a_one_line_error(tiny, tmp_path):
    wrong = Imatrix(datasets=["x"], chunk_count=1, chunk_size=512)
    wrong.sums["blk.0.attn_q.weight"] = np.ones((1, 960), np.float32)  # another model's width
    wrong.counts["blk.0.attn_q.weight"] = np.array([512])
    wrong.save(tmp_path / "wrong.gguf")
    unrelated = Imatrix(datasets=["x"], chunk_count=1, chunk_size=512)
    unrelated.sums["model.decoder.fc1.weight"] = np.ones((1, 256), np.float32)
    unrelated.counts["model.decoder.fc1.weight"] = np.array([512])
    unrelated.save(tmp_path / "unrelated.dat")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    for name, pattern in (("wrong.gguf", "has 960 values but the tensor has 256 input columns"),
                          ("unrelated.dat", "no entry for any tensor of this model"),
                          ("junk.gguf", "not a valid GGUF"), ("missing.gguf", "no such file")):
        run = ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_k_m", "--imatrix", str(tmp_path / name),
                       "-o", str(tmp_path / "out.gguf"))
        assert run.returncode == 1, name
        assert pattern in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["q4_0", "q4_k_m"])
def test_smollm2_with_imatrix_is_byte_identical_to_llama_cpp(smollm2, tmp_path_factory, recipe):
    from ondevice.bench.llama_cpp_tools import llama_cpp_quantize

    pytest.importorskip("llama_cpp")
    work = tmp_path_factory.getbasetemp() / "smol-imatrix"
    work.mkdir(exist_ok=True)
    imx, f32 = work / "smol.imatrix.gguf", work / "smol-f32.gguf"
    if not imx.exists():
        assert ondevice("imatrix", str(smollm2), "--ctx", "128", "--chunks", "2", "-o", str(imx)).returncode == 0
        assert ondevice("convert", str(smollm2), "--to", "gguf", "--quant", "f32", "-o", str(f32), "--pre",
                        "smollm").returncode == 0
    ours, theirs = work / f"ours-{recipe}.gguf", work / f"llama-{recipe}.gguf"
    run = ondevice("convert", str(smollm2), "--to", "gguf", "--quant", recipe, "--imatrix", str(imx), "-o", str(ours),
                   "--pre", "smollm")
    assert run.returncode == 0, run.stderr
    llama_cpp_quantize(f32, theirs, recipe, imatrix=Imatrix.load(imx))
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert set(a.tensors) == set(b.tensors)
        differ = [n for n in b.tensors if a.tensors[n].ggml_type != b.tensors[n].ggml_type
                  or bytes(a.tensor_data(n)) != bytes(b.tensor_data(n))]
        assert differ == [], f"{len(differ)} tensors differ from llama.cpp, e.g. {differ[:3]}"
        if recipe == "q4_0":
            assert [b.tensors[f"blk.{i}.ffn_down.weight"].ggml_type for i in range(4)] == [3, 3, 3, 2]
