"""Bad input gets a one-line error, a non-zero exit, and no partial output."""

from __future__ import annotations

import json
import shutil
import struct
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
    assert_clean_failure(code, err, out_dir(tmp_path), "not valid JSON")


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


def _rewrite_safetensors_header(path: Path, edit, raw: dict[str, str] | None = None) -> None:
    """Edit the header as JSON (`edit` may return a replacement), then replace raw text (for what json.dumps cannot
    write, e.g. a 5000-digit int)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header = edit(header) or header
    blob = _replace_raw(json.dumps(header), raw).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + length :])


def _alias(first: str, second: str):
    """Point `second` at the bytes of `first` (same size): two tensors sharing storage."""
    def edit(header: dict) -> None:
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
    return edit


def _shift_into_previous(header: dict) -> None:
    """The last tensor in the data moved 4 bytes back into its predecessor, and listed first in the header."""
    offsets, name = max((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    header[name]["data_offsets"] = [offsets[0] - 4, offsets[1] - 4]
    header.update({name: header.pop(name), **{k: header.pop(k) for k in list(header) if k != name}})


def _replace_raw(text: str, raw: dict[str, str] | None) -> str:
    for old, new in (raw or {}).items():
        text = text.replace(old, new)
    return text


def _edit_config(edit, raw: dict[str, str] | None = None):
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(_replace_raw(json.dumps(config), raw))
    return mutate


def _write(name: str, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


def _edit_tokenizer(edit):
    def mutate(folder: Path) -> None:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        edit(data)
        (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return mutate


def _rename_token(data: dict) -> None:
    """A flipped bit in a vocab string: 'Ġt' (used by a merge) becomes 'Št', so the merge names a missing token."""
    vocab = data["model"]["vocab"]
    vocab["\u0160t"] = vocab.pop("\u0120t")


def _lone_surrogate(data: dict) -> None:
    vocab = data["model"]["vocab"]
    vocab["\udc80" + "ine"] = vocab.pop("ine")


Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
HOSTILE_FOLDERS = {
    # id: (mutation, file named in the message, more text the message must hold)
    "overlapping-offsets": (lambda f: _rewrite_safetensors_header(f / "model.safetensors", _alias(O_PROJ, Q_PROJ)),
                            "model.safetensors", [Q_PROJ, O_PROJ, "overlap"]),
    "overlap-out-of-order": (lambda f: _rewrite_safetensors_header(f / "model.safetensors", _shift_into_previous),
                             "model.safetensors", ["overlap"]),
    "deep-safetensors-header": (lambda f: f.joinpath("model.safetensors").write_bytes(
        struct.pack("<Q", 100000) + b"[" * 100000), "model.safetensors", ["nested too deeply"]),
    "shape-10**30": (lambda f: _rewrite_safetensors_header(
        f / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=[10**30])), "model.safetensors",
        ["model.norm.weight"]),
    "shape-whose-int64-size-wraps-to-0": (lambda f: _rewrite_safetensors_header(
        f / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=[2**62, 4], data_offsets=[0, 0])),
        "model.safetensors", ["model.norm.weight"]),
    "dtype-array": (lambda f: _rewrite_safetensors_header(
        f / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype=["F32"])), "model.safetensors",
        ["model.norm.weight"]),
    "5000-digit-offset": (lambda f: _rewrite_safetensors_header(
        f / "model.safetensors", lambda h: h["model.norm.weight"].update(data_offsets=["9" * 5000, 1]),
        raw={'"' + "9" * 5000 + '"': "9" * 5000}), "model.safetensors", ["not valid JSON"]),
    "header-array": (lambda f: _rewrite_safetensors_header(f / "model.safetensors", lambda h: [1]),
                     "model.safetensors", ["not a JSON object"]),
    "5000-digit-int-config": (_edit_config(lambda c: c.update(rope_theta="9" * 5000),
                                           raw={'"' + "9" * 5000 + '"': "9" * 5000}), "config.json", ["5000"]),
    **{f"deep-{name}": (_write(name, b"[" * 100000), name, ["nested too deeply"])
       for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")},
    "deep-object-config": (_write("config.json", b'{"a":' * 100000), "config.json", ["nested too deeply"]),
    "tokenizer-array": (_write("tokenizer.json", b"[]"), "tokenizer.json", ["not a Hugging Face tokenizers file"]),
    "tokenizer-number": (_write("tokenizer.json", b"7"), "tokenizer.json", ["not a Hugging Face tokenizers file"]),
    "tokenizer-no-model": (_write("tokenizer.json", b'{"version": "1.0"}'), "tokenizer.json", ["'model'"]),
    "tokenizer-invalid-utf8": (_write("tokenizer.json", b'{"version": "\xff\xfe"}'), "tokenizer.json", ["UTF-8"]),
    "tokenizer-utf16": (_write("tokenizer.json", '{"model": {}}'.encode("utf-16")), "tokenizer.json", ["UTF-8"]),
    "tokenizer-lone-surrogate": (_edit_tokenizer(_lone_surrogate), "tokenizer.json", ["surrogate"]),
    "tokenizer-flipped-token": (_edit_tokenizer(_rename_token), "tokenizer.json", ["out of vocabulary"]),
    "tokenizer-vocab-array": (_edit_tokenizer(lambda d: d["model"].update(vocab=[1, 2])), "tokenizer.json",
                              ["tokenizers"]),
    "tokenizer-config-array": (_write("tokenizer_config.json", b"[1]"), "tokenizer_config.json", ["JSON object"]),
    "generation-config-utf8": (_write("generation_config.json", b'{"x": "\xc3"}'), "generation_config.json",
                               ["UTF-8"]),
}


@pytest.mark.parametrize("case", list(HOSTILE_FOLDERS))
def test_hostile_hf_files_are_one_line_errors_everywhere(broken_copy, tmp_path, capsys, case):
    """Hugging Face files are untrusted: each mutation is one line naming the file, the same from convert, inspect
    and open_source (never RecursionError, TypeError, UnicodeError or tokenizers' bare Exception)."""
    from ondevice.errors import InvalidModelError
    from ondevice.sources import open_source

    mutate, file_name, needles = HOSTILE_FOLDERS[case]
    mutate(broken_copy)
    out = out_dir(tmp_path)
    code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "--pre", "gpt-2", "-o", str(out / "m.gguf"),
                         "--no-progress"], capsys)
    assert_clean_failure(code, err, out, str(broken_copy / file_name))
    assert code == 1 and all(n in err for n in needles), err
    code, inspect_err = run_cli(["inspect", str(broken_copy)], capsys)
    assert code == 1 and inspect_err == err, (inspect_err, err)
    with pytest.raises(InvalidModelError) as exc:
        open_source(broken_copy)
    assert f"ondevice: error: {exc.value}" == err


