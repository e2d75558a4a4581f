"""Phone-app bundles: `ondevice export MODEL --app {pocketpal,ios,android,react-native} -o DIR`.

A bundle is a folder an app can ship or side-load: the model file (or package folder), the tokenizer and chat
template, and manifest.json (format: ondevice/data/schemas/app-bundle-manifest.v2.schema.json; version 1 bundles
still validate against the v1 schema) with the context length, stop tokens, recommended sampling and a RAM
estimate from `ondevice fit`. The manifest is validated against the
schema before the bundle appears; the folder is built beside DIR and renamed into place, so a failed export
leaves nothing behind.

What each app gets:
- pocketpal: the GGUF (PocketPal AI and other llama.cpp apps read the chat template from it) + manifest.

Apps that import the .gguf alone show its general.name and stop on the end-of-generation ids llama.cpp reads from
its metadata, so an exported GGUF carries the display name (--name, or one derived from the file/repo name when
general.name is a training-run slug) and explicit tokenizer.ggml.eos_token_id / eot_token_id; everything else in
the file is copied unchanged.
- ios: by default the GGUF for llama.cpp-based apps (llama.cpp's Swift package; see apps/ios), tokenizer.json and
  the chat template beside it; with --format coreml a Core ML .mlpackage (ondevice's coreml target: mlprogram
  for iOS 18 with a stateful KV cache, int4 by default) with its tokenizer and runtime manifest beside it, the
  manifest's coreml block saying how to drive it.
- android: with --format pte, an ExecuTorch .pte (ondevice's executorch target: XNNPACK, its own runtime
  manifest and tokenizer.json beside it, see apps/android); by default the GGUF for llama.cpp on Android.
- react-native: what the @ondevice/react-native SDK (sdk/react-native) loads: by default the GGUF for llama.rn;
  with --format pte the ExecuTorch .pte and its tokenizer.json for react-native-executorch. Both get a
  tokenizer_config.json (chat_template, bos/eos tokens: what react-native-executorch reads its template from) and
  chat_template.jinja beside the model.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field, replace
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
APPS = ("pocketpal", "ios", "android", "react-native")
FORMATS = {"pocketpal": ("gguf",), "ios": ("gguf", "coreml"), "android": ("gguf", "pte"),
           "react-native": ("gguf", "pte")}
CONVERTED = {"pte": ("executorch", "8da4w"), "coreml": ("coreml", "int4")}  # format -> (target, default quant)
DEFAULT_DEVICE = {"pocketpal": "pixel-8", "ios": "iphone-15-pro", "android": "pixel-8", "react-native": "pixel-8"}
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


# Words of training-run names ("8k-lc100k-mix1-ep2") that llama.cpp's converter turns into a general.name such as
# "Smollm2 135M 8k Lc100K Mix1 Ep2": a name like this is not one to show people.
_RUN_SLUG = re.compile(r"(?i)(?<![a-z])(?:(?:ep|epoch|step|steps|ckpt|checkpoint|mix|run|iter|seed)[-_ ]?\d+"
                       r"|lc\d+k)(?![a-z])")
_QUANT_SUFFIX = re.compile(r"(?i)[._-](?:i?q\d(?:_[0-9a-z]+)*|f16|f32|bf16|fp16|fp32|\d+bit)$")
_GENERIC_STEMS = frozenset(["model", "ggml-model", "out", "output", "gguf"])


def _clean_name(text: str) -> str:
    return " ".join(re.sub(r"[-_]+", " ", text).split())


def display_name(gguf: Any, source: Path) -> tuple[str, str | None]:
    """(the name to show in apps, why it differs from general.name or None). general.name is kept unless it is
    missing or looks like a training-run slug; then the repository or file name the model came under is used
    ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2 135M Instruct")."""
    raw = gguf.get("general.name")
    raw = raw.strip() if isinstance(raw, str) else ""
    if raw and not _RUN_SLUG.search(raw) and raw.lower() not in _GENERIC_STEMS:
        return raw, None
    candidates = []
    for key in ("general.source.huggingface.repository", "general.source.url"):
        value = gguf.get(key)
        if isinstance(value, str) and value.strip("/"):
            candidates.append(value.strip("/").rsplit("/", 1)[-1])
    stem = source.name.removesuffix(".gguf")
    while _QUANT_SUFFIX.search(stem):
        stem = _QUANT_SUFFIX.sub("", stem)
    if stem.lower() not in _GENERIC_STEMS:
        candidates.append(stem)
    parts = [gguf.get(k) for k in ("general.basename", "general.size_label")]
    if all(isinstance(p, str) and p for p in parts):
        candidates.append(" ".join(parts))
    for candidate in candidates:
        name = _clean_name(candidate)
        if name and re.search(r"[A-Za-z]", name) and not _RUN_SLUG.search(name):
            why = ("the GGUF has no general.name" if not raw else f"general.name {raw!r} is a placeholder"
                   if raw.lower() in _GENERIC_STEMS else f"general.name {raw!r} looks like a training-run name")
            return name, why
    return raw or _clean_name(source.stem) or "model", None


def _end_of_turn_id(vocab: Any, template: str | None) -> int | None:
    """The end-of-generation token the chat template closes each turn with (<|im_end|>, <|eot_id|>,
    <end_of_turn>...): the one it names most often; None without a template or such a token."""
    from ondevice.tokenizer import eog_ids

    if not template:
        return None
    counts = {tid: template.count(vocab.tokens[tid]) for tid in eog_ids(vocab) if vocab.tokens[tid]}
    named = [tid for tid, n in counts.items() if n and tid != vocab.bos_id]
    return max(named, key=lambda tid: (counts[tid], -tid)) if named else None


