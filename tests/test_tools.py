"""Tool calling: checks of untrusted tools, the generic prompt format, the stream parser; with the real SmolLM2,
calls that always validate, text answers under "auto", and the openai client round trip through the server."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
llguidance = pytest.importorskip("llguidance")

from ondevice.tools import (  # noqa: E402
    CLOSE,
    OPEN,
    ToolCallStream,
    ToolError,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    render_messages,
    tool_grammar,
)

SPEC = json.loads((Path(__file__).parent.parent / "examples" / "tool_requests.json").read_text())
TOOLS = SPEC["tools"]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def fn(name: str, parameters: object = None, **extra) -> dict:
    body = {"name": name, **extra}
    if parameters is not None:
        body["parameters"] = parameters
    return {"type": "function", "function": body}


@pytest.mark.parametrize(("tools", "fragment"), [
    ([], "non-empty array"),
    ("get_weather", "non-empty array"),
    ([{"type": "retrieval"}], "tools[0] must be"),
    ([fn("bad name!")], "letters, digits"),
    ([fn("a"), fn("a")], "declared twice"),
    ([fn("a", {"type": "array"})], "must describe an object"),
    ([fn("a", {"type": "object", "properties": {"x": {"type": "strnig"}}})], "tools[0].function.parameters"),
    ([fn("a", "not a schema")], "JSON Schema object"),
    ([fn("a", description=3)], "description must be a string"),
])
def test_bad_tools_are_one_line_errors(tools, fragment: str) -> None:
    with pytest.raises(ToolError, match=re.escape(fragment)) as info:
        check_tools(tools)
    assert "\n" not in str(info.value)


def test_tool_choice() -> None:
    tools = check_tools(TOOLS)
    assert check_tool_choice(None, tools) == ("auto", None)
    assert check_tool_choice("required", tools) == ("required", None)
    assert check_tool_choice({"type": "function", "function": {"name": "send_email"}}, tools) == ("required",
                                                                                                   "send_email")
    for bad, fragment in [("always", "must be one of"), ({"type": "function", "function": {"name": "nope"}},
                                                         "not one of the tools"), ({"function": "x"}, "must be a")]:
        with pytest.raises(ToolError, match=fragment):
            check_tool_choice(bad, tools)


def test_grammars_compile() -> None:
    tools = check_tools(TOOLS)
    for mode, name, parallel in [("required", None, True), ("auto", None, False), ("required", "get_weather", False)]:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_lark(tool_grammar(tools, mode, name, parallel)))
        assert not is_error, messages
    assert tool_grammar(tools, "none") is None


def test_generic_format_renders_tools_calls_and_results() -> None:
    tools = check_tools(TOOLS[:1])
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    out = render_messages(messages, tools, native=False)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}'
                      + CLOSE}
    assert out[3] == {"role": "user", "content": '<tool_response>{"name": "get_weather", "content": "18 C, sunny"}'
                                                 "</tool_response>"}
    native = render_messages(messages, tools, native=True)
    assert len(native) == 3 and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    with pytest.raises(ToolError, match="not valid JSON"):
        render_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
                        None, native=False)


def test_parse_and_stream_calls() -> None:
    text = (OPEN + '{"name": "search_web", "arguments": {"query": "a }' + CLOSE + ' \\" b", "max_results": 3}}'
            + CLOSE + OPEN + '{"name": "get_weather", "arguments": {"city": "Oslo"}}' + CLOSE)
    content, calls = parse_tool_calls(text)
    assert content is None and [c["name"] for c in calls] == ["search_web", "get_weather"]
    assert calls[0]["arguments"]["query"] == 'a }' + CLOSE + ' " b'
    for size in (1, 2, 5, 1000):
        stream, events = ToolCallStream(), []
        for i in range(0, len(text), size):
            events += stream.feed(text[i:i + size])
        events += stream.finish()
        names = [e[3] for e in events if e[0] == "call"]
        args = ["".join(e[2] for e in events if e[0] == "arguments" and e[1] == i) for i in range(2)]
        assert names == ["search_web", "get_weather"] and [json.loads(a) for a in args] == [c["arguments"]
                                                                                           for c in calls]
    assert parse_tool_calls("Paris.") == ("Paris.", [])
    with pytest.raises(ToolError, match="malformed"):
        parse_tool_calls(OPEN + '{"name": "x"')


# ---------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def model(smollm2: Path):
    import ondevice

    m = ondevice.load(smollm2, n_ctx=2048, threads=2)
    yield m
    m.close()


def _validate(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(call["arguments"], PARAMS[call["name"]])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_required_calls_always_validate(model, temperature: float) -> None:
    for i, request in enumerate(SPEC["requests"][::5]):  # 10 of the 50 (benchmarks/tool_calls.py runs all)
        text = "".join(model.generate([{"role": "user", "content": request}], tools=TOOLS, tool_choice="required",
                                      temperature=temperature, seed=i, max_tokens=96))
        content, calls = parse_tool_calls(text)
        assert content is None
        _validate(calls)


def test_parallel_calls_stay_valid_at_the_token_limit(model) -> None:
    """Sampled replies that keep opening calls: the limit closes or ends them, never cuts one."""
    for i, request in enumerate(SPEC["requests"][1::7]):
        for budget in (40, 72):
            text = "".join(model.generate([{"role": "user", "content": request}], tools=TOOLS,
                                          tool_choice="required", temperature=1.0, seed=i, max_tokens=budget))
            _validate(parse_tool_calls(text)[1])
            assert model.last_stats.generated_tokens <= budget


def test_named_choice_and_no_parallel(model) -> None:
    text = "".join(model.generate([{"role": "user", "content": "Hello there"}], tools=TOOLS, temperature=0.8, seed=1,
                                  tool_choice={"type": "function", "function": {"name": "search_web"}},
                                  parallel_tool_calls=False, max_tokens=64))
    _, calls = parse_tool_calls(text)
    assert [c["name"] for c in calls] == ["search_web"]
    _validate(calls)


def test_auto_answers_plain_questions_in_text(model) -> None:
    for question in SPEC["plain_questions"][:5]:
        text = "".join(model.generate([{"role": "user", "content": question}], tools=TOOLS, temperature=0,
                                      max_tokens=48))
        content, calls = parse_tool_calls(text)
        assert calls == [] and content and not content.startswith("<"), text


def test_native_template_gets_the_tools(model) -> None:
    """A template that takes `tools` renders them itself, and gets calls and results as it expects."""
    template = ("{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.tool_calls %}"
                "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
                "{% endfor %}{% endif %}</{{ m.role }}>\n{% endfor %}<assistant>")
    saved = model.chat_template
    model.chat_template = template
    try:
        messages = [{"role": "user", "content": "Weather in Oslo?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]
        rendered, template_vars, rules = model.tool_prompt(messages, TOOLS, None, True)
        text = model.apply_chat_template(rendered, **template_vars)
        assert text.startswith("TOOLS: get_weather send_email search_web create_event<user>")  # trim_blocks
        assert 'CALL get_weather {"city": "Oslo"}' in text and "<tool>-3 C</tool>" in text
        assert rules is not None and "<tool_call>" in rules
    finally:
        model.chat_template = saved


# ---------------------------------------------------------------------- the server and the openai client
@pytest.fixture(scope="module")
def client(model):
    openai = pytest.importorskip("openai")
    from ondevice.server import create_server

    server = create_server(model, "127.0.0.1", 0, model_id="smol")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    server.close()
    thread.join(5)


def _stream_calls(chunks) -> tuple[str, list[dict], str]:
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_openai_round_trip(client, stream: bool) -> None:
    """call -> tool result -> answer, as an openai-client app does it."""
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    params = dict(model="smol", tools=TOOLS[:1], temperature=0, max_tokens=64)
    if stream:
        _, calls, finish = _stream_calls(client.chat.completions.create(messages=messages, tool_choice="required",
                                                                        stream=True, **params))
        assert finish == "tool_calls" and len(calls) >= 1 and calls[0]["id"].startswith("call_")
        call = {"id": calls[0]["id"], "type": "function",
                "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}
    else:
        r = client.chat.completions.create(messages=messages, tool_choice="required", **params)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        tc = choice.message.tool_calls[0]
        call = {"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                              "arguments": tc.function.arguments}}
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS["get_weather"])
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    if stream:
        content, calls, finish = _stream_calls(client.chat.completions.create(messages=messages, stream=True,
                                                                              **params))
    else:
        r = client.chat.completions.create(messages=messages, **params)
        content, calls, finish = r.choices[0].message.content, r.choices[0].message.tool_calls or [], \
            r.choices[0].finish_reason
    # "auto": after the result the model answers in text (it may also call again, validly)
    assert (content and not calls and finish in ("stop", "length")) or (calls and finish == "tool_calls")


@pytest.mark.parametrize(("body", "fragment"), [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "letters, digits"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "must be one of"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not one of the tools"),
    ({"tool_choice": "required"}, "only allowed when 'tools'"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "not both"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [fn("a", {"type": "object", "properties": {"x": {"not": {}}}})]}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
     "not valid JSON"),
    ({"speculate": "fast"}, "'speculate' must be"),
    ({"max_string_tokens": 3}, "needs response_format"),
])
def test_bad_tool_requests_are_400(client, body: dict, fragment: str) -> None:
    openai = pytest.importorskip("openai")
    request = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}
    extra = {k: request.pop(k) for k in ("speculate", "max_string_tokens") if k in request}  # not in the client
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request, extra_body=extra)
    message = info.value.body["message"]
    assert fragment in message and "\n" not in message


def test_server_extensions_speculate_and_max_string_tokens(client) -> None:
    """A request's "speculate" gives the same reply; "max_string_tokens" bounds every string of the JSON."""
    messages = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog."}]
    plain, spec = (client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=40,
                                                  extra_body={"speculate": mode}).choices[0].message.content
                   for mode in ("off", "lookup"))
    assert plain == spec
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Tell a long story as JSON."}], temperature=0.8, seed=1,
        max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        extra_body={"max_string_tokens": 6})
    story = json.loads(r.choices[0].message.content)["story"]
    assert len(story) < 60


def test_server_json_closed_at_the_limit(client) -> None:
    """response_format at a small max_tokens: complete JSON, finish_reason "length", closed_at_limit in the choice
    (the whole body and the last stream chunk)."""
    schema = {"type": "object", "properties": {"summary": {"type": "string"}, "tags": {"type": "array", "items": {
        "type": "string"}}}, "required": ["summary", "tags"]}
    params = dict(model="smol", messages=[{"role": "user", "content": "Describe your day in great detail as JSON."}],
                  temperature=0.8, seed=2, max_tokens=14,
                  response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
    r = client.chat.completions.create(**params)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "length" and r.choices[0].model_extra.get("closed_at_limit") is True
    chunks = list(client.chat.completions.create(**params, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].model_extra["closed_at_limit"]