def test_fuzz_tokenizer_json_bit_flips(broken_copy, tmp_path, capsys):
    """Seeded bit flips in the vocabulary and merges of tokenizer.json: convert and inspect agree on every mutant,
    and a rejection is one line naming the file."""
    import random

    tokenizer = broken_copy / "tokenizer.json"
    original = tokenizer.read_bytes()
    start = original.index(b'"vocab"')
    # Letters inside token strings: a flip there mostly keeps the JSON valid and renames a token (or makes the
    # bytes invalid UTF-8), the mutations that reach `tokenizers` and our own vocabulary code.
    letters = [i for i in range(start + len(b'"vocab"'), len(original)) if chr(original[i]).isalpha()]
    rng = random.Random(7)
    out = out_dir(tmp_path)
    outcomes = {0: 0, 1: 0}
    for _ in range(40):
        mutated = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.choice(letters)] ^= 1 << rng.randrange(8)
        tokenizer.write_bytes(bytes(mutated))
        code, err = run_cli(["convert", str(broken_copy), "--to", "gguf", "--pre", "gpt-2", "-o", str(out / "m.gguf"),
                             "--no-progress"], capsys)
        inspect_code, inspect_err = run_cli(["inspect", str(broken_copy)], capsys)
        assert code in (0, 1) and inspect_code == code, (bytes(mutated[start:]), err, inspect_err)
        if code:
            assert_clean_failure(code, err, out, str(tokenizer))
            assert inspect_err == err
        else:
            (out / "m.gguf").unlink()
        outcomes[code] += 1
    assert outcomes[1] >= 10, outcomes