def stop_token_metadata(vocab: Any, template: str | None) -> dict[str, int]:
    """tokenizer.ggml.* ids to add so that an app reading only the GGUF stops where the model needs it to: EOT
    (the template's end-of-turn token) and EOS when the file does not set them."""
    from ondevice.tokenizer import eog_ids

    added: dict[str, int] = {}
    eot = _end_of_turn_id(vocab, template)
    if vocab.eot_id is None and eot is not None:
        added["tokenizer.ggml.eot_token_id"] = eot
    if vocab.eos_id is None:
        fallback = eot if eot is not None else next(iter(eog_ids(vocab)), None)
        if fallback is not None:
            added["tokenizer.ggml.eos_token_id"] = fallback
    return added


def _write_gguf_copy(source: Any, target: Path, changes: dict[str, Any]) -> None:
    """The source GGUF with some metadata replaced: tensors byte for byte, same order and alignment."""
    from ondevice.formats.gguf import PlannedTensor, write_gguf
    from ondevice.formats.safetensors import release_pages

    planned = [PlannedTensor(name, info.shape, info.ggml_type, lambda n=name: source.tensor_data(n))
               for name, info in source.tensors.items()]

    def done(tensor: PlannedTensor) -> None:  # keep RSS near one tensor, not the model size
        info = source.tensors[tensor.name]
        release_pages(source._mmap, info.offset, info.nbytes)

    write_gguf(target, {**source.fields, **changes}, planned, alignment=source.alignment, on_tensor=done)


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


def tokenizer_config(template: str | None, bos: str | None, add_bos: bool, stops: list[str],
                     ctx: int) -> dict[str, Any]:
    """A Hugging Face style tokenizer_config.json with the chat template and special tokens: what
    react-native-executorch's chat session reads (chat_template, eos_token). The EOS is the stop token the template
    closes turns with (<|im_end|>, not <|endoftext|>), else the first stop."""
    eos = next((s for s in stops if template and s in template), stops[0] if stops else None)
    config: dict[str, Any] = {"bos_token": bos, "eos_token": eos, "add_bos_token": add_bos, "model_max_length": ctx}
    if template is not None:
        config["chat_template"] = template
    return config


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
                  name: str | None = None, force: bool = False, progress: bool = False) -> BundleResult:
    """Write a validated bundle for `app` into `out_dir` (see the module docstring); `name` is the display name
    (default: general.name, or one derived from the file name when that is a training-run slug)."""
    from ondevice.formats.gguf import GGUFFile, TypedValue, ValueType
    from ondevice.hub import resolve_model
    from ondevice.runtime.text import TextCodec
    from ondevice.sources.gguf import _vocab_from_gguf
    from ondevice.tokenizer import eog_ids

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
    if name is not None and (not name.strip() or "\n" in name):
        raise OndeviceError("--name must be a non-empty single line")
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
        notes: list[str] = []
        raw_name = gguf.get("general.name")
        if name is None:
            name, why = display_name(gguf, source)
            if why:
                notes.append(f"display name {name!r} ({why}; --name sets another)")
        name = name.strip()
        license_name = gguf.get("general.license")
        sampling = _sampling(gguf)
        tokenizer_json = codec.tokenizer.to_str()
        vocab = _vocab_from_gguf(gguf)
        stop_ids = stop_token_metadata(vocab, template)
    finally:
        gguf.close()
    for key, tid in stop_ids.items():
        notes.append(f"the GGUF gets {key} = {tid} ({codec.token_text(tid)}) so that apps reading only the file stop "
                     "at the end of a turn")
    vocab = replace(vocab, eos_id=stop_ids.get("tokenizer.ggml.eos_token_id", vocab.eos_id),
                    eot_id=stop_ids.get("tokenizer.ggml.eot_token_id", vocab.eot_id))
    # What llama.cpp will treat as end of generation in the exported file: the manifest lists exactly that.
    eos = [{"id": int(i), "text": codec.token_text(int(i))} for i in eog_ids(vocab)]
    bos = codec.token_text(codec.bos_id) if codec.bos_id is not None else None
    ctx = min(ctx or 2048, context_length)
    device = device or DEFAULT_DEVICE[app]
    gguf_changes = {key: TypedValue(ValueType.UINT32, tid) for key, tid in stop_ids.items()}
    if name != raw_name:
        gguf_changes["general.name"] = TypedValue(ValueType.STRING, name)

    with atomic_output(out_dir, force=force, directory=True) as tmp:
        files: list[tuple[str, str]] = []  # (relative path, role)
        if model_format == "gguf":
            model_file = tmp / source.name
            if gguf_changes:
                with GGUFFile(source) as original:
                    _write_gguf_copy(original, model_file, gguf_changes)
            else:
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
        if app == "react-native":
            config = tokenizer_config(template, bos, codec.add_bos, [e["text"] for e in eos if e["text"]], ctx)
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            files.append(("tokenizer_config.json", "tokenizer_config"))
            if template is None:
                notes.append("the model has no chat template: react-native-executorch needs one in "
                             "tokenizer_config.json, llama.rn falls back to plain prompts")

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
    options = writer.TARGET.options(quant=scheme, force=True, progress=progress, max_seq_len=max_seq)
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
