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
    assert (folder / model["file"]).read_bytes() == smollm2.read_bytes()
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
