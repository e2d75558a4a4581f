"""Tool (function) calling: OpenAI-shaped tools in, calls generated under a grammar, OpenAI `tool_calls` out.

    for piece in model.generate(messages, tools=TOOLS, tool_choice="required"): ...
    content, calls = parse_tool_calls(text)   # calls: [{"name": ..., "arguments": {...}}]

The reply format, for every model: a call is `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`, and
several calls follow each other (`parallel_tool_calls`). The call is generated under an llguidance grammar built
from the tools (`tool_grammar`): the name is one of the declared functions and the arguments validate against its
`parameters` schema. tool_choice:

- "required": one or more calls, nothing else;
- {"type": "function", "function": {"name": N}}: calls of N only;
- "auto" (the default when tools are given): either calls, or a text answer (any text that does not start with
  "<", so the first character decides which);
- "none": a text answer, no grammar.

How the tools reach the model: when the model's chat template takes `tools` (Qwen2.5, Qwen3, Llama 3.2 and
SmolLM3 templates do), the template renders them, and the conversation's calls and results are passed as the
template expects. Otherwise (SmolLM2's ChatML template, for one) the generic format below is used:

- a system message (the request's own first system message, extended, or a new one) lists the tools as JSON
  lines between <tools> and </tools> and says how to call them (`GENERIC_TOOL_PROMPT`);
- an assistant message with `tool_calls` becomes its text plus one `<tool_call>...</tool_call>` per call;
- a `tool` message becomes a user message `<tool_response>{"name": ..., "content": ...}</tool_response>`
  (the name is looked up from its tool_call_id when the assistant message gave one).

Tools come from requests, so they are untrusted: every check raises ToolError with a one-line message.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ondevice.errors import OndeviceError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
TOOL_CHOICES = ("auto", "none", "required")
GENERIC_TOOL_PROMPT = (
    "You can call these functions (JSON, one per line):\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with only <tool_call>{{\"name\": NAME, \"arguments\": ARGUMENTS}}</tool_call>, "
    "with ARGUMENTS a JSON object that matches the function's parameters. When no function is needed, "
    "answer in plain text."
)
# The JSON layout inside a call: compact and fixed (see structured.JSON_DEFAULTS)
_X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolError(OndeviceError):
    """The tools, tool_choice or tool messages are malformed (one-line message)."""


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools` -> [{"name", "description", "parameters"}], each parameters schema checked."""
    from ondevice.structured import StructuredOutputError, _check_schema

    if not isinstance(tools, list) or not tools:
        raise ToolError("'tools' must be a non-empty array of {\"type\": \"function\", \"function\": {...}}")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools are accepted, got {len(tools)}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {str(name)[:40]!r}")
        if name in seen:
            raise ToolError(f"tools[{i}]: the function name {name!r} is declared twice")
        seen.add(name)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object")
        if params.get("type", "object") != "object":
            raise ToolError(f"tools[{i}].function.parameters must describe an object (\"type\": \"object\")")
        try:
            _check_schema(params)
        except StructuredOutputError as exc:
            raise ToolError(f"tools[{i}].function.parameters: {exc}") from None
        out.append({"name": name, "description": description, "parameters": {"type": "object", **params}})
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """tool_choice -> (mode, function name or None); mode in auto / none / required."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise ToolError(f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or "
                            f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice[:40]!r}")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError("'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in {t["name"] for t in tools}:
        raise ToolError(f"'tool_choice' names {name[:64]!r}, which is not one of the tools")
    return "required", name


def tool_grammar(tools: list[dict[str, Any]], mode: str, name: str | None = None,
                 parallel: bool = True) -> str | None:
    """A Lark grammar (llguidance) for the reply; None for mode "none" (free text)."""
    if mode == "none":
        return None
    chosen = [t for t in tools if name is None or t["name"] == name]
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False} for t in chosen],
            "x-guidance": _X_GUIDANCE}
    calls = f'("{OPEN}" call "{CLOSE}")' + ("+" if parallel else "")
    lines = [f"calls: {calls}", "call: %json " + json.dumps(call)]
    if mode == "auto":
        return "\n".join(["start: TEXT | calls", *lines, r"TEXT: /[^<](.|\n)*/"])
    return "\n".join(["start: calls", *lines])


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` variable itself."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _arguments_dict(raw: Any, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            raise ToolError(f"{where}.function.arguments is not valid JSON") from None
        if isinstance(value, dict):
            return value
    raise ToolError(f"{where}.function.arguments must be a JSON object (or its JSON text)")


def check_tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls -> [{"id", "type", "function": {"name", "arguments": dict}}]."""
    if not isinstance(raw, list):
        raise ToolError(f"{where}.tool_calls must be an array")
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError(f"{at} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                            f"\"arguments\": ...}}}}")
        call_id = call.get("id", "")
        if not isinstance(call_id, str):
            raise ToolError(f"{at}.id must be a string")
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": fn["name"], "arguments": _arguments_dict(fn.get("arguments", {}), at)}})
    return calls


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    native: bool) -> list[dict[str, Any]]:
    """Messages with tool calls/results (and the tools, for the generic format) as the template gets them."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        msg = dict(msg)
        if msg.get("tool_calls"):
            msg["tool_calls"] = check_tool_calls(msg["tool_calls"], f"messages[{i}]")
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if c["id"]})
            if msg.get("content") is None:
                msg["content"] = ""
            if not native:
                text = "".join(OPEN + json.dumps({"name": c["function"]["name"],
                                                  "arguments": c["function"]["arguments"]}) + CLOSE
                               for c in msg.pop("tool_calls"))
                msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + text
        elif msg.get("role") == "tool" and not native:
            name = names.get(str(msg.get("tool_call_id", "")), msg.get("name"))
            body = {"name": name, "content": msg.get("content")} if name else {"content": msg.get("content")}
            msg = {"role": "user", "content": "<tool_response>" + json.dumps(body) + "</tool_response>"}
        out.append(msg)
    if tools and not native:
        listing = "\n".join(json.dumps({"name": t["name"], "description": t["description"],
                                        "parameters": t["parameters"]}) for t in tools)
        prompt = GENERIC_TOOL_PROMPT.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checked tools back in OpenAI's shape (what templates that take `tools` expect)."""
    return [{"type": "function", "function": dict(t)} for t in tools]


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(text content or None, [{"name", "arguments": dict}]) from a reply in the tool-call format."""
    if not text.startswith(OPEN):
        return text, []
    calls, pos, decoder = [], 0, json.JSONDecoder()
    while text.startswith(OPEN, pos):
        try:
            value, end = decoder.raw_decode(text, pos + len(OPEN))
        except json.JSONDecodeError:
            raise ToolError("the reply holds a malformed tool call") from None
        if not text.startswith(CLOSE, end) or not isinstance(value, dict) or set(value) != {"name", "arguments"}:
            raise ToolError("the reply holds a malformed tool call")
        calls.append({"name": value["name"], "arguments": value["arguments"]})
        pos = end + len(CLOSE)
    return None, calls


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_tool_calls(calls: list[dict[str, Any]], ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Parsed calls -> OpenAI `message.tool_calls` (arguments as JSON text)."""
    ids = ids or [new_call_id() for _ in calls]
    return [{"id": call_id, "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for call_id, c in zip(ids, calls, strict=True)]


class ToolCallStream:
    """Turns the streamed reply into OpenAI stream deltas: ("content", text) for a text answer, and per call
    ("call", index, id, name) once its name is known, then ("arguments", index, fragment) as the arguments
    are generated. The layout is fixed by the grammar: <tool_call>{"name": "N", "arguments": ARGS}</tool_call>."""

    _HEAD = re.compile(re.escape(OPEN) + r'\{"name": "([A-Za-z0-9_-]+)", "arguments": ')
    _TAIL = "}" + CLOSE

    def __init__(self) -> None:
        self.buffer = ""
        self.mode: str | None = None  # "text" or "calls", decided by the first character
        self.index = -1
        self.in_args = False
        self.args = ""  # the current call's arguments so far (to tell a closing "}" from one inside a string)
        self.ids: list[str] = []

    def feed(self, piece: str) -> list[tuple]:
        self.buffer += piece
        if self.mode is None and self.buffer:
            self.mode = "calls" if self.buffer.startswith("<") else "text"
        if self.mode == "text":
            out, self.buffer = self.buffer, ""
            return [("content", out)] if out else []
        return self._calls(final=False)

    def finish(self) -> list[tuple]:
        if self.mode == "text" or self.mode is None:
            return []
        return self._calls(final=True)

    def _calls(self, final: bool) -> list[tuple]:
        events: list[tuple] = []
        while True:
            if not self.in_args:
                match = self._HEAD.match(self.buffer)
                if not match:
                    return events
                self.index += 1
                self.ids.append(new_call_id())
                events.append(("call", self.index, self.ids[-1], match.group(1)))
                self.buffer = self.buffer[match.end():]
                self.in_args = True
            end = self._tail_at()
            if end >= 0:
                if end:
                    events.append(("arguments", self.index, self.buffer[:end]))
                self.buffer = self.buffer[end + len(self._TAIL):]
                self.in_args, self.args = False, ""
                continue
            keep = 0 if final else len(self._TAIL) - 1  # might be the start of the tail
            cut = max(0, len(self.buffer) - keep)
            if cut:
                events.append(("arguments", self.index, self.buffer[:cut]))
                self.args += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
            return events

    def _tail_at(self) -> int:
        """Where the call's closing `}</tool_call>` starts in the buffer (outside any JSON string), or -1."""
        from ondevice.structured import _string_state

        end = self.buffer.find(self._TAIL)
        while end >= 0:
            if not _string_state(self.args + self.buffer[:end])[0]:
                return end
            end = self.buffer.find(self._TAIL, end + 1)
        return -1
