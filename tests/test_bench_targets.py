"""bench, eval and inspect on every converted target of the tiny llama: MLX (mlx-lm), ONNX (onnxruntime and
onnxruntime-genai), ExecuTorch (.pte), Core ML (.mlpackage: Core ML needs macOS, the numpy interpreter gives
quality). Real runtimes, no mocks; short runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ondevice.bench.artifacts import artifact_kind
from ondevice.bench.backends import backend_class
from ondevice.cli import main as cli

pytestmark = pytest.mark.slow  # builds an artifact of every target: ~90 s of the fast tier

ON_MACOS = sys.platform == "darwin"


def _needs(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama converted once per module; each kind only if its converter's library is installed."""
    import importlib.util

    root = tmp_path_factory.mktemp("targets")
    source = tiny_models["llama"]
    wanted = {
        "mlx-f16": ("mlx", "f16", "mlx"), "mlx-int4": ("mlx", "int4", "mlx"),
        "onnx-f32": ("onnx", "f32", "onnx"), "onnx-int4": ("onnx", "int4", "onnx"),
        "tiny.pte": ("executorch", "fp32", "executorch"),
        "tiny-f16.mlpackage": ("coreml", "fp16", "coremltools"), "tiny-int4.mlpackage": ("coreml", "int4", "coremltools"),
    }
    out: dict[str, Path] = {"source": source}
    for name, (target, quant, module) in wanted.items():
        if importlib.util.find_spec(module) is None:
            continue
        # A small KV cache keeps the Core ML interpreter quick. (ExecuTorch keeps its default: a --max-seq-len below
        # its prefill chunk of 128 currently writes a .pte whose forward method does not load.)
        extra = ["--max-seq-len", "64"] if target == "coreml" else []
        assert cli(["convert", str(source), "--to", target, "--quant", quant, "-o", str(root / name),
                    "--no-progress", *extra]) == 0
        out[name] = root / name
    return out


def _artifact(artifacts: dict[str, Path], name: str) -> Path:
    if name not in artifacts:
        pytest.skip(f"{name}: its converter's library is not installed")
    return artifacts[name]


def _bench_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    cli(["bench", *args, "--prompt", "12", "--gen", "4", "--repeat", "2", "--warmup", "0", "--threads", "1",
         "--json"])
    return json.loads(capsys.readouterr().out)


def test_artifact_kinds_of_every_target(artifacts):
    expected = {"mlx-f16": "mlx", "mlx-int4": "mlx", "onnx-f32": "onnx", "onnx-int4": "onnx", "tiny.pte": "pte",
                "tiny-f16.mlpackage": "coreml", "source": "hf"}
    for name, kind in expected.items():
        if name in artifacts:
            assert artifact_kind(artifacts[name]) == kind, name
    if "onnx-f32" in artifacts:
        assert artifact_kind(artifacts["onnx-f32"] / "model.onnx") == "onnx"


@pytest.mark.parametrize("name, backends", [
    ("mlx-f16", ["mlx"]),
    ("onnx-f32", ["onnxruntime", "onnxruntime-plain"]),
    ("tiny.pte", ["executorch"]),
])
def test_new_backends_benchmark_a_tiny_artifact(artifacts, tmp_path, capsys, name, backends):
    path = _artifact(artifacts, name)
    for backend in backends:
        reason = backend_class(backend).unavailable_reason()
        if reason:
            pytest.skip(reason)
    result = _bench_json(capsys, str(path), "--backend", ",".join(backends), "--db", str(tmp_path / "b.sqlite"))
    rows = {r["backend"]: r for r in result["measurements"]}
    assert set(rows) == set(backends)
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["prompt_tokens"] == 12 and row["repeats"] == 2 and len(row["samples"]) == 2
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["load_s"] > 0
        assert row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0
        assert row["artifact_kind"] == artifact_kind(path) and row["settings"]["kv_bytes_per_position"] > 0
    if "onnxruntime" in rows and backend_class("onnxruntime").genai_available():
        assert rows["onnxruntime"]["backend_version"].startswith("onnxruntime-genai ")


def test_coreml_is_recorded_as_needing_macos_and_the_run_goes_on(artifacts, tmp_path, capsys):
    package = _artifact(artifacts, "tiny-f16.mlpackage")
    if ON_MACOS:
        pytest.skip("on macOS Core ML runs the package")
    result = _bench_json(capsys, str(package), "--backend", "coreml,coreml-interpreter,null",
                         "--db", str(tmp_path / "b.sqlite"))
    rows = {r["backend"]: r for r in result["measurements"]}
    assert set(rows) == {"coreml", "null"}  # the interpreter is for quality only: never timed
    assert rows["coreml"]["status"] == "unavailable" and "needs macOS" in rows["coreml"]["error"]
    assert rows["null"]["status"] == "ok"


def test_bench_to_several_targets_converts_caches_and_picks_backends(tiny_models, tmp_path, capsys, monkeypatch):
    _needs("mlx_lm", "onnxruntime")
    monkeypatch.setenv("ONDEVICE_CACHE", str(tmp_path / "cache"))
    db = str(tmp_path / "b.sqlite")
    args = [str(tiny_models["llama"]), "--to", "mlx,onnx", "--quant", "8bit", "--db", db, "--no-progress"]
    result = _bench_json(capsys, *args)
    rows = {r["backend"]: r for r in result["measurements"]}
    assert set(rows) == {"mlx", "onnxruntime"}  # chosen from each artifact's kind
    assert all(r["status"] == "ok" and r["quant"] == "int8" for r in rows.values()), rows
    assert rows["mlx"]["artifact_kind"] == "mlx" and rows["onnxruntime"]["artifact_kind"] == "onnx"
    cached = sorted((tmp_path / "cache" / "bench" / "artifacts").iterdir())
    assert [p.name.split("-")[-2:] for p in cached] == [["mlx", "int8"], ["onnx", "int8"]]
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = _bench_json(capsys, *args, "--backend", "mlx")  # cached: not converted again
    assert [r["backend"] for r in again["measurements"]] == ["mlx"]
    assert [p.stat().st_mtime_ns for p in cached] == stamps


