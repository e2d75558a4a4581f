"""OpenAI request validation and response bodies (chat.completion, text_completion, their stream chunks)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ondevice.runtime.sampling import DEFAULTS


class RequestError(Exception):
    """A client error: HTTP status plus an OpenAI-style error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(str(self), kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Limits:
    max_tokens: int = 1024  # hard cap per request
    default_max_tokens: int = DEFAULTS.max_tokens
    max_body_bytes: int = 1 << 20
    max_stop: int = 4
    max_logit_bias: int = 1024  # entries of one request's logit_bias
    default_speculate: str | None = None  # `ondevice serve --speculate lookup`: for requests that name none
    context_shift: bool = False  # `ondevice serve --context-shift`: long conversations drop their oldest turns


def default_sampling(limits: Limits) -> dict[str, Any]:
    """What a request that names no sampling gets (SamplingDefaults, max_tokens within this server's cap); the web
    pages fill their inputs from it (/web-config.json) instead of carrying numbers of their own."""
    return {**DEFAULTS.to_dict(), "max_tokens": min(limits.default_max_tokens, limits.max_tokens)}


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    prompt: str | list[dict[str, str]]
    stream: bool
    include_usage: bool
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    json_schema: dict | None = None
    tool_mode: str | None = None  # None: no tools; else auto / none / required (the reply's tool_calls are parsed)


# Parameters we accept but that only have one meaningful value here.
_ONLY_DEFAULT = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False,
                 "best_of": 1, "suffix": None, "functions": None, "function_call": None}


def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number", param=name)
    if not lo <= value <= hi:
        raise RequestError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", param=name)
    if not lo <= value <= hi:
        raise RequestError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _logit_bias(body: dict, limits: Limits) -> dict[int, float] | None:
    """OpenAI's {"token id": bias}; the ids are checked against the model's vocabulary when the request is prepared."""
    raw = body.get("logit_bias")
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict) or len(raw) > limits.max_logit_bias:
        raise RequestError(f"'logit_bias' must be an object of up to {limits.max_logit_bias} token ids",
                           param="logit_bias")
    out: dict[int, float] = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdecimal() and len(key) < 10):
            raise RequestError(f"logit_bias: {key[:40]!r} is not a token id", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise RequestError(f"logit_bias[{key!r}] must be a number between -100 and 100", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _text_content(content: Any, i: int) -> Any:
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}]: only text content parts are supported", param="messages")
            texts.append(part["text"])
        content = "".join(texts)
    return content


def _messages(raw: Any) -> list[dict[str, Any]]:
    from ondevice.tools import ToolError, check_tool_calls

    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty array", param="messages")
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}] needs a role of system, user, assistant or tool", param="messages")
        content = _text_content(msg.get("content"), i)
        tool_calls = msg.get("tool_calls") if msg["role"] == "assistant" else None
        if tool_calls and content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        role = "system" if msg["role"] == "developer" else msg["role"]
        out: dict[str, Any] = {"role": role, "content": content}
        if tool_calls:
            try:
                out["tool_calls"] = check_tool_calls(tool_calls, f"messages[{i}]")
            except ToolError as exc:
                raise RequestError(str(exc), param="messages") from None
        if role == "tool":
            call_id = msg.get("tool_call_id", "")
            if not isinstance(call_id, str):
                raise RequestError(f"messages[{i}].tool_call_id must be a string", param="messages")
            out["tool_call_id"] = call_id
            if isinstance(msg.get("name"), str):
                out["name"] = msg["name"]
        messages.append(out)
    return messages


def _tools(body: dict) -> tuple[dict[str, Any], str | None]:
    """generate() keyword arguments for tools / tool_choice / parallel_tool_calls, and the tool mode."""
    from ondevice.tools import ToolError, check_tool_choice, check_tools

    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls", True)
    if raw is None or raw == []:
        if choice is not None:
            raise RequestError("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
        return {}, None
    if not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise RequestError("give either 'tools' or 'response_format', not both", param="response_format")
    try:
        tools = check_tools(raw)
    except ToolError as exc:
        raise RequestError(str(exc), param="tools") from None
    try:
        mode, _ = check_tool_choice(choice, tools)
    except ToolError as exc:
        raise RequestError(str(exc), param="tool_choice") from None
    return {"tools": raw, "tool_choice": choice, "parallel_tool_calls": parallel}, mode


def _response_format(raw: Any) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RequestError("'response_format' must be an object", param="response_format")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError("response_format.json_schema.schema must be a JSON Schema object",
                               param="response_format")
        return spec["schema"]
    raise RequestError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                       param="response_format")


def _speculate(body: dict, limits: Limits) -> str | None:
    from ondevice.runtime.speculative import SPECULATE_MODES

    value = body.get("speculate", limits.default_speculate)
    if value is not None and value not in SPECULATE_MODES:
        raise RequestError(f"'speculate' must be one of {', '.join(SPECULATE_MODES)}, got {str(value)[:40]!r}",
                           param="speculate")
    return value


