"""Structured output: bad schemas give one-line errors; with the real SmolLM2 every output validates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from ondevice.structured import (  # noqa: E402
    StructuredOutputError,
    TokenFilter,
    compile_grammar,
    generate_structured,
    load_schema,
)

EXAMPLES = Path(__file__).parent.parent / "examples"
ISSUE_SCHEMA = json.loads((EXAMPLES / "github_issue.schema.json").read_text())
COMPLAINTS = [line for line in (EXAMPLES / "complaints.txt").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(json_schema={"type": "nonsense"}), "invalid JSON schema at type"),
        (dict(json_schema={"not": {"type": "string"}}), "Unimplemented keys"),
        (dict(json_schema={"type": "string", "format": "weird"}), "Unknown format"),
        (dict(json_schema="{bad json"), "not valid JSON"),
        (dict(json_schema="[1, 2]"), "must be a JSON object"),
        (dict(json_schema="/nonexistent/schema.json"), "not found"),
        (dict(regex="(abc"), "unclosed group"),
        (dict(grammar="start: foo"), "unknown name"),
        (dict(), "exactly one"),
        (dict(regex="a", grammar='start: "a"'), "exactly one"),
    ],
)
def test_bad_constraints_are_one_line_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(StructuredOutputError) as info:
        compile_grammar(**kwargs)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_schema_from_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(ISSUE_SCHEMA))
    assert load_schema(path) == ISSUE_SCHEMA
    assert load_schema(str(path)) == ISSUE_SCHEMA
    assert load_schema(json.dumps(ISSUE_SCHEMA)) == ISSUE_SCHEMA


@pytest.fixture(scope="module")
def model(smollm2: Path):
    import ondevice

    m = ondevice.load(smollm2, n_ctx=1024)
    yield m
    m.close()


def _issue_messages(complaint: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Turn the complaint into a GitHub issue as JSON."},
            {"role": "user", "content": complaint}]


@pytest.mark.slow
def test_issue_extraction_always_validates(model) -> None:
    # 8 varied complaints, greedy and sampled (including a high temperature): every output must validate.
    cases = [(c, t) for c, t in zip(COMPLAINTS[:8], [0.0, 0.8, 1.5, 0.8, 0.0, 0.8, 1.5, 0.8], strict=True)]
    for i, (complaint, temperature) in enumerate(cases):
        issue = generate_structured(model, _issue_messages(complaint), json_schema=ISSUE_SCHEMA,
                                    temperature=temperature, seed=i, max_tokens=120)
        jsonschema.validate(issue, ISSUE_SCHEMA)
        assert model.last_stats.finish_reason == "stop"


@pytest.mark.slow
def test_regex_and_lark_at_high_temperature(model) -> None:
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    for seed in range(3):
        text = generate_structured(model, "Write a phone number:", regex=pattern, temperature=2.0, top_k=0,
                                   top_p=1.0, min_p=0.0, seed=seed, max_tokens=24)
        assert re.fullmatch(pattern, text), text
    answer = generate_structured(model, [{"role": "user", "content": "Is the sky blue? yes or no"}],
                                 grammar='start: "yes" | "no"', temperature=1.0, seed=1, max_tokens=4)
    assert answer in ("yes", "no")
    # A small Lark grammar with recursion: a list of 1-3 lowercase words in brackets.
    grammar = 'start: "[" WORD ("," WORD)~0..2 "]"\nWORD: /[a-z]{1,8}/'
    text = generate_structured(model, "Three fruits:", grammar=grammar, temperature=0.9, seed=5, max_tokens=40)
    assert re.fullmatch(r"\[[a-z]{1,8}(,[a-z]{1,8}){0,2}\]", text), text


@pytest.mark.slow
def test_running_out_of_tokens_is_a_clear_error(model) -> None:
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        generate_structured(model, _issue_messages(COMPLAINTS[0]), json_schema=ISSUE_SCHEMA, max_tokens=4)


@pytest.mark.slow
def test_mask_cost_is_small_next_to_decode(model) -> None:
    token_filter = TokenFilter(model, json_schema=ISSUE_SCHEMA)
    text = "".join(model.generate(_issue_messages(COMPLAINTS[2]), token_filter=token_filter, temperature=0.8,
                                  seed=3, max_tokens=120))
    jsonschema.validate(json.loads(text), ISSUE_SCHEMA)
    stats = model.last_stats
    decode_per_token = stats.decode_s / (stats.generated_tokens - 1)
    mask_per_token = token_filter.mask_s / token_filter.steps
    assert token_filter.steps == stats.generated_tokens
    # Goal from the issue: masking under 10% of decode time on SmolLM2-135M (measured ~1-2%).
    assert mask_per_token < 0.10 * decode_per_token, (mask_per_token, decode_per_token)


@pytest.mark.slow
def test_cli_run_json_schema(smollm2: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    schema = EXAMPLES / "github_issue.schema.json"
    run = subprocess.run([sys.executable, "-m", "ondevice", "run", str(smollm2), "-p", COMPLAINTS[5], "-n", "120",
                          "--json-schema", str(schema), "--json", "--temp", "0.8", "--seed", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    jsonschema.validate(json.loads(json.loads(run.stdout)["text"]), ISSUE_SCHEMA)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"not": {}}}}')
    run = subprocess.run([sys.executable, "-m", "ondevice", "run", str(smollm2), "-p", "x", "--json-schema",
                          str(bad)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Unimplemented" in run.stderr and run.stderr.count("\n") == 1


BUDGET_SCHEMAS = json.loads((EXAMPLES / "budget_schemas.json").read_text())["schemas"]


def _budget_run(model, entry: dict, complaint: str, budget: int, seed: int, **kwargs) -> tuple[str, object]:
    messages = [{"role": "system", "content": entry["prompt"] + " Reply with JSON."},
                {"role": "user", "content": complaint}]
    token_filter = TokenFilter(model, json_schema=entry["schema"], **kwargs)
    text = "".join(model.generate(messages, token_filter=token_filter, temperature=0.8, seed=seed,
                                  max_tokens=budget))
    return text, model.last_stats


@pytest.mark.slow
@pytest.mark.parametrize("budget", [32, 64])
def test_unbounded_schemas_stay_valid_at_the_token_limit(model, budget: int) -> None:
    """Ten schemas with unbounded strings and arrays, temperature 0.8: the reply is complete and valid at the
    limit; when the limit forced the closing, finish_reason is "length" and closed_at_limit is set."""
    closed = 0
    for i, entry in enumerate(BUDGET_SCHEMAS):
        text, stats = _budget_run(model, entry, COMPLAINTS[i], budget, seed=i)
        jsonschema.validate(json.loads(text), entry["schema"])
        assert stats.generated_tokens <= budget
        if stats.closed_at_limit:
            closed += 1
            assert stats.finish_reason == "length"
    assert closed >= 2  # the limit really was reached (else this test proves nothing)


@pytest.mark.slow
def test_without_closing_the_limit_breaks_the_json(model) -> None:
    """The baseline the closing fixes: the same request with close_at_limit=False ends mid-string."""
    entry = next(e for e in BUDGET_SCHEMAS if e["name"] == "translation")
    # the first seed whose unclosed reply runs into the limit (which seed does depends on the kernels' rounding)
    for seed in range(8, 20):
        text, stats = _budget_run(model, entry, COMPLAINTS[8], 32, seed=seed, close_at_limit=False)
        if stats.finish_reason == "length":
            break
    assert stats.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    text, stats = _budget_run(model, entry, COMPLAINTS[8], 32, seed=seed)
    jsonschema.validate(json.loads(text), entry["schema"])
    assert stats.closed_at_limit and stats.finish_reason == "length"


@pytest.mark.slow
def test_issue_schema_at_32_tokens(model) -> None:
    for i, complaint in enumerate(COMPLAINTS[:6]):
        issue = generate_structured(model, _issue_messages(complaint), json_schema=ISSUE_SCHEMA, temperature=0.8,
                                    seed=i, max_tokens=32)
        jsonschema.validate(issue, ISSUE_SCHEMA)


@pytest.mark.slow
def test_budget_too_small_for_the_schema_fails_before_generation(model) -> None:
    with pytest.raises(StructuredOutputError, match=r"shortest output this schema allows takes \d+ tokens"):
        list(model.generate(_issue_messages(COMPLAINTS[0]), json_schema=ISSUE_SCHEMA, max_tokens=8))
    assert model.last_stats.generated_tokens == 0


@pytest.mark.slow
def test_max_string_tokens_ends_runaway_strings(model) -> None:
    entry = next(e for e in BUDGET_SCHEMAS if e["name"] == "translation")  # three unbounded strings
    text, stats = _budget_run(model, entry, COMPLAINTS[3], 160, seed=3, max_string_tokens=4)
    value = json.loads(text)
    jsonschema.validate(value, entry["schema"])
    assert all(len(model.tokenize(v, add_bos=False)) <= 5 for v in value.values() if isinstance(v, str))
    assert stats.generated_tokens <= 160
    with pytest.raises(StructuredOutputError, match="max_string_tokens must be >= 1"):
        TokenFilter(model, json_schema=entry["schema"], max_string_tokens=0)
