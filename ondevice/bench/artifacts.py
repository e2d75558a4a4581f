"""Benchmark inputs: the facts the harness records about it, and sources
converted on the fly (cached under the user cache dir, keyed by the source's content hash and the settings)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ondevice.errors import OndeviceError
from ondevice.inspectors import FTYPE_NAMES, disk_size
from ondevice.inspectors.kinds import GGUF, HF, ONNX, artifact_kind

__all__ = ["Artifact", "ModelShape", "artifact_kind", "converted_artifact", "describe_artifact", "resolve_artifacts"]

@dataclass(frozen=True)
class ModelShape:
    """The architecture facts a memory/bandwidth estimate needs."""

    n_params: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int

    def kv_bytes_per_position(self, bytes_per_element: float = 2) -> int:
        """K and V of one token across all layers (f16 cache by default, as llama.cpp keeps it; q8_0's 34/32 bytes
        a value are exact for the head sizes it accepts)."""
        return round(2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element)


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str
    model: str  # the model's label in the results (same for every quantization of one model)
    quant: str
    size_bytes: int
    weight_bytes_per_token: int  # weight bytes one decoded token reads (the roofline's numerator)
    shape: ModelShape | None = None
    source: str | None = None  # what it was converted from, when converted on the fly

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _gguf_facts(path: Path) -> tuple[str, str, int, ModelShape | None]:
    """(label, quant, weight bytes per token, shape) from a GGUF's metadata and tensor table."""
    from ondevice.formats.gguf import GGUFFile

    with GGUFFile(path) as gguf:
        arch = str(gguf.get("general.architecture", ""))
        basename, size_label = gguf.get("general.basename"), gguf.get("general.size_label")
        label = f"{basename}-{size_label}" if basename and size_label else str(gguf.get("general.name") or path.stem)
        ftype = gguf.get("general.file_type")
        quant = FTYPE_NAMES.get(int(ftype), f"ftype{int(ftype)}") if ftype is not None else "unknown"
        total = sum(info.nbytes for info in gguf.tensors.values())
        embed = gguf.tensors.get("token_embd.weight")
        if embed is not None and "output.weight" in gguf.tensors:
            # Untied: the embedding table is only looked up (one row per token), never streamed whole.
            total -= embed.nbytes - embed.nbytes // embed.shape[0]

        def meta(key: str, default: int = 0) -> int:
            value = gguf.get(f"{arch}.{key}")
            return int(value) if value is not None else default

        shape = None
        if meta("block_count"):
            heads = meta("attention.head_count", 1)
            width = meta("embedding_length")
            vocab = meta("vocab_size") or len(gguf.get("tokenizer.ggml.tokens", []) or [])
            shape = ModelShape(
                n_params=sum(_numel(info.shape) for info in gguf.tensors.values()),
                n_layers=meta("block_count"), n_kv_heads=meta("attention.head_count_kv", heads),
                head_dim=meta("attention.key_length") or width // max(heads, 1), hidden_size=width,
                vocab_size=vocab, context_length=meta("context_length"))
    return label, quant, total, shape


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _hf_facts(path: Path) -> tuple[str, str, int, ModelShape | None]:
    from ondevice.sources import open_source

    model = open_source(path)
    try:
        spec = model.spec
        dtypes = {t.source_dtype for t in model.tensors.values()}
        n_params = sum(t.numel for t in model.tensors.values())
        weights = sum(p.stat().st_size for p in path.glob("*.safetensors")) or n_params * 4
        shape = ModelShape(n_params=n_params, n_layers=spec.n_layers, n_kv_heads=spec.n_kv_heads,
                           head_dim=spec.head_dim, hidden_size=spec.hidden_size, vocab_size=spec.vocab_size,
                           context_length=spec.context_length)
    finally:
        model.close()
    return path.name, "+".join(sorted(dtypes)).lower(), weights, shape


