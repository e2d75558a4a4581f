"""Phone-app bundles: `ondevice export MODEL --app {pocketpal,ios,android} -o DIR`.

A bundle is a folder an app can ship or side-load: the model file (or package folder), the tokenizer and chat
template, and manifest.json (format: ondevice/data/schemas/app-bundle-manifest.v2.schema.json; version 1 bundles
still validate against the v1 schema) with the context length, stop tokens, recommended sampling and a RAM
estimate from `ondevice fit`. The manifest is validated against the
schema before the bundle appears; the folder is built beside DIR and renamed into place, so a failed export
leaves nothing behind.

What each app gets:
- pocketpal: the GGUF (PocketPal AI and other llama.cpp apps read the chat template from it) + manifest.
- ios: by default the GGUF for llama.cpp-based apps (llama.cpp's Swift package; see apps/ios), tokenizer.json and
  the chat template beside it; with --format coreml a Core ML .mlpackage (ondevice's coreml target: mlprogram
  for iOS 18 with a stateful KV cache, int4 by default) with its tokenizer and runtime manifest beside it, the
  manifest's coreml block saying how to drive it.
- android: with --format pte, an ExecuTorch .pte (ondevice's executorch target: XNNPACK, its own runtime
  manifest and tokenizer.json beside it, see apps/android); by default the GGUF for llama.cpp on Android.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondevice import __version__
from ondevice.errors import InvalidModelError, MissingExtraError, OndeviceError, UnsupportedError
from ondevice.formats.atomic import atomic_output, check_output_path
from ondevice.runtime.sampling import DEFAULTS

MANIFEST_VERSION = 2  # what export writes; validation accepts every version in SCHEMAS
SCHEMA_DIR = Path(__file__).parent / "data" / "schemas"
SCHEMAS = {1: "app-bundle-manifest.v1.schema.json", 2: "app-bundle-manifest.v2.schema.json"}
SCHEMA_PATH = SCHEMA_DIR / SCHEMAS[MANIFEST_VERSION]
APPS = ("pocketpal", "ios", "android")
FORMATS = {"pocketpal": ("gguf",), "ios": ("gguf", "coreml"), "android": ("gguf", "pte")}
CONVERTED = {"pte": ("executorch", "8da4w"), "coreml": ("coreml", "int4")}  # format -> (target, default quant)
DEFAULT_DEVICE = {"pocketpal": "pixel-8", "ios": "iphone-15-pro", "android": "pixel-8"}
# What `ondevice run` samples with (SamplingDefaults); used for each key the GGUF's general.sampling.* lacks.
DEFAULT_SAMPLING = {k: v for k, v in DEFAULTS.to_dict().items() if k != "max_tokens"}
GGUF_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                      "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
                      "repeat_penalty": "general.sampling.penalty_repeat"}


@dataclass
class BundleResult:
    app: str
    output: Path
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "output": str(self.output), "manifest": self.manifest, "notes": self.notes}


def load_manifest_schema(version: int = MANIFEST_VERSION) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / SCHEMAS[version]).read_text(encoding="utf-8"))


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise InvalidModelError naming the first problem if the manifest does not match the schema of its
    manifest_version (1 or 2)."""
    try:
        import jsonschema
    except ImportError as exc:
        raise MissingExtraError("validating bundle manifests needs jsonschema (an ondevice dependency): pip install jsonschema") \
            from exc
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version not in SCHEMAS:  # validate against the current schema: its error names the field
        version = MANIFEST_VERSION
    validator = jsonschema.Draft202012Validator(load_manifest_schema(version),
                                                format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(root)"
        raise InvalidModelError(f"bundle manifest invalid at {where}: {errors[0].message.splitlines()[0]}")


def validate_bundle(folder: Path) -> dict[str, Any]:
    """Check a bundle on disk: manifest against the schema, every listed file present with its size and hash."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise InvalidModelError(f"{folder} is not a bundle: manifest.json is missing")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    validate_manifest(manifest)
    for entry in manifest["files"]:
        file = folder / entry["path"]
        if not file.is_file():
            raise InvalidModelError(f"bundle file {entry['path']} is missing")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise InvalidModelError(f"bundle file {entry['path']} does not match its size/sha256 in the manifest")
    primary = folder / manifest["model"]["file"]
    if manifest["model"].get("file_type") == "directory":  # a package: exactly the files listed, nothing else
        listed = {e["path"] for e in manifest["files"]}
        inside = {p.relative_to(folder).as_posix() for p in primary.rglob("*") if p.is_file()} if primary.is_dir() \
            else set()
        if not inside:
            raise InvalidModelError(f"bundle model package {manifest['model']['file']} is missing or empty")
        if inside - listed:
            raise InvalidModelError(f"bundle model package has files the manifest does not list: "
                                    f"{sorted(inside - listed)[0]}")
    elif not primary.is_file():
        raise InvalidModelError(f"bundle model file {manifest['model']['file']} is missing")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sampling(gguf: Any) -> dict[str, Any]:
    found = {name: gguf.get(key) for name, key in GGUF_SAMPLING_KEYS.items() if gguf.get(key) is not None}
    values = {**DEFAULT_SAMPLING, **{k: (int(v) if k == "top_k" else float(v)) for k, v in found.items()}}
    return {**values, "max_tokens": DEFAULTS.max_tokens, "source": "gguf" if found else "ondevice-defaults"}


def _ram_estimate(model_file: Path, device: str, ctx: int) -> dict[str, Any]:
    """RAM need from `ondevice fit` (file + KV cache for ctx + runtime overhead) on a device profile."""
    from ondevice.bench.artifacts import describe_artifact
    from ondevice.bench.fit import estimate, find_profile, load_profiles

    profile = find_profile(load_profiles(), device)
    est = estimate(describe_artifact(model_file), profile, {}, ctx=ctx, backends=["llama.cpp"])
    row = est.per_backend[0]
    return {"estimate_bytes": int(row["ram_need_bytes"]), "model_bytes": int(est.file_bytes),
            "kv_cache_bytes": int(row["kv_cache_bytes"]), "overhead_bytes": int(row["overhead_bytes"]),
            "context": ctx, "device": profile.name, "fits": bool(row["fits"]),
            "decode_tok_s_estimate": round(float(row["tok_s"]), 1),
            "method": "ondevice fit: model file + f16 KV cache for the context + runtime overhead (an estimate)"}


def _readme(manifest: dict[str, Any]) -> str:
    m, ram, s = manifest["model"], manifest["ram"], manifest["sampling"]
    stops = ", ".join(f"`{t}`" for t in manifest["chat"]["stop"]) or "(none)"
    return f"""# {m['name']} for {manifest['app']}

Written by {manifest['created_by']}. Load `{m['file']}` with {manifest['runtime']}.

- Format: {m['format']}, quantization {m['quantization']}, vocabulary {m['vocab_size']}
- Context: trained for {m['context_length']} tokens; RAM estimate sized for {ram['context']}
- RAM: about {ram['estimate_bytes'] / 1e6:.0f} MB on {ram['device']} ({'fits' if ram['fits'] else 'does NOT fit'};
  model {ram['model_bytes'] / 1e6:.0f} MB + KV cache {ram['kv_cache_bytes'] / 1e6:.0f} MB + runtime
  {ram['overhead_bytes'] / 1e6:.0f} MB), an estimate from `ondevice fit`
- Stop tokens: {stops}
- Sampling: temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}, min_p {s['min_p']},
  repeat penalty {s['repeat_penalty']} ({s['source']})

