"""Quality metrics (pure math) and `ondevice eval` on real models: the tiny f32 GGUF against its transformers
source, SmolLM2 q4_0 against q8_0 against an f32 reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ondevice.bench import quality
from ondevice.bench.backends import backend_class
from ondevice.bench.store import Store
from ondevice.cli import main as cli


def _direct_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL straight from the definition, with scipy-free float64 softmaxes (the check for the blocked version)."""
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits - q_logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return (p * np.log(p / q)).sum(-1)


def test_identical_logits_give_zero_kl_and_full_agreement():
    logits = np.random.default_rng(0).normal(size=(5, 100)).astype(np.float32) * 4
    assert np.all(quality.kl_divergence(logits, logits) == 0)
    assert quality.top1_agreement(logits, logits) == 1.0


def test_kl_matches_the_definition_across_blocks():
    rng = np.random.default_rng(1)
    rows = quality.BLOCK_ROWS * 2 + 7  # several blocks and a ragged last one
    p = rng.normal(size=(rows, 50)) * 3
    q = p + rng.normal(size=p.shape)
    got = quality.kl_divergence(p.astype(np.float32), q.astype(np.float32))
    want = _direct_kl(p.astype(np.float32).astype(np.float64), q.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(got > 0)


def test_kl_of_two_known_distributions():
    # P = (0.5, 0.5), Q = (0.9, 0.1): KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    ref = np.log(np.array([[0.5, 0.5]]))
    test = np.log(np.array([[0.9, 0.1]]))
    want = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert quality.kl_divergence(ref, test)[0] == pytest.approx(want, rel=1e-12)


def test_metrics_ignore_a_per_row_constant_and_survive_huge_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 30)) * 5
    shifted = logits + np.array([[1e4], [-3e3], [0.0], [77.0]])
    assert np.abs(quality.kl_divergence(logits, shifted)).max() < 1e-9
    targets = np.array([1, 2, 3, 4])
    assert quality.perplexity(shifted, targets) == pytest.approx(quality.perplexity(logits, targets), rel=1e-9)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    logits = np.zeros((10, 37), dtype=np.float32)
    assert quality.perplexity(logits, np.arange(10)) == pytest.approx(37.0, rel=1e-12)


def test_perplexity_of_a_sure_and_right_model_is_one():
    logits = np.full((3, 8), -1e4)
    logits[np.arange(3), [5, 1, 7]] = 0.0
    assert quality.perplexity(logits, np.array([5, 1, 7])) == pytest.approx(1.0)