def parse_request(body: Any, kind: str, limits: Limits) -> ParsedRequest:
    """Validate an OpenAI chat/completions body; RequestError (400) for anything malformed or unsupported."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, only in _ONLY_DEFAULT.items():
        value = body.get(name)
        if value is None or value == only or value in ([], {}):
            continue
        raise RequestError(f"'{name}' is not supported by this server (only {only!r})", param=name)
    tool_kwargs: dict[str, Any] = {}
    tool_mode = None
    if kind == "chat":
        prompt: str | list[dict[str, Any]] = _messages(body.get("messages"))
        tool_kwargs, tool_mode = _tools(body)
    else:
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str) or not raw:
            raise RequestError("'prompt' must be a non-empty string", param="prompt")
        prompt = raw
    max_tokens = _integer(body, "max_completion_tokens", 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, limits.max_tokens)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > limits.max_stop
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"'stop' must be a string or up to {limits.max_stop} non-empty strings", param="stop")
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    kwargs = dict(
        max_tokens=max_tokens or default_sampling(limits)["max_tokens"],
        # What a request leaves out is ondevice's one set of defaults (not OpenAI's 1.0/1.0, too hot for a 135M).
        temperature=_number(body, "temperature", DEFAULTS.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", DEFAULTS.top_p, 1e-9, 1.0),
        # llama.cpp-server-style extensions.
        top_k=int(_number(body, "top_k", DEFAULTS.top_k, 0, 1 << 20)),
        min_p=_number(body, "min_p", DEFAULTS.min_p, 0.0, 0.999),
        repeat_penalty=_number(body, "repeat_penalty", DEFAULTS.repeat_penalty, 0.01, 10.0),
        seed=None if seed is None else seed % (2**63),
        stop=stop or [],
        speculate=_speculate(body, limits),
        **tool_kwargs,
    )
    if limits.context_shift:
        kwargs["context_shift"] = True
    logit_bias = _logit_bias(body, limits)
    if logit_bias:
        kwargs["logit_bias"] = logit_bias
    max_string_tokens = _integer(body, "max_string_tokens", 1, limits.max_tokens)
    if max_string_tokens is not None:
        if body.get("response_format") in (None, {"type": "text"}) and not tool_kwargs:
            raise RequestError("'max_string_tokens' needs response_format json_object/json_schema or tools",
                               param="max_string_tokens")
        kwargs["max_string_tokens"] = max_string_tokens
    return ParsedRequest(kind=kind, prompt=prompt, stream=stream,
                         include_usage=bool(options.get("include_usage")), generate_kwargs=kwargs,
                         json_schema=_response_format(body.get("response_format")), tool_mode=tool_mode)


# ---------------------------------------------------------------------- responses
def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage block; cached_tokens: prompt tokens whose K/V were reused from an earlier request."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _finish(finish_reason: str) -> str:
    return {"length": "length", "context": "length", "tool_calls": "tool_calls"}.get(finish_reason, "stop")


def completion_body(req: ParsedRequest, job_id: str, model_id: str, text: str | None, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, tool_calls: list[dict] | None = None,
                    closed_at_limit: bool = False, cached_tokens: int = 0) -> dict[str, Any]:
    """`tool_calls` (OpenAI shape) make finish_reason "tool_calls"; `closed_at_limit` (structured output or a
    call that the token limit closed early, still complete and valid) is reported in the choice when set."""
    finish = "tool_calls" if tool_calls else _finish(finish_reason)
    if req.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        if closed_at_limit:
            choice["closed_at_limit"] = True
        return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "system_fingerprint": None, "choices": [choice],
                "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)}
    return {"id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)}


def chunk_body(req: ParsedRequest, job_id: str, model_id: str, created: int, *, text: str | None = None,
               first: bool = False, finish_reason: str | None = None,
               tool_call: dict[str, Any] | None = None, closed_at_limit: bool = False) -> dict[str, Any]:
    """One stream chunk; `tool_call` is one entry of delta.tool_calls ({"index", and "id"/"type"/"function"})."""
    finish = None if finish_reason is None else _finish(finish_reason)
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if closed_at_limit:
            choice["closed_at_limit"] = True
        return {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": created,
                "model": model_id, "system_fingerprint": None, "choices": [choice]}
    return {"id": f"cmpl-{job_id}", "object": "text_completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def usage_chunk(req: ParsedRequest, job_id: str, model_id: str, created: int, prompt_tokens: int,
                completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    prefix, obj = ("chatcmpl", "chat.completion.chunk") if req.kind == "chat" else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{job_id}", "object": obj, "created": created, "model": model_id, "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)}
