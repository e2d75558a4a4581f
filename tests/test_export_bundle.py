"""`ondevice export --app`: bundles validate against the manifest schema and their model loads in the runtime."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")

from ondevice.errors import InvalidModelError, OndeviceError, OutputExistsError, UnsupportedError  # noqa: E402
from ondevice.export_bundle import (  # noqa: E402
    SCHEMA_DIR,
    SCHEMA_PATH,
    SCHEMAS,
    export_bundle,
    validate_bundle,
    validate_manifest,
)


def test_schemas_are_valid_json_schema() -> None:
    for version, name in SCHEMAS.items():
        schema = json.loads((SCHEMA_DIR / name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["manifest_version"] == {"const": version}
    assert SCHEMA_PATH.name == SCHEMAS[max(SCHEMAS)]  # export writes the newest


@pytest.fixture(scope="module")
def bundles(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for app in ("pocketpal", "ios", "android"):
        out[app] = root / app
        export_bundle(smollm2, app, out[app])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("app", ["pocketpal", "ios", "android"])
def test_bundle_validates_and_describes_the_model(bundles: dict[str, Path], smollm2: Path, app: str) -> None:
    folder = bundles[app]
    manifest = validate_bundle(folder)  # schema + every file's size and sha256
    jsonschema.validate(manifest, json.loads(SCHEMA_PATH.read_text()))  # independently of our helper
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial folders left
    model = manifest["model"]
    assert (model["format"], model["architecture"], model["context_length"]) == ("gguf", "llama", 8192)
    assert_same_gguf_but(folder / model["file"], smollm2, {"general.name", "tokenizer.ggml.eot_token_id"})
    assert "<|im_end|>" in manifest["chat"]["stop"]
    assert manifest["chat"]["template"] and "<|im_start|>" in manifest["chat"]["template"]
    ram = manifest["ram"]
    assert ram["estimate_bytes"] == ram["model_bytes"] + ram["kv_cache_bytes"] + ram["overhead_bytes"]
    # KV cache for 2048 positions, f16: 30 layers x 2 (K,V) x 3 heads x 64 dims x 2 bytes x 2048.
    assert ram["kv_cache_bytes"] == 30 * 2 * 3 * 64 * 2 * 2048
    roles = {f["role"] for f in manifest["files"]}
    assert ("tokenizer" in roles) == (app != "pocketpal")


@pytest.mark.slow
def test_bundle_model_loads_and_generates(bundles: dict[str, Path]) -> None:
    import ondevice

    folder = bundles["pocketpal"]
    manifest = json.loads((folder / "manifest.json").read_text())
    s = manifest["sampling"]
    with ondevice.load(folder / manifest["model"]["file"], n_ctx=256) as model:
        text = model.chat([{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=s["temperature"],
                          top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"], seed=0)
        assert text.strip() and model.last_stats.generated_tokens >= 1


@pytest.mark.slow
def test_ios_tokenizer_matches_the_runtime(bundles: dict[str, Path]) -> None:
    from tokenizers import Tokenizer

    import ondevice

    folder = bundles["ios"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with ondevice.load(folder / json.loads((folder / "manifest.json").read_text())["model"]["file"]) as model:
        text = "<|im_start|>user\nHello, wörld! 12345<|im_end|>\n"
        assert tok.encode(text, add_special_tokens=False).ids == model.tokenize(text, add_bos=False)


@pytest.mark.slow
def test_tampered_bundles_are_rejected(bundles: dict[str, Path], tmp_path: Path) -> None:
    manifest = json.loads((bundles["pocketpal"] / "manifest.json").read_text())
    for mutate, where in [
        (lambda m: m.pop("ram"), "(root)"),
        (lambda m: m.update(manifest_version=3), "manifest_version"),
        (lambda m: m["model"].pop("file_type"), "model"),
        (lambda m: m.update(coreml={}), "(root)"),  # a coreml block on a GGUF bundle
        (lambda m: m["files"][0].update(path="../outside"), "files/0/path"),
        (lambda m: m["sampling"].update(top_p=0), "sampling/top_p"),
        (lambda m: m["files"][0].update(sha256="xyz"), "files/0/sha256"),
        (lambda m: m.update(app="windows-phone"), "app"),
    ]:
        broken = copy.deepcopy(manifest)
        mutate(broken)
        with pytest.raises(InvalidModelError, match=re.escape(f"invalid at {where}:")):
            validate_manifest(broken)
    # A file changed after export no longer matches its hash.
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(bundles["pocketpal"], copy_dir)
    with open(copy_dir / "chat_template.jinja", "a") as fh:
        fh.write(" ")
    with pytest.raises(InvalidModelError, match="chat_template.jinja does not match"):
        validate_bundle(copy_dir)


def test_bad_export_requests(smollm2: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="--app"):
        export_bundle(smollm2, "blackberry", tmp_path / "x")
    with pytest.raises(UnsupportedError, match="--format pte is not available"):
        export_bundle(smollm2, "ios", tmp_path / "x", model_format="pte")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(InvalidModelError, match="convert it first"):
        export_bundle(not_gguf, "pocketpal", tmp_path / "x")
    with pytest.raises(OndeviceError, match="no such file"):
        export_bundle(tmp_path / "missing.gguf", "pocketpal", tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export_bundle(smollm2, "pocketpal", tmp_path / "exists")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_export(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "pp"
    run = subprocess.run([sys.executable, "-m", "ondevice", "export", str(smollm2), "--app", "pocketpal", "-o",
                          str(out), "--device", "raspberry-pi-5", "--ctx", "1024", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    manifest = json.loads(run.stdout)["manifest"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert (manifest["ram"]["device"], manifest["ram"]["context"]) == ("raspberry-pi-5", 1024)
    again = subprocess.run([sys.executable, "-m", "ondevice", "export", str(smollm2), "--app", "pocketpal", "-o",
                            str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--force" in again.stderr and again.stderr.count("\n") == 1


@pytest.mark.slow
def test_android_pte_bundle_runs_in_executorch(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    result = export_bundle(tiny_gguf(tiny_models, tmp_path), "android", tmp_path / "bundle", model_format="pte")
    manifest = validate_bundle(tmp_path / "bundle")
    assert manifest["runtime"] == "executorch" and manifest["model"]["format"] == "pte"
    assert {f["role"] for f in manifest["files"]} >= {"model", "tokenizer", "runtime_manifest"}
    assert any("chat template" in n for n in result.notes)
    method = Runtime.get().load_program(str(tmp_path / "bundle" / manifest["model"]["file"])).load_method("forward")
    logits = method.execute([torch.tensor([[1, 5, 7]], dtype=torch.long), torch.tensor([0], dtype=torch.long)])[0]
    assert tuple(logits.shape) == (1, 3, manifest["model"]["vocab_size"])
    # and in ondevice's own generate loop, from the bundle as shipped
    import ondevice

    with ondevice.load(tmp_path / "bundle" / manifest["model"]["file"]) as model:
        reply = "".join(model.generate("Hello", max_tokens=4, temperature=0))
        assert model.last_stats.generated_tokens >= 1 and isinstance(reply, str)


def tiny_gguf(tiny_models: dict[str, Path], folder: Path) -> Path:
    from ondevice.converters import get_target
    from ondevice.converters.base import ConvertOptions

    from ondevice.sources import open_source

    source = open_source(tiny_models["llama"])
    try:
        get_target("gguf").convert(source, folder / "tiny.gguf",
                                   ConvertOptions(quant="f32", progress=False, pre_tokenizer="gpt-2"))
    finally:
        source.close()
    return folder / "tiny.gguf"


def test_ios_coreml_bundle_validates_and_runs(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """--app ios --format coreml: the .mlpackage folder, its tokenizer and runtime manifest, a v2 manifest with a
    coreml block; the package (run by the numpy MIL interpreter, Core ML itself needs macOS) agrees with our
    runtime on the GGUF it came from."""
    pytest.importorskip("coremltools")
    import numpy as np

    import ondevice
    from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

    gguf = tiny_gguf(tiny_models, tmp_path)
    out = tmp_path / "ios"
    result = export_bundle(gguf, "ios", out, model_format="coreml", quant="fp16")
    manifest = validate_bundle(out)
    jsonschema.validate(manifest, json.loads(SCHEMA_PATH.read_text()))
    assert manifest == result.manifest and manifest["manifest_version"] == 2
    model = manifest["model"]
    assert (manifest["runtime"], model["format"], model["file_type"], model["quantization"]) == \
        ("coreml", "mlpackage", "directory", "fp16")
    assert (out / model["file"]).is_dir() and model["file"].endswith(".mlpackage")
    assert manifest["coreml"]["package"] == model["file"] and manifest["coreml"]["max_seq_len"] == 256
    roles = [f["role"] for f in manifest["files"]]
    assert roles.count("model") >= 2 and {"tokenizer", "runtime_manifest", "chat_template", "readme"} <= set(roles)
    assert all(f["path"].startswith(model["file"] + "/") for f in manifest["files"] if f["role"] == "model")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders left

    tokens = [1, 5, 17, 42, 99, 3, 250, 7]
    runner = CoreMLInterpreterRunner(out / model["file"])
    package_logits = runner.logits(tokens)
    with ondevice.load(gguf, n_ctx=64) as reference:
        expected = reference.logits(tokens)
    assert package_logits.shape == expected.shape == (len(tokens), model["vocab_size"])
    assert np.abs(package_logits - expected).max() < 0.5 * expected.std()  # fp16 compute vs the f32 runtime
    assert (package_logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.75

    # A file added to or removed from the package is caught; version 1 manifests still validate.
    extra = out / model["file"] / "extra.bin"
    extra.write_bytes(b"x")
    with pytest.raises(InvalidModelError, match="does not list"):
        validate_bundle(out)
    extra.unlink()
    listed = next(f for f in manifest["files"] if f["role"] == "model")
    (out / listed["path"]).unlink()
    with pytest.raises(InvalidModelError, match="is missing"):
        validate_bundle(out)
    v1 = export_bundle(gguf, "pocketpal", tmp_path / "pp").manifest
    v1 = {**v1, "manifest_version": 1, "model": {k: v for k, v in v1["model"].items() if k != "file_type"}}
    validate_manifest(v1)
    with pytest.raises(UnsupportedError, match="--format coreml is not available"):
        export_bundle(gguf, "android", tmp_path / "x", model_format="coreml")


def assert_same_gguf_but(exported: Path, source: Path, changed: set[str]) -> None:
    """The exported GGUF is the source with only the `changed` metadata keys different: same tensors, byte for
    byte, and every other key as it was."""
    from ondevice.formats.gguf import GGUFFile

    with GGUFFile(exported) as new, GGUFFile(source) as old:
        differ = {k for k in set(new.fields) | set(old.fields)
                  if k not in old.fields or k not in new.fields or repr(new.fields[k]) != repr(old.fields[k])}
        assert differ == changed, differ
        assert list(new.tensors) == list(old.tensors) and new.alignment == old.alignment
        for name, info in old.tensors.items():
            assert (new.tensors[name].shape, new.tensors[name].ggml_type) == (info.shape, info.ggml_type)
            assert new.tensor_data(name).tobytes() == old.tensor_data(name).tobytes(), name


def llama_cpp_view(path: Path) -> dict[str, object]:
    """What llama.cpp itself reads from a GGUF alone: its name, EOS, EOT and end-of-generation ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return {"name": llm.metadata.get("general.name"), "eos": llama_cpp.llama_vocab_eos(vocab),
            "eot": llama_cpp.llama_vocab_eot(vocab), "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]}


@pytest.mark.slow
def test_pocketpal_gguf_alone_carries_the_display_name_and_stop_tokens(bundles: dict[str, Path]) -> None:
    """PocketPal imports the .gguf alone: the clean name and every stop token must be in the file itself."""
    from ondevice.formats.gguf import GGUFFile

    folder = bundles["pocketpal"]
    manifest = validate_bundle(folder)
    assert manifest["model"]["name"] == "SmolLM2 135M Instruct"
    assert any("training-run name" in n for n in manifest["notes"])
    im_end = next(e["id"] for e in manifest["chat"]["eos_tokens"] if e["text"] == "<|im_end|>")
    with GGUFFile(folder / manifest["model"]["file"]) as gguf:
        assert gguf.get("general.name") == "SmolLM2 135M Instruct"
        assert gguf.get("tokenizer.ggml.eot_token_id") == im_end == gguf.get("tokenizer.ggml.eos_token_id")
    seen = llama_cpp_view(folder / manifest["model"]["file"])
    assert seen["name"] == "SmolLM2 135M Instruct" and seen["eot"] == seen["eos"] == im_end
    assert seen["eog"] == [e["id"] for e in manifest["chat"]["eos_tokens"]]  # every stop the manifest lists


def _slug_named_gguf_without_stop_ids(tiny_models: dict[str, Path], folder: Path) -> Path:
    """A tiny model as a training run might publish it: a slug for general.name, no EOS or EOT id."""
    from ondevice.formats.gguf import GGUFFile, PlannedTensor, TypedValue, ValueType, write_gguf

    base = tiny_gguf(tiny_models, folder)
    target = folder / "TinyChat-1M-Instruct.Q8_0.gguf"  # the name it is published under
    with GGUFFile(base) as src:
        fields = {k: v for k, v in src.fields.items() if k != "tokenizer.ggml.eos_token_id"}
        fields["general.name"] = TypedValue(ValueType.STRING, "Tinychat 1M 8k Lc100K Mix1 Ep2")
        planned = [PlannedTensor(n, i.shape, i.ggml_type, lambda n=n: src.tensor_data(n).copy())
                   for n, i in src.tensors.items()]
        write_gguf(target, fields, planned)
    return target


def test_export_writes_a_clean_name_and_the_stop_ids_into_the_gguf(tiny_models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from ondevice.formats.gguf import GGUFFile

    source = _slug_named_gguf_without_stop_ids(tiny_models, tmp_path)
    manifest = export_bundle(source, "pocketpal", tmp_path / "pp").manifest
    exported = tmp_path / "pp" / manifest["model"]["file"]
    with GGUFFile(exported) as gguf:
        eos, eot = gguf.get("tokenizer.ggml.eos_token_id"), gguf.get("tokenizer.ggml.eot_token_id")
        name = gguf.get("general.name")
        im_end = gguf.get("tokenizer.ggml.tokens").index("<|im_end|>")
    assert name == manifest["model"]["name"] == "TinyChat 1M Instruct"
    assert eos == eot == im_end  # the token the chat template closes each turn with
    assert_same_gguf_but(exported, source, {"general.name", "tokenizer.ggml.eos_token_id",
                                            "tokenizer.ggml.eot_token_id"})
    assert len([n for n in manifest["notes"] if "apps reading only the file" in n]) == 2
    seen = llama_cpp_view(exported)
    assert (seen["name"], seen["eos"], seen["eot"]) == ("TinyChat 1M Instruct", im_end, im_end)
    assert seen["eog"] == [e["id"] for e in manifest["chat"]["eos_tokens"]] and im_end in seen["eog"]


def test_export_name_option_sets_the_manifest_and_gguf_name(tiny_models: dict[str, Path], tmp_path: Path,
                                                            capsys) -> None:
    from ondevice.cli import main as cli
    from ondevice.formats.gguf import GGUFFile

    source = _slug_named_gguf_without_stop_ids(tiny_models, tmp_path)
    assert cli(["export", str(source), "--app", "android", "-o", str(tmp_path / "a"), "--name", "Pocket Tiny",
                "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    assert manifest["model"]["name"] == "Pocket Tiny" and not any("display name" in n for n in manifest["notes"])
    with GGUFFile(tmp_path / "a" / manifest["model"]["file"]) as gguf:
        assert gguf.get("general.name") == "Pocket Tiny"
    assert cli(["export", str(source), "--app", "android", "-o", str(tmp_path / "b"), "--name", " "]) == 1


@pytest.mark.parametrize("general_name, file_name, expected", [
    ("Smollm2 135M 8k Lc100K Mix1 Ep2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2 135M Instruct"),
    ("Qwen2.5 0.5B Instruct", "whatever.gguf", "Qwen2.5 0.5B Instruct"),  # a curated name is kept
    ("Llama 3.2 1B Instruct v2", "x.gguf", "Llama 3.2 1B Instruct v2"),
    (None, "Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama 3.2 1B Instruct"),
    ("my-run step-12000", "model.gguf", "smollm2 135M"),  # generic file name: basename + size label
    ("ckpt_3 ep4", "model.f16.gguf", "smollm2 135M"),
    ("model", "tiny.gguf", "tiny"),  # ondevice's placeholder when a config names no model
])
def test_display_name(general_name, file_name, expected) -> None:
    from ondevice.export_bundle import display_name

    fields = {"general.name": general_name, "general.basename": "smollm2", "general.size_label": "135M"}
    name, _ = display_name(fields, Path(file_name))
    assert name == expected