def test_top1_agreement_counts_positions():
    ref = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    test = np.array([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    assert quality.top1_agreement(ref, test) == 0.5


def test_totals_aggregate_windows_like_one_long_window():
    rng = np.random.default_rng(3)
    ref, test = rng.normal(size=(40, 20)), rng.normal(size=(40, 20))
    targets = rng.integers(0, 20, size=40)
    whole = quality.QualityTotals()
    whole.add(ref, test, targets)
    parts = quality.QualityTotals()
    parts.add(ref[:15], test[:15], targets[:15])
    parts.add(ref[15:], test[15:], targets[15:])
    for key, value in whole.result().items():
        assert parts.result()[key] == pytest.approx(value, rel=1e-12)
    assert whole.result()["tokens"] == 40


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        quality.kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------------- real models
def _logits_backend() -> str:
    for name in ("ondevice", "llama.cpp"):
        if backend_class(name).unavailable_reason() is None:
            try:
                backend_class(name)().import_runtime()
            except ImportError:
                continue
            return name
    pytest.skip("no backend that returns logits is available")


def _convert(src: Path, out: Path, quant: str, *extra: str) -> Path:
    if not out.exists():
        assert cli(["convert", str(src), "--to", "gguf", "--quant", quant, "-o", str(out), "--no-progress",
                    *extra]) == 0
    return out


def _eval_json(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert cli(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_tiny_f32_gguf_scores_kl_zero_against_its_source(tiny_models, tmp_path, capsys):
    pytest.importorskip("torch")
    source = tiny_models["llama"]
    gguf = _convert(source, tmp_path / "tiny-f32.gguf", "f32", "--pre", "gpt-2")
    db = tmp_path / "bench.sqlite"
    backend = _logits_backend()
    [result] = _eval_json(capsys, str(gguf), "--ref", str(source), "--backend", backend, "--ctx", "32",
                          "--max-tokens", "96", "--db", str(db))
    assert result["ref_backend"] == "transformers"
    assert result["tokens"] >= 90
    assert result["kl_mean"] < 1e-6 and result["kl_max"] < 1e-5
    assert result["top1_agreement"] == 1.0
    assert result["perplexity"] == pytest.approx(result["ref_perplexity"], rel=1e-4)
    with Store(db) as store:
        [row] = store.measurements(kind="quality")
    assert row["status"] == "ok" and row["backend"] == backend and row["quant"] == "f32"
    assert row["kl_mean"] == pytest.approx(result["kl_mean"]) and row["eval_tokens"] == result["tokens"]


def test_smollm2_q4_is_worse_than_q8(smollm2, tmp_path, capsys):
    """Reference: the f32 dequantization of the original Q4_1 weights; q8_0 and q4_0 re-quantize it."""
    backend = "llama.cpp" if backend_class("llama.cpp").unavailable_reason() is None else _logits_backend()
    ref = _convert(smollm2, tmp_path / "smol-f32.gguf", "f32")
    q8 = _convert(ref, tmp_path / "smol-q8_0.gguf", "q8_0")
    q4 = _convert(ref, tmp_path / "smol-q4_0.gguf", "q4_0")
    db = tmp_path / "bench.sqlite"
    r8, r4 = _eval_json(capsys, str(q8), str(q4), "--ref", str(ref), "--backend", backend, "--ctx", "128",
                        "--max-tokens", "127", "--db", str(db), "--label", "smollm2")
    assert r8["tokens"] == r4["tokens"] == 126
    assert r8["ref_perplexity"] == pytest.approx(r4["ref_perplexity"], rel=1e-6)  # one reference, both runs
    assert r4["kl_mean"] > 3 * r8["kl_mean"] > 0
    assert r4["top1_agreement"] < r8["top1_agreement"]
    assert abs(r4["perplexity"] - r4["ref_perplexity"]) > abs(r8["perplexity"] - r8["ref_perplexity"])
    # Speed and quality share the store and the report.
    assert cli(["bench", "report", "--db", str(db), "--format", "md"]) == 0
    text = capsys.readouterr().out
    assert "## Quality" in text and "q4_0" in text and "q8_0" in text


# ---------------------------------------------------------------------- --text: the user's own text
USER_TEXT = ("The lighthouse keeper counted the ships each night and wrote their names in a small green book. "
             "When the storm came, she climbed the stairs two at a time and lit the great lamp by hand. ") * 3


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    return _convert(tiny_models["llama"], tmp_path_factory.mktemp("eval-text") / "tiny-f32.gguf", "f32",
                    "--pre", "gpt-2")


def _eval_cli(gguf: Path, *extra: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """`ondevice eval` as a user runs it, in a child process (the only way to feed `--text -` a real stdin)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "ondevice", "eval", str(gguf), "--ref", str(gguf), "--ctx", "32",
                           "--max-tokens", "512", "--no-store", "--no-progress", *extra],
                          input=stdin if stdin is not None else b"", capture_output=True, env=env, timeout=300)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def test_eval_on_the_users_text_from_a_file_and_from_stdin(tiny_gguf: Path, tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "notes.txt"
    path.write_text(USER_TEXT, encoding="utf-8")
    code, out, err = _eval_cli(tiny_gguf, "--text", str(path), "--json")
    assert code == 0, err
    [mine] = json.loads(out)
    code, out, err = _eval_cli(tiny_gguf, "--text", "-", "--json", stdin=USER_TEXT.encode())
    assert code == 0, err
    [piped] = json.loads(out)
    code, out, err = _eval_cli(tiny_gguf, "--json")
    assert code == 0, err
    [bundled] = json.loads(out)

    assert mine["text"] == str(path) and piped["text"] == "<stdin>" and bundled["text"].endswith("eval_text.txt")
    assert mine["text_sha256"] == piped["text_sha256"] == hashlib.sha256(USER_TEXT.encode()).hexdigest()
    assert mine["perplexity"] == piped["perplexity"] and mine["tokens"] == piped["tokens"]  # the same text
    # Measured on that text, not the bundled one: all of its tokens (fewer than --max-tokens), another perplexity.
    assert mine["tokens"] < 400
    assert mine["tokens"] < bundled["tokens"] and mine["perplexity"] != bundled["perplexity"]
    assert mine["kl_mean"] < 1e-9  # the artifact against itself

    code, out, err = _eval_cli(tiny_gguf, "--text", str(path))  # the human line says which text
    assert code == 0 and f"tokens of {path}" in out, (out, err)


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"  \n\t\n", "is empty"),
    (b"caf\xe9 au lait, " * 40, "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (b"Too short.", "shorter than one window of"),
])
def test_eval_text_errors_are_one_line(tiny_gguf: Path, tmp_path: Path, content: bytes | None, says: str) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    code, out, err = _eval_cli(tiny_gguf, "--text", str(path))
    assert code == 1 and says in err, err
    assert err.startswith("ondevice: error: --text" if content != b"Too short." else "ondevice: error: the eval")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    code, _, err = _eval_cli(tiny_gguf, "--text", "-", stdin=content or b"")  # stdin: the same checks
    assert code == 1 and (says if content is not None else "is empty") in err, err
    assert "standard input" in err or "shorter than one window" in err, err


def test_eval_text_folder_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    code, _, err = _eval_cli(tiny_gguf, "--text", str(tmp_path))
    assert code == 1 and "is a folder, not a text file" in err, err
