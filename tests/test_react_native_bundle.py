"""`ondevice export --app react-native` and the golden bundle the React Native SDK's tests read.

The bundle in sdk/react-native/test/fixtures/bundle-gguf/ is what this test exports from a tiny deterministic model
(numpy-seeded weights, no torch): the jest tests (sdk/react-native/test/) validate its manifest, serve it over HTTP to
the downloader and check every sha256, so the Python writer and the TypeScript reader cannot drift apart. When the
export changes on purpose, refresh the fixture with `ONDEVICE_UPDATE_FIXTURES=1 python -m pytest
tests/test_react_native_bundle.py` and commit it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jsonschema")
pytest.importorskip("tokenizers")

from ondevice.export_bundle import SCHEMA_PATH, export_bundle, validate_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "sdk" / "react-native" / "test" / "fixtures" / "bundle-gguf"
SDK_SCHEMA = ROOT / "sdk" / "react-native" / "src" / "schema" / SCHEMA_PATH.name
GGUF_NAME = "TinyChat-Instruct.Q8_0.gguf"
FIXED_TIME = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _tiny_llama_folder(folder: Path) -> Path:
    """A 2-layer llama (width 64, ~400-token BPE, ChatML template) whose weights come from a fixed numpy seed, so
    the GGUF and every sha256 in the fixture are the same on every machine."""
    from fixtures_tokenizer import make_tiny_tokenizer
    from safetensors.numpy import save_file
    from tiny_models import CHATML

    folder.mkdir(parents=True)
    tokenizer = make_tiny_tokenizer(folder)
    vocab, hidden, ffn, layers, heads, kv_heads = tokenizer.get_vocab_size(), 64, 128, 2, 4, 2
    head_dim = hidden // heads
    rng = np.random.RandomState(19)

    def w(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": 1 + w(hidden, scale=0.2)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
            p + "input_layernorm.weight": 1 + w(hidden, scale=0.2),
            p + "post_attention_layernorm.weight": 1 + w(hidden, scale=0.2)})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
              "bos_token_id": im_start, "eos_token_id": im_end, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "chat_template": CHATML, "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return folder


def _tiny_gguf(folder: Path) -> Path:
    from ondevice.converters import get_target
    from ondevice.converters.base import ConvertOptions

    from ondevice.sources import open_source

    source = open_source(_tiny_llama_folder(folder / "hf"))
    try:
        get_target("gguf").convert(source, folder / GGUF_NAME,
                                   ConvertOptions(quant="q8_0", progress=False, pre_tokenizer="gpt-2"))
    finally:
        source.close()
    return folder / GGUF_NAME


class _FixedClock(dt.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206 - datetime's signature
        return FIXED_TIME


def export_golden(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The react-native bundle of the tiny model, with its time stamp, tool version and source path pinned so that
    the bytes depend only on the export code."""
    import ondevice.export_bundle as eb

    _tiny_gguf(folder)
    monkeypatch.setattr(eb, "__version__", "0.0.0+fixture")
    monkeypatch.setattr(eb.dt, "datetime", _FixedClock)
    monkeypatch.chdir(folder)  # the manifest records the source as given: a bare file name
    out = folder / "bundle"
    export_bundle(GGUF_NAME, "react-native", out, ctx=256)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_react_native_bundle_matches_the_committed_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = export_golden(tmp_path, monkeypatch)
    manifest = validate_bundle(out)  # schema + every file's size and sha256
    assert (manifest["app"], manifest["runtime"], manifest["model"]["format"]) == ("react-native", "llama.cpp", "gguf")
    roles = {f["role"]: f["path"] for f in manifest["files"]}
    assert roles["tokenizer_config"] == "tokenizer_config.json" and roles["chat_template"] == "chat_template.jinja"
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == manifest["chat"]["template"]  # what react-native-executorch renders with
    assert config["eos_token"] == "<|im_end|>" and "<|im_end|>" in manifest["chat"]["stop"]
    produced = _files(out)
    if os.environ.get("ONDEVICE_UPDATE_FIXTURES") == "1":
        shutil.rmtree(FIXTURE, ignore_errors=True)
        shutil.copytree(out, FIXTURE)
    committed = _files(FIXTURE) if FIXTURE.is_dir() else {}
    assert sorted(committed) == sorted(produced), \
        "sdk/react-native/test/fixtures/bundle-gguf is out of date: ONDEVICE_UPDATE_FIXTURES=1 refreshes it"
    for name, data in produced.items():
        assert committed[name] == data, f"fixture file {name} differs from what export writes now " \
            "(ONDEVICE_UPDATE_FIXTURES=1 refreshes it)"


def test_the_sdk_ships_the_manifest_schema_export_validates_against() -> None:
    """The SDK's copy of the schema (its jest tests check the TypeScript validator against it) is ondevice's."""
    if os.environ.get("ONDEVICE_UPDATE_FIXTURES") == "1":
        SDK_SCHEMA.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SCHEMA_PATH, SDK_SCHEMA)
    assert SDK_SCHEMA.read_bytes() == SCHEMA_PATH.read_bytes()


@pytest.mark.slow
def test_react_native_pte_bundle_has_what_react_native_executorch_reads(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    gguf = _tiny_gguf(tmp_path)
    out = tmp_path / "pte"
    manifest = export_bundle(gguf, "react-native", out, model_format="pte", ctx=64).manifest
    assert validate_bundle(out) == manifest
    assert (manifest["runtime"], manifest["model"]["format"]) == ("executorch", "pte")
    roles = {f["role"] for f in manifest["files"]}
    assert {"model", "tokenizer", "tokenizer_config", "chat_template"} <= roles
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert isinstance(config["chat_template"], str) and config["eos_token"]  # parseTokenizerConfig needs both