def _writer_mid_write(target: Path, directory: bool):
    """A real writer of `target` in a child process, stopped while its partial output is open."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ondevice.formats.atomic import atomic_output\n"
        f"with atomic_output(Path({str(target)!r}), directory={directory}) as tmp:\n"
        "    fh = open(tmp / 'model.safetensors' if tmp.is_dir() else tmp, 'wb')\n"
        "    fh.write(b'half a model'); fh.flush()\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(120)\n"
    )
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        partial = Path(child.stdout.readline().strip())
        assert partial.exists() and str(child.pid) in partial.name, partial
    except BaseException:
        child.kill()
        raise
    return child, partial


def test_stale_partials_of_a_killed_convert_are_removed_on_the_next_write(tiny_models, tmp_path, capsys):
    import os

    out = out_dir(tmp_path)
    target = out / "m.gguf"
    # Both writers run at once (the second leaves the first's partial alone: its writer is alive), then kill -9.
    writers = [_writer_mid_write(target, directory=False), _writer_mid_write(target, directory=True)]
    for child, _ in writers:
        child.kill()  # SIGKILL: no finally, no atexit, exactly what kill -9 leaves behind
        child.wait(timeout=30)
    (_, stale_file), (_, stale_folder) = writers
    assert stale_file.is_file() and stale_folder.is_dir()
    live = out / f".m.gguf.{os.getpid()}.0123abcd.partial"  # this process is alive: still being written
    live.write_bytes(b"in progress")
    others = [out / f".other.gguf.{stale_file.name.split('.')[3]}.0123abcd.partial",  # another output's
              out / ".m.gguf.0123abcd.partial", out / "m.gguf.notes"]  # not our exact pattern
    for other in others:
        other.write_bytes(b"not ours to remove")
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--pre", "gpt-2", "-o", str(target),
                         "--no-progress"], capsys)
    assert code == 0 and target.read_bytes()[:4] == b"GGUF"
    assert not stale_file.exists() and not stale_folder.exists()
    notes = [line for line in err.splitlines() if "left by a killed run" in line]
    assert len(notes) == 1 and stale_file.name in notes[0] and stale_folder.name in notes[0], err
    assert live.read_bytes() == b"in progress" and all(p.exists() for p in others)
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--pre", "gpt-2", "-o", str(target),
                         "--no-progress", "--force"], capsys)
    assert code == 0 and "killed run" not in err and live.exists()  # nothing stale the second time


def test_a_flag_of_another_target_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    """Each target declares its own options: --block-size means nothing to gguf and is not silently ignored."""
    d = out_dir(tmp_path)
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--block-size", "32",
                         "-o", str(d / "x.gguf"), "--no-progress"], capsys)
    assert_clean_failure(code, err, d, "--block-size does not apply to --to gguf (it is for --to onnx, coreml)")
    code, err = run_cli(["convert", str(tiny_models["llama"]), "--to", "mlx", "--no-calibrate",
                         "-o", str(d / "m"), "--no-progress"], capsys)
    assert_clean_failure(code, err, d, "--no-calibrate does not apply to --to mlx")


def test_convert_help_groups_the_options_by_target(capsys):
    with pytest.raises(SystemExit):
        cli(["convert", "--help"])
    text = capsys.readouterr().out
    for group in ("--to mlx, executorch options:", "--to onnx, coreml options:", "--to executorch, coreml options:",
                  "--to coreml options:"):
        assert group in text
    assert "q6_k" in text
