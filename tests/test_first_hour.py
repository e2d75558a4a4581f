"""What a new user hits in the first hour: messages about wrong files, argument order, the Python API's edges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ondevice
from ondevice.cli import main as cli


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("content, says", [(b"hello world\n", "not a GGUF file (it starts with b'hell'"),
                                           (b"", "an empty file")])
def test_run_says_what_the_file_is_not(tmp_path: Path, capsys, content: bytes, says: str) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    assert cli(["run", str(path), "-p", "hi"]) == 1
    line = _error_line(capsys)
    assert says in line and "convert" not in line


def test_convert_reports_a_missing_source_before_an_existing_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    assert cli(["convert", str(tmp_path / "missing.gguf"), "--to", "gguf", "-o", str(out)]) == 1
    assert "no such file or folder" in _error_line(capsys)
    assert out.read_bytes() == b"keep me"


def test_debug_is_accepted_after_the_subcommand(tmp_path: Path, capsys) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"nope")
    assert cli(["run", str(path), "--debug", "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "not a GGUF file" in err
    assert cli(["bench", "report", "--debug", "--db", str(tmp_path / "none.db")]) == 1


def test_convert_help_lists_every_gguf_scheme(capsys) -> None:
    from ondevice.converters import get_target

    with pytest.raises(SystemExit):
        cli(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for scheme in get_target("gguf").TARGET.quants:
        assert f" {scheme} " in text or f" {scheme}(" in text or f"{scheme} (4bit" in text, scheme


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user"}], "message 0 .user. has no 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}], "message 1: unknown role 'wizard'"),
    ([{"content": "hi"}], "message 0: unknown role None"),
    ([{"role": "user", "content": None}], "message 0 .user.: content must be a string, got NoneType"),
    (["hi"], "message 0 must be a dict"),
    ([], "non-empty list"),
])
def test_bad_messages_are_a_value_error_about_the_message(messages, says) -> None:
    from ondevice.runtime.model import check_messages

    with pytest.raises(ValueError, match=says) as caught:
        check_messages(messages)
    assert isinstance(caught.value, ondevice.OndeviceError) and "template" not in str(caught.value)


@pytest.mark.slow
def test_model_api_edges(smollm2: Path) -> None:
    with ondevice.load(smollm2, n_ctx=256) as model:
        assert "SmolLM2" in repr(model) and "llama" in repr(model) and "n_ctx=256" in repr(model)
        with pytest.raises(ondevice.OndeviceError, match="message 0 .user. has no 'content'"):
            model.chat([{"role": "user"}])
        with pytest.raises(ondevice.OndeviceError, match="unknown role 'wizard'"):
            model.chat([{"role": "wizard", "content": "hi"}])
        with pytest.raises(ondevice.OndeviceError, match="content must be a string"):
            model.chat([{"role": "user", "content": ["hi"]}])

        stream = model.generate([{"role": "user", "content": "Count from one to fifty in words."}],
                                max_tokens=64, temperature=0)
        pieces = [next(stream) for _ in range(8)]
        stream.close()  # what a Stop button does
        stats = model.last_stats
        assert pieces and stats.finish_reason == "stopped"
        assert 8 <= stats.generated_tokens < 64 and stats.decode_tok_s > 0
        data = json.loads(stats.to_json())
        assert data == json.loads(json.dumps(stats.to_dict())) and data["finish_reason"] == "stopped"
        assert "tokens" not in data and "first_token_at" not in data

        model.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert model.last_stats.finish_reason in ("length", "stop")
    assert "closed" in repr(model)
