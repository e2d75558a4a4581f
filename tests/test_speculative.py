"""Prompt-lookup speculative decoding: the draft index, and identity to plain decoding on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ondevice.errors import OndeviceError
from ondevice.runtime.speculative import PromptLookup, check_speculate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than a century. Every night its keeper "
             "climbed the narrow stairs, lit the great lamp and watched the ships pass safely through the rocky "
             "strait. When the keeper retired, the town decided to keep the light burning with an automatic lamp.")
REWRITE = [{"role": "user", "content": "Rewrite this paragraph with one change: replace 'century' with 'hundred "
                                       "years'. Keep everything else the same.\n\n" + PARAGRAPH}]


def test_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    history = [1, 2, 3, 4, 5, 1, 2]
    assert lookup.draft(history, 2) == [3, 4]
    history.append(3)
    assert lookup.draft(history, 3) == [4, 5, 1]
    history.append(9)
    assert lookup.draft(history, 2) == []  # 9 never occurred before
    history.append(2)
    assert lookup.draft(history, 2) == [3, 9]  # the latest earlier "2" is followed by 3, 9
    assert lookup.draft(history, 0) == []


def test_lookup_prefers_the_longest_ngram():
    # "7 8" was followed by 1, but the 3-gram "6 7 8" by 2
    history = [6, 7, 8, 2, 0, 5, 7, 8, 1, 0, 6, 7, 8]
    assert PromptLookup(max_ngram=3).draft(history, 1) == [2]
    assert PromptLookup(max_ngram=2).draft(history, 1) == [1]
    assert PromptLookup().draft([5, 6, 7, 1, 9, 9, 1], 2) == []  # only "1" matches: a 1-gram is not enough


def test_speculate_option_is_checked():
    assert check_speculate("off") == "off" and check_speculate("lookup") == "lookup"
    assert check_speculate("grammar") == "grammar" and check_speculate(None) in ("off", "grammar", "lookup")
    with pytest.raises(OndeviceError, match="speculate must be one of"):
        check_speculate("draft-model")


@pytest.fixture(scope="module")
def model(smollm2):
    import ondevice

    with ondevice.load(smollm2, threads=2) as m:
        yield m


def test_verify_rows_are_bit_identical_to_single_steps(model):
    """The premise of exactness: up to exact_rows tokens in one pass give the logits of one-token passes."""
    t = model.transformer
    prompt = model.prompt_tokens(REWRITE)
    first = t.forward(np.asarray(prompt, np.int32), 0)
    seq, steps, token = [], [], int(np.argmax(first))
    for i in range(2 * t.exact_rows):
        seq.append(token)
        steps.append(t.forward(np.asarray([token], np.int32), len(prompt) + i))
        token = int(np.argmax(steps[-1]))
    for s in range(0, len(seq), t.exact_rows):
        rows = t.forward(np.asarray(seq[s:s + t.exact_rows], np.int32), len(prompt) + s, all_logits=True)
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(row, steps[s + i])
    model.reset()


def _both(model, messages, mode="lookup", **kwargs):
    plain = "".join(model.generate(messages, speculate="off", **kwargs))
    plain_stats = model.last_stats
    spec = "".join(model.generate(messages, speculate=mode, **kwargs))
    return plain, plain_stats, spec, model.last_stats


def test_rewrite_identical_and_fewer_passes(model):
    plain, p, spec, s = _both(model, REWRITE, max_tokens=100, temperature=0)
    assert spec == plain and s.tokens == p.tokens
    assert s.accepted_tokens > 0.3 * s.generated_tokens  # a rewrite copies most of its prompt
    assert s.forward_passes < p.forward_passes


@pytest.mark.parametrize(("temperature", "mode"), [(0.0, "lookup"), (0.8, "lookup"), (0.0, "grammar")])
def test_issue_extraction_identical_with_schema(model, temperature, mode):
    schema = json.loads((EXAMPLES / "github_issue.schema.json").read_text())
    complaints = (EXAMPLES / "complaints.txt").read_text().splitlines()[:4]
    for i, complaint in enumerate(complaints):
        messages = [{"role": "system", "content": "You turn a user's complaint into a GitHub issue. Reply with JSON."},
                    {"role": "user", "content": complaint}]
        plain, p, spec, s = _both(model, messages, mode, max_tokens=96, temperature=temperature, seed=i,
                                  json_schema=schema)
        assert spec == plain and s.tokens == p.tokens, complaint
        json.loads(spec)
        if temperature == 0:  # the keys and separators the grammar forces are drafted, and accepted
            assert s.accepted_tokens > 0.25 * s.generated_tokens and s.forward_passes < p.forward_passes


def test_tool_calls_identical_with_grammar_drafts(model):
    spec = json.loads((EXAMPLES / "tool_requests.json").read_text())
    for i, request in enumerate(spec["requests"][::12]):
        plain, p, out, s = _both(model, [{"role": "user", "content": request}], "grammar", max_tokens=96,
                                 temperature=0.8, seed=i, tools=spec["tools"], tool_choice="required")
        assert out == plain and s.accepted_tokens > 0


def test_grammar_mode_without_a_grammar_is_plain(model):
    plain, p, out, s = _both(model, REWRITE, "grammar", max_tokens=20, temperature=0)
    assert out == plain and s.drafted_tokens == 0 and s.forward_passes == p.forward_passes


def test_sampling_identical_with_seed(model):
    plain, p, spec, s = _both(model, REWRITE, max_tokens=60, temperature=0.8, seed=3)
    assert spec == plain


@pytest.fixture(scope="module")
def q8_path(smollm2, tmp_path_factory):
    """SmolLM2 re-quantized to Q8_0: the same vocabulary, other weights (a draft for itself)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("draft") / "smol-q8.gguf"
    run = subprocess.run([sys.executable, "-m", "ondevice", "convert", str(smollm2), "--to", "gguf", "--quant", "q8_0",
                          "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_draft_model_identical_output(smollm2, q8_path):
    import ondevice

    with ondevice.load(smollm2, threads=2, draft=q8_path) as m:
        for temperature in (0.0, 0.8):
            plain, p, spec, s = _both(m, REWRITE, "draft", max_tokens=60, temperature=temperature, seed=5)
            assert spec == plain and s.tokens == p.tokens
            # greedy Q8_0 mostly agrees with greedy Q4_1; a sampled reply takes the draft's guess less often
            assert s.accepted_tokens > (0.5 if temperature == 0 else 0.1) * s.drafted_tokens > 0
    with ondevice.load(smollm2, threads=2) as m, pytest.raises(OndeviceError, match="needs a draft model"):
        list(m.generate(REWRITE, speculate="draft"))


def test_draft_with_another_vocabulary_is_refused(model):
    from types import SimpleNamespace

    other = SimpleNamespace(spec=SimpleNamespace(vocab_size=32000), codec=model.codec, path="other.gguf")
    with pytest.raises(OndeviceError, match="another vocabulary"):
        model.set_draft(other)