def _target_facts(path: Path) -> tuple[str, str, int, ModelShape | None]:
    """(label, quant, weight bytes per token, shape) of an MLX / ONNX / .pte / Core ML artifact, from its inspector."""
    from ondevice.inspectors import inspect_artifact

    info = inspect_artifact(path)
    spec = info.get("spec") or {}
    shape = None
    if all(spec.get(k) for k in ("n_layers", "n_kv_heads", "head_dim", "hidden_size", "vocab_size")):
        shape = ModelShape(n_params=int(info.get("parameters") or 0), n_layers=spec["n_layers"],
                           n_kv_heads=spec["n_kv_heads"], head_dim=spec["head_dim"], hidden_size=spec["hidden_size"],
                           vocab_size=spec["vocab_size"], context_length=int(spec.get("context_length") or 0))
    label = path.stem if path.suffix in (".pte", ".mlpackage", ".onnx") else path.name
    return label, str(info.get("quant") or "unknown"), int(info.get("weight_bytes") or info["size_bytes"]), shape


def describe_artifact(path: Path, *, label: str | None = None, quant: str | None = None,
                      source: str | None = None) -> Artifact:
    path = Path(path)
    kind = artifact_kind(path)
    if kind == ONNX and path.is_file() and (path.parent / "genai_config.json").is_file():
        path = path.parent  # the graph's folder is the artifact (external weights, config, tokenizer)
    size = disk_size(path)
    if kind == GGUF:
        found_label, found_quant, weights, shape = _gguf_facts(path)
    elif kind == HF:
        found_label, found_quant, weights, shape = _hf_facts(path)
    else:
        found_label, found_quant, weights, shape = _target_facts(path)
    return Artifact(path=path, kind=kind, model=label or found_label, quant=quant or found_quant, size_bytes=size,
                    weight_bytes_per_token=weights, shape=shape, source=source)


def content_hash(path: Path) -> str:
    """SHA-256 over a file, or over a folder's files (relative names and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _label_for(name: str, path: Path) -> str | None:
    """An alias labels itself; a path gets its label from the file's own metadata."""
    from ondevice.hub import MODELS

    return name.lower() if name.lower() in MODELS else None


def converted_artifact(source_name: str, to: str, quant: str, *, progress: bool = True,
                       label: str | None = None, out_dir: Path | None = None) -> Artifact:
    """The source converted to `to`/`quant`, from the cache (or `out_dir`) or converted now (atomically) into it."""
    from ondevice.converters import get_target
    from ondevice.hub import cache_dir, resolve_model
    from ondevice.sources import open_source

    writer = get_target(to)
    scheme, _note = writer.TARGET.resolve_quant(quant)
    src = resolve_model(source_name)
    key = content_hash(src)[:16]
    out = (out_dir or cache_dir() / "bench" / "artifacts") / f"{src.name.removesuffix('.gguf')}-{key}-{to}-{scheme}" \
        f"{writer.TARGET.suffix}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"ondevice bench: converting {source_name} to {to} {scheme} (cached as {out})", file=sys.stderr)
        model = open_source(src)
        try:
            writer.convert(model, out, writer.TARGET.options(quant=scheme, progress=progress))
        finally:
            model.close()
    source_label = label or _label_for(source_name, src) or describe_artifact(src).model
    return describe_artifact(out, label=source_label, quant=scheme, source=str(src))


def resolve_artifacts(models: list[str], *, to: str | None = None, quants: list[str] | None = None,
                      progress: bool = True, label: str | None = None) -> list[Artifact]:
    """MODEL arguments -> artifacts: as given, or converted to each target of `to` ("gguf,mlx,onnx") at each of
    `quants` (generic names like 4bit/8bit mean each target's own scheme) when `to` is set."""
    from ondevice.converters import get_target
    from ondevice.hub import resolve_model

    if quants and not to:
        raise OndeviceError("--quant needs --to (the target format to convert the sources to)")
    targets = list(dict.fromkeys(t.strip() for t in (to or "").split(",") if t.strip()))
    for target in targets:
        for quant in quants or []:
            get_target(target).TARGET.resolve_quant(quant)  # every pair checked before the first conversion
    out: list[Artifact] = []
    for name in models:
        if targets:
            for target in targets:
                for quant in quants or [get_target(target).TARGET.default_quant]:
                    out.append(converted_artifact(name, target, quant, progress=progress, label=label))
        else:
            path = resolve_model(name)
            out.append(describe_artifact(path, label=label or _label_for(name, path)))
    return out
