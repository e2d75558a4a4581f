"""Hugging Face checkpoint folder -> CanonicalModel (safetensors via mmap; pickles refused by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ondevice.architectures import architecture_for_hf_config
from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.formats.safetensors import FLOAT_DTYPES, SafetensorsFile
from ondevice.model import CanonicalModel, LazyTensor

# Buffers some checkpoints carry that are recomputed at load time.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    """An untrusted JSON object file of the folder (bad UTF-8, nesting, surrogates: one-line errors naming it)."""
    from ondevice.tokenizer import read_json_object

    if not path.exists():
        if required:
            raise InvalidModelError(f"{path.parent}: {path.name} is missing; is this a Hugging Face model folder?")
        return None
    return read_json_object(path)


def _safetensors_shards(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = (read_json(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidModelError(f"{index}: no weight_map")
        shards = []
        for name in sorted(set(weight_map.values())):
            shard = (folder / str(name)).resolve()
            if shard.parent != folder.resolve():
                raise InvalidModelError(f"{index}: shard {name!r} points outside the model folder")
            if not shard.exists():
                raise InvalidModelError(f"{index}: shard {name} is missing")
            shards.append(shard)
        return shards
    if any(folder.glob("pytorch_model*.bin")):
        return []
    raise InvalidModelError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def _pickle_tensors(folder: Path, allow_pickle: bool) -> dict[str, LazyTensor]:
    if not allow_pickle:
        raise UnsupportedError(
            f"{folder}: only pytorch_model.bin pickles found; pickles can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle if you trust this folder"
        )
    try:
        import torch
    except ImportError:
        raise UnsupportedError("loading pytorch_model.bin needs torch: pip install torch==2.13.0") from None
    tensors: dict[str, LazyTensor] = {}
    for shard in sorted(folder.glob("pytorch_model*.bin")):
        state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        for name, value in state.items():
            tensors[name] = LazyTensor(name, tuple(value.shape), str(value.dtype).removeprefix("torch."),
                                       lambda v=value: v.float().numpy())
    return tensors


def _safetensors_tensors(shards: list[Path]) -> tuple[dict[str, LazyTensor], list[SafetensorsFile]]:
    tensors: dict[str, LazyTensor] = {}
    files = []
    for shard in shards:
        st = SafetensorsFile(shard)
        files.append(st)
        for name, info in st.tensors.items():
            if info.dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"{shard}: tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16")
            if name in tensors:
                raise InvalidModelError(f"{shard}: tensor {name!r} appears in two shards")
            tensors[name] = LazyTensor(name, info.shape, info.dtype.lower(), lambda st=st, n=name: st.load_f32(n))
    return tensors, files


def open_hf_folder(path: str | Path, allow_pickle: bool = False) -> CanonicalModel:
    from ondevice.chat_template import load_chat_template
    from ondevice.tokenizer import read_tokenizer_file, special_tokens_from_hf

    folder = Path(path)
    where = str(folder)
    config = read_json(folder / "config.json")
    assert config is not None
    arch = architecture_for_hf_config(config, where)
    spec = arch.spec_from_hf(config, where)
    shards = _safetensors_shards(folder)
    if shards:
        found, files = _safetensors_tensors(shards)
    else:
        found, files = _pickle_tensors(folder, allow_pickle), []
    expected = arch.tensor_shapes(spec)
    tensors: dict[str, LazyTensor] = {}
    for name, shape in expected.items():
        tensor = found.get(name)
        if tensor is None:
            raise InvalidModelError(f"{where}: tensor {name!r} is missing from the checkpoint")
        if tensor.shape != shape:
            raise InvalidModelError(f"{where}: tensor {name!r} has shape {tensor.shape}, config implies {shape}")
        tensors[name] = tensor
    for name in found:
        if name not in expected and not name.endswith(_IGNORED_SUFFIXES) and name != "lm_head.weight":
            raise UnsupportedError(f"{where}: unexpected tensor {name!r} for architecture {arch.name}")

    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise InvalidModelError(f"{where}: tokenizer.json is missing (ondevice needs the fast tokenizer file)")
    tokenizer_json, tokenizer_dict = read_tokenizer_file(tokenizer_path)
    tokenizer_config = read_json(folder / "tokenizer_config.json", required=False)
    generation_config = read_json(folder / "generation_config.json", required=False) or {}
    special = special_tokens_from_hf(tokenizer_config, generation_config, tokenizer_dict, config)
    # Distinct ids: SentencePiece-style files (Gemma's) list their thousands of added tokens in the vocab too.
    vocab_ids = tokenizer_dict.get("model", {}).get("vocab", {})
    ids = set(vocab_ids.values()) if isinstance(vocab_ids, dict) else set()
    ids.update(a.get("id") for a in tokenizer_dict.get("added_tokens") or [] if isinstance(a, dict))
    vocab_in_tokenizer = len(ids)
    if vocab_in_tokenizer > spec.vocab_size + 1024:
        raise InvalidModelError(f"{where}: tokenizer has {vocab_in_tokenizer} tokens, model vocab is {spec.vocab_size}")

    def close() -> None:
        for st in files:
            st.close()

    return CanonicalModel(
        spec=spec,
        tensors=tensors,
        tokenizer_json=tokenizer_json,
        special=special,
        chat_template=load_chat_template(folder),
        generation_config=generation_config,
        metadata={"general.name": spec.name},
        source_path=where,
        source_format="hf",
        close=close,
    )

