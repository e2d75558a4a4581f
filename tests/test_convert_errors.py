"""Bad input gets a one-line error, a non-zero exit, and no partial output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ondevice.cli import main as cli


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code: int, err: str, out_dir: Path, needle: str) -> None:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("ondevice:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix == ".gguf"], list(out_dir.iterdir())


@pytest.fixture
def broken_copy(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d


def test_missing_config(broken_copy, tmp_path, capsys):
    (broken_copy / "config.json").unlink()
    code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "-o", str(out_dir(tmp_path) / "m.gguf")], capsys)
    assert_clean_failure(code, err, out_dir(tmp_path), "config.json is missing")


def test_malformed_config(broken_copy, tmp_path, capsys):
    (broken_copy / "config.json").write_text("{not json")
    code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "-o", str(out_dir(tmp_path) / "m.gguf")], capsys)
    assert_clean_failure(code, err, out_dir(tmp_path), "malformed JSON")


def test_unsupported_architecture(broken_copy, tmp_path, capsys):
    config = json.loads((broken_copy / "config.json").read_text())
    config.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (broken_copy / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "-o", str(out_dir(tmp_path) / "m.gguf")], capsys)
    assert_clean_failure(code, err, out_dir(tmp_path), "MambaForCausalLM")
    assert "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_truncated_safetensors(broken_copy, tmp_path, capsys):
    st = broken_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "--pre", "gpt-2",
                         "-o", str(out_dir(tmp_path) / "m.gguf")], capsys)
    assert_clean_failure(code, err, out_dir(tmp_path), "safetensors")


def test_pickle_refused(broken_copy, tmp_path, capsys):
    (broken_copy / "model.safetensors").unlink()
    (broken_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "-o", str(out_dir(tmp_path) / "m.gguf")], capsys)
    assert_clean_failure(code, err, out_dir(tmp_path), "--allow-pickle")


def test_unknown_pre_tokenizer_hash_asks_for_pre(tiny_models, tmp_path, capsys):
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf",
                         "-o", str(out_dir(tmp_path) / "m.gguf")], capsys)
    assert_clean_failure(code, err, out_dir(tmp_path), "--pre")


def test_existing_output_needs_force(tiny_models, tmp_path, capsys):
    target = out_dir(tmp_path) / "m.gguf"
    target.write_bytes(b"precious")
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--pre", "gpt-2", "-o", str(target)],
                        capsys)
    assert code != 0 and "--force" in err and target.read_bytes() == b"precious"
    code, _ = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--pre", "gpt-2", "-o", str(target),
                       "--force", "--no-progress"], capsys)
    assert code == 0 and target.read_bytes()[:4] == b"GGUF"


def test_unwritable_output_folder(tiny_models, tmp_path, capsys):
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf",
                         "-o", str(tmp_path / "no" / "such" / "m.gguf")], capsys)
    assert code != 0 and "does not exist" in err


def test_block_size_must_divide_width(tiny_models, tmp_path, capsys):
    """A width a scheme cannot take falls back visibly (K-quants) - never silently."""
    code = cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "q4_k_m", "--pre", "gpt-2",
                "-o", str(tmp_path / "m.gguf"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["fallbacks"] and all("not a multiple of 256" in f for f in result["fallbacks"])


def test_generic_quant_is_reported(tiny_models, tmp_path, capsys):
    code = cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "8bit", "--pre", "gpt-2",
                "-o", str(tmp_path / "m.gguf"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["quant"] == "q8_0" and "8bit means q8_0" in result["notes"][0]


def test_debug_shows_traceback(tiny_models, tmp_path, capsys):
    code = cli(["--debug", "convert", str(tmp_path / "missing"), "--to", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert code != 0 and "Traceback" in capsys.readouterr().err


def test_inspect_json(tiny_models, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    assert cli(["convert", str(tiny_models["qwen2"]), "--to", "gguf", "--quant", "q8_0", "--pre", "gpt-2",
                "-o", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "qwen2" and info["format"] == "gguf"
    assert set(info["quant_mix"]) == {"q8_0", "f32"}
    assert info["tokenizer"]["pre_tokenizer"] == "gpt-2" and info["chat_template"].startswith("{% for")
    assert cli(["inspect", str(tiny_models["qwen2"]), "--json"]) == 0
    hf_info = json.loads(capsys.readouterr().out)
    assert hf_info["format"] == "hf" and hf_info["parameters"] == info["parameters"]


def test_hf_hub_path_offline(tiny_models, tmp_path, monkeypatch, capsys):
    """hf:org/name resolves from a local Hugging Face cache with the network off."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    repo = cache / "models--tiny--llama"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_models["llama"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        from ondevice.hub import resolve_model

        assert resolve_model("hf:tiny/llama") == snap
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 10**9), ("head_dim", "64"), ("rope_theta", "x"), ("rope_theta", -1),
    ("rms_norm_eps", [1]), ("max_position_embeddings", -1), ("num_key_value_heads", "3"),
    ("hidden_size", 10**30), ("vocab_size", True), ("rope_scaling", "x"), ("rope_parameters", [1]),
])
def test_hostile_config_fields_are_one_line_errors(tiny_models, tmp_path, capsys, field, value):
    """config.json is untrusted: a field of the wrong type or range names the file and the field in one line."""
    import json
    import shutil

    from ondevice.cli import main as cli

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert cli(["convert", str(folder), "--to", "gguf", "-o", str(tmp_path / "out.gguf"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ondevice: error: ") and "internal error" not in err[0], err
    assert not (tmp_path / "out.gguf").exists()