@pytest.mark.parametrize("name, backend, max_kl, min_top1", [
    ("mlx-f16", "mlx", 1e-4, 0.97),
    ("onnx-f32", "onnxruntime", 1e-6, 1.0),
    ("tiny.pte", "executorch", 1e-6, 1.0),
    ("tiny-f16.mlpackage", "coreml-interpreter", 1e-4, 0.95),
])
def test_eval_of_each_kind_scores_kl_zero_against_its_source(artifacts, tmp_path, capsys, name, backend, max_kl,
                                                             min_top1):
    path = _artifact(artifacts, name)
    if ON_MACOS and backend == "coreml-interpreter":
        backend = "coreml"
    if backend_class(backend).unavailable_reason():
        pytest.skip(backend_class(backend).unavailable_reason())
    capsys.readouterr()
    assert cli(["eval", str(path), "--ref", str(artifacts["source"]), "--ctx", "32", "--max-tokens", "64",
                "--no-store", "--json", "--no-progress"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["backend"] == backend and result["ref_backend"] == "transformers"
    assert result["tokens"] >= 60
    assert result["kl_mean"] < max_kl and result["top1_agreement"] >= min_top1
    assert result["perplexity"] == pytest.approx(result["ref_perplexity"], rel=1e-2)


def _inspect_json(capsys, path: Path) -> dict:
    capsys.readouterr()
    assert cli(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _inspect_text(capsys, path: Path) -> str:
    capsys.readouterr()
    assert cli(["inspect", str(path)]) == 0
    return capsys.readouterr().out


def test_inspect_mlx_folders(artifacts, capsys):
    info = _inspect_json(capsys, _artifact(artifacts, "mlx-int4"))
    assert info["format"] == "mlx" and info["quant"] == "int4 (group 64, affine)"
    assert info["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert info["quantized_layers"] == 15 and info["float_layers"] == []  # 2 x 7 linears + the embedding
    assert info["spec"]["n_layers"] == 2 and info["architecture"] == "llama" and info["chat_template"]
    f16 = _inspect_json(capsys, artifacts["mlx-f16"])
    assert f16["format"] == "mlx" and f16["quant"] == "f16" and f16["quantized_layers"] == 0
    assert f16["safetensors_format"] == "mlx"
    assert "quantization" in _inspect_text(capsys, artifacts["mlx-int4"])


def test_inspect_onnx_folders(artifacts, capsys):
    info = _inspect_json(capsys, _artifact(artifacts, "onnx-int4"))
    graph = info["graph"]
    assert info["format"] == "onnx" and info["quant"] == "int4 (block 32)"
    [nbits] = graph["matmul_nbits"]
    assert nbits["bits"] == 4 and nbits["block_size"] == 32
    assert nbits["count"] == graph["ops"]["com.microsoft.MatMulNBits"] and "MatMul" not in graph["ops"]
    assert graph["nodes"] == sum(graph["ops"].values()) and graph["ops"]["com.microsoft.GroupQueryAttention"] == 2
    assert set(info["files"]) >= {"genai_config.json", "model.onnx", "tokenizer.json"}
    assert info["spec"]["n_kv_heads"] == 2 and info["tokenizer"]["vocab_size"] == info["spec"]["vocab_size"]
    f32 = _inspect_json(capsys, artifacts["onnx-f32"] / "model.onnx")
    assert f32["quant"] == "f32" and f32["graph"]["matmul_nbits"] == [] and f32["path"] == str(artifacts["onnx-f32"])
    assert "MatMulNBits" in _inspect_text(capsys, artifacts["onnx-int4"])


def test_inspect_pte(artifacts, capsys):
    info = _inspect_json(capsys, _artifact(artifacts, "tiny.pte"))
    assert info["format"] == "pte" and info["quant"] == "fp32" and info["program"]["identifier"].startswith("ET")
    assert info["program"]["max_seq_len"] == 256 and info["manifest"] == "tiny.json"
    assert info["layer_schemes"] == {"fp32": len(info["layers"])} and info["chat_template"]
    assert info["parameters"] > 0 and info["spec"]["vocab_size"] == info["tokenizer"]["vocab_size"]
    assert "ET" in _inspect_text(capsys, artifacts["tiny.pte"])


def test_inspect_mlpackage(artifacts, capsys):
    info = _inspect_json(capsys, _artifact(artifacts, "tiny-int4.mlpackage"))
    program = info["program"]
    assert info["format"] == "coreml" and info["quant"] == "int4 (block 32)"
    # 14 linears + the tied head, each also applying its int8 block offsets (the embedding's offsets are gathered)
    assert program["blockwise_int4"] == 15 and program["blockwise_int8"] == 15
    assert program["linear_ops"] == 2 * (14 + 1) and program["linear_with_compressed_weight"] == program["linear_ops"]
    assert program["states"] == ["key_cache", "value_cache"] and program["operations"] == sum(program["ops"].values())
    assert info["layer_schemes"] == {"int4-block32-asymmetric": 14, "int4-block32-gptq": 1}
    assert info["max_seq_len"] == 64
    f16 = _inspect_json(capsys, artifacts["tiny-f16.mlpackage"])
    assert f16["program"]["blockwise_int4"] == 0 and f16["quant"] == "fp16"
    assert "blockwise int4 weights 15, int8 15" in _inspect_text(capsys, artifacts["tiny-int4.mlpackage"])