manifest.json follows the schema `{SCHEMAS[manifest['manifest_version']]}` shipped with ondevice
(ondevice/data/schemas); every file is listed there with its size and SHA-256.
"""


def export_bundle(model: str | Path, app: str, out_dir: str | Path, *, model_format: str | None = None,
                  device: str | None = None, ctx: int | None = None, quant: str | None = None,
                  force: bool = False, progress: bool = False) -> BundleResult:
    """Write a validated bundle for `app` into `out_dir` (see the module docstring)."""
    from ondevice.formats.gguf import GGUFFile
    from ondevice.hub import resolve_model
    from ondevice.runtime.text import TextCodec

    if app not in APPS:
        raise UnsupportedError(f"--app {app} is not supported; choose from {', '.join(APPS)}")
    model_format = model_format or FORMATS[app][0]
    if model_format not in FORMATS[app]:
        raise UnsupportedError(f"--format {model_format} is not available for --app {app} "
                               f"(choose {', '.join(FORMATS[app])})")
    if quant is not None and model_format not in CONVERTED:
        raise UnsupportedError("--quant applies to --format pte and coreml only; quantize a GGUF with "
                               "`ondevice convert`")
    if ctx is not None and ctx < 1:
        raise OndeviceError(f"--ctx must be >= 1, got {ctx}")
    out_dir = Path(out_dir)
    check_output_path(out_dir, force)  # before any work
    source = resolve_model(None if model is None else str(model))
    if not _is_gguf(source):
        raise InvalidModelError(f"{source}: export bundles are built from a GGUF file; convert it first "
                                f"(ondevice convert {source} --to gguf -o model.gguf)")

    gguf = GGUFFile(source)
    try:
        arch = str(gguf.require("general.architecture", str))
        context_length = int(gguf.require(f"{arch}.context_length", int))
        codec = TextCodec.from_gguf(gguf)
        template = gguf.get("tokenizer.chat_template")
        template = str(template) if template is not None else None
        tokens = gguf.get("tokenizer.ggml.tokens") or []
        vocab_size = int(gguf.get(f"{arch}.vocab_size") or len(tokens))  # the logits' width
        name = str(gguf.get("general.name") or source.stem)
        license_name = gguf.get("general.license")
        sampling = _sampling(gguf)
        tokenizer_json = codec.tokenizer.to_str()
    finally:
        gguf.close()
    eos = [{"id": int(i), "text": codec.token_text(int(i))} for i in sorted(codec.eos_ids)]
    bos = codec.token_text(codec.bos_id) if codec.bos_id is not None else None
    ctx = min(ctx or 2048, context_length)
    device = device or DEFAULT_DEVICE[app]
    notes: list[str] = []

    with atomic_output(out_dir, force=force, directory=True) as tmp:
        files: list[tuple[str, str]] = []  # (relative path, role)
        if model_format == "gguf":
            model_file = tmp / source.name
            shutil.copyfile(source, model_file)
            files.append((model_file.name, "model"))
            runtime = "llama.cpp"
            quantization = _gguf_quant(source)
            if app == "ios":
                notes.append("GGUF for llama.cpp-based iOS apps (--format coreml gives a Core ML package)")
        else:
            target, default_quant = CONVERTED[model_format]
            model_file, quantization, writer = _export_converted(source, tmp, target, quant or default_quant,
                                                                 min(ctx, 2048), progress)
            if model_format == "coreml":  # a package folder: every file inside it is part of the model
                files += [(f.relative_to(tmp).as_posix(), "model") for f in sorted(model_file.rglob("*"))
                          if f.is_file()]
            else:
                files.append((model_file.name, "model"))
            files += [(writer.manifest_path(model_file).name, "runtime_manifest"),
                      (writer.tokenizer_path(model_file).name, "tokenizer")]
            runtime = target
            notes.append(f"the {model_file.suffix} has no chat template: apply manifest.json chat.template "
                         "before tokenizing")
        if model_format == "gguf" and app in ("ios", "android"):
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            files.append(("tokenizer.json", "tokenizer"))
        if template is not None:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
            files.append(("chat_template.jinja", "chat_template"))

        ram = _ram_estimate(model_file if model_format == "gguf" else source, device, ctx)
        if model_format != "gguf":
            ram["model_bytes"] = sum(f.stat().st_size for f in model_file.rglob("*") if f.is_file()) \
                if model_file.is_dir() else model_file.stat().st_size
            ram["estimate_bytes"] = ram["model_bytes"] + ram["kv_cache_bytes"] + ram["overhead_bytes"]
            ram["method"] += f"; weights sized by the {model_file.suffix} " + \
                ("package" if model_file.is_dir() else "file")
        manifest: dict[str, Any] = {
            "$schema": SCHEMAS[MANIFEST_VERSION],
            "manifest_version": MANIFEST_VERSION,
            "app": app,
            "runtime": runtime,
            "created_by": f"ondevice {__version__}",
            "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "model": {"name": name, "architecture": arch, "format": "mlpackage" if model_format == "coreml"
                      else model_format, "file": model_file.name,
                      "file_type": "directory" if model_file.is_dir() else "file",
                      "quantization": quantization, "context_length": context_length, "recommended_context": ctx,
                      "vocab_size": vocab_size, "source": str(model)},
            "files": [],
            "chat": {"template": template, "bos_token": bos, "add_bos": bool(codec.add_bos), "eos_tokens": eos,
                     "stop": [e["text"] for e in eos if e["text"]]},
            "sampling": sampling,
            "ram": ram,
            "notes": notes,
        }
        if license_name:
            manifest["model"]["license"] = str(license_name)
        if model_format == "coreml":
            manifest["coreml"] = _coreml_block(model_file)
        if template is not None:
            manifest["chat"]["template_file"] = "chat_template.jinja"
        (tmp / "README.md").write_text(_readme(manifest), encoding="utf-8")
        files.append(("README.md", "readme"))
        manifest["files"] = [{"path": rel, "role": role, "bytes": (tmp / rel).stat().st_size,
                              "sha256": _sha256(tmp / rel)} for rel, role in files]
        validate_manifest(manifest)  # a bundle with an invalid manifest never appears
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return BundleResult(app=app, output=out_dir, manifest=manifest, notes=notes)


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _gguf_quant(path: Path) -> str:
    from ondevice.bench.artifacts import describe_artifact

    return describe_artifact(path).quant


def _export_converted(source: Path, folder: Path, target: str, quant: str, max_seq: int,
                      progress: bool) -> tuple[Path, str, Any]:
    """The ExecuTorch .pte or the Core ML .mlpackage (each with its runtime manifest + tokenizer beside it)
    through ondevice's own target; returns (model path, scheme, the target module)."""
    from ondevice.converters import get_target
    from ondevice.sources import open_source

    writer = get_target(target)
    scheme, _ = writer.TARGET.resolve_quant(quant)
    options_class = writer.ExecuTorchOptions if target == "executorch" else writer.CoreMLOptions
    options = options_class(quant=scheme, force=True, progress=progress, max_seq_len=max_seq)
    out = folder / f"{source.stem}.{scheme}{writer.TARGET.suffix}"
    canonical = open_source(source)
    try:
        writer.convert(canonical, out, options)
    finally:
        canonical.close()
    return out, scheme, writer


def _coreml_block(package: Path) -> dict[str, Any]:
    """manifest.json's coreml block, from the converter's runtime manifest beside the package."""
    from ondevice.converters.coreml import manifest_path

    runtime = json.loads(manifest_path(package).read_text(encoding="utf-8"))
    return {"package": package.name, "runtime_manifest": manifest_path(package).name, "inputs": runtime["inputs"],
            "states": runtime["states"], "outputs": ["logits (1, S, vocab) fp16"],
            "max_seq_len": int(runtime["max_seq_len"]), "minimum_deployment_target": "iOS18",
            "compute_precision": "fp16", "block_size": runtime.get("block_size")}
