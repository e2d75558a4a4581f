"""Sandboxed rendering of Hugging Face chat templates (Jinja), and loading them from a model folder.

Chat templates ship inside model files, so they are untrusted input. Rendering uses Jinja's
ImmutableSandboxedEnvironment (no underscore/internal attributes, no mutation of lists/dicts) configured like
transformers' apply_chat_template (trim_blocks, lstrip_blocks, loop controls, `{% generation %}`, `tojson`,
`raise_exception`, `strftime_now`, `namespace`), plus limits the sandbox lacks: wall-clock time, loop iterations,
range() length, sizes of strings/lists the template builds and of the output, and recursion depth.
Every failure becomes an InvalidModelError with a one-line message.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import operator
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from ondevice.errors import InvalidModelError

MAX_TEMPLATE_CHARS = 1024 * 1024  # real templates are at most a few tens of KB
MAX_VALUE_CHARS = 16 * 1024 * 1024  # any string the template builds, and the rendered prompt
MAX_ITEMS = 1024 * 1024  # any list/tuple/dict the template builds
MAX_RANGE = 100_000  # length of one range() (the same as Jinja's sandbox)
MAX_ITERATIONS = 1_000_000  # range() items iterated, summed over a render
MAX_INT_ARGUMENT = 1_000_000  # widths/counts passed to filters and methods (center, indent, ljust, ...)
MAX_EXPONENT_BITS = 100_000  # size of integers `**` may produce
TIME_LIMIT_SECONDS = 2.0  # a chat prompt renders in milliseconds; hostile loops are stopped here

# printf/str.format field widths or precisions of 7+ digits would allocate megabytes from a few characters.
_HUGE_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(?:\d{7,}|\d*\.\d{7,})")
_HUGE_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{7,}")


class TemplateRaisedError(InvalidModelError):
    """The template called raise_exception(): it rejects these messages (e.g. roles that do not alternate)."""


class _RenderTimeout(BaseException):
    """Raised into the rendering thread when the time limit passes (BaseException: Jinja cannot swallow it)."""


@dataclasses.dataclass
class _Budget:
    deadline: float
    iterations: int = 0


_state = threading.local()


def _budget() -> _Budget | None:
    return getattr(_state, "budget", None)


def _tick() -> None:
    budget = _budget()
    if budget is not None and time.monotonic() > budget.deadline:
        raise _RenderTimeout()


def _weight(value: Any, limit: int = MAX_ITEMS) -> int:
    """Items a value holds, nested ones included and counted each time they are reachable (so `[a] * n` weighs
    n times a), strings at 1 per 16 characters; the walk stops past `limit`, so it costs at most that much.
    One C-level operation over a value (printing, comparing, tojson) takes time in proportion to this."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        total += 1
        if isinstance(item, str):
            total += len(item) >> 4
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        if total > limit:
            break
    return total


def _check_size(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise SecurityError(f"the template built a string of {len(value)} characters (limit {MAX_VALUE_CHARS})")
    elif isinstance(value, (list, tuple, dict)) and _weight(value) > MAX_ITEMS:
        raise SecurityError(f"the template built a value of more than {MAX_ITEMS} items (nested ones included)")
    return value


def _check_sizes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """What goes into one C-level call (a filter, a method, a macro) must be small enough to finish quickly."""
    for value in (*args, *kwargs.values()):
        _check_size(value)


_COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gteq": operator.ge, "lt": operator.lt,
                "lteq": operator.le, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b}


def _bounded_compare(left: Any, *rest: Any) -> bool:
    """`a == b`, `a < b < c`, `a in b` in templates: comparing two huge values is one long C call that neither
    the watchdog nor Ctrl-C can interrupt, so their sizes are checked first (templates compile to this call)."""
    _tick()
    for i in range(0, len(rest), 2):
        op, right = rest[i], rest[i + 1]
        if not (isinstance(right, str) and isinstance(left, str)):  # substring tests and str == str are linear
            cost = _weight(left) * (_weight(right) if op in ("in", "notin") else 1) + _weight(right)
            if cost > MAX_ITEMS:
                raise SecurityError(f"comparing values of more than {MAX_ITEMS} items")
        if not _COMPARISONS[op](left, right):
            return False
        left = right
    return True


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles comparisons to environment.compare(...) so that their operands' sizes can be checked."""

    def visit_Compare(self, node: jinja2.nodes.Compare, frame: Any) -> None:  # noqa: N802 - Jinja's naming
        self.write("environment.compare(")
        self.visit(node.expr, frame)
        for operand in node.ops:
            self.write(f", {operand.op!r}, ")
            self.visit(operand.expr, frame)
        self.write(")")


def _refuse_if_larger(estimate: int, what: str) -> None:
    if estimate > MAX_VALUE_CHARS:
        raise SecurityError(f"{what} would build about {estimate} characters (limit {MAX_VALUE_CHARS})")


def _rough_len(value: Any, depth: int = 0) -> int:
    """Upper-bound-ish printed size of a value; an int counts as its magnitude since it may be a field width."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return max(24, min(abs(value), MAX_VALUE_CHARS + 1))
    if isinstance(value, (list, tuple, dict)) and depth < 4:
        items = list(value.items()) if isinstance(value, dict) else value
        total = 2
        for item in items:
            total += 2 + _rough_len(item, depth + 1)
            if total > MAX_VALUE_CHARS:
                break
        return total
    return 64


def _check_format(fmt: str, args: Any, style: str) -> None:
    """printf ('%') or str.format: every field may hold the largest argument (or be padded to an int width)."""
    if (_HUGE_PRINTF_WIDTH if style == "printf" else _HUGE_FORMAT_WIDTH).search(fmt):
        raise SecurityError("format string with a huge field width")
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, (list, tuple)) else [args]
    fields = fmt.count("%" if style == "printf" else "{")
    widest = max((_rough_len(v) for v in values), default=0)
    _refuse_if_larger(len(fmt) + fields * widest, "formatting")


def _check_join(separator: str, items: list[Any]) -> None:
    total = len(separator) * max(len(items) - 1, 0)
    for item in items:
        total += _rough_len(item)
        if total > MAX_VALUE_CHARS:
            break
    _refuse_if_larger(total, "join")


def _check_replace(text: str, old: str, new: str, count: Any = -1) -> None:
    occurrences = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        occurrences = min(occurrences, count)
    _refuse_if_larger(len(text) + occurrences * max(len(new) - len(old), 0), "replace")


def _precheck_str_method(method: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Calls like s.join(...), s.replace(...) can allocate gigabytes in one C call: estimate first.
    Returns the arguments to call with (an iterator given to join is materialized once, here)."""
    owner = getattr(method, "__self__", None)
    if not isinstance(owner, str):
        return args
    name = getattr(method, "__name__", "")
    if name == "join" and len(args) == 1:
        items = list(args[0])
        _check_size(items)
        _check_join(owner, items)
        return (items,)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _refuse_if_larger(len(owner) + owner.count("\t") * max(size, 0), "expandtabs")
    return args


def _check_int_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARGUMENT:
            raise SecurityError(f"argument {value} is larger than the {MAX_INT_ARGUMENT} limit")


class _BoundedRange(Sequence):
    """range() for templates: bounded length, and every item iterated counts against the render's budget."""

    def __init__(self, rng: range) -> None:
        self._range = rng

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        item = self._range[index]
        return _BoundedRange(item) if isinstance(item, range) else item

    def __iter__(self) -> Iterator[int]:
        budget = _budget()
        for value in self._range:
            if budget is not None:
                budget.iterations += 1
                if budget.iterations > MAX_ITERATIONS:
                    raise SecurityError(f"the template iterated more than {MAX_ITERATIONS} range() items")
                if budget.iterations % 1024 == 0:
                    _tick()
            yield value

    def __reversed__(self) -> Iterator[int]:
        return iter(_BoundedRange(self._range[::-1]))

    def __contains__(self, value: object) -> bool:
        return value in self._range

    def __repr__(self) -> str:
        return repr(self._range)


def _bounded_range(*args: int) -> _BoundedRange:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng)} items is larger than the {MAX_RANGE} limit")
    return _BoundedRange(rng)


class _TemplateNamespace(Namespace):
    """namespace() whose attributes cannot be dunder names and cannot hold oversized values."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name, value)
        _tick()
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")
        _check_size(value)


def _template_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return _check_size(dict(*args, **kwargs))


def _raise_exception(message: Any) -> None:
    raise TemplateRaisedError(f"the chat template rejected the messages: {_one_line(str(message))}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters, which prompts must not have).
    if (isinstance(indent, int) and indent > 64) or (isinstance(indent, str) and len(indent) > 64):
        raise SecurityError("tojson indent is over 64")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it); renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


@jinja2.pass_environment
def _join_filter(environment: Any, value: Any, d: Any = "", attribute: Any = None) -> str:
    # Jinja's join, consuming the items one by one so that the size limit applies before the join allocates.
    separator = str(d)
    if attribute is not None:
        value = map(make_attrgetter(environment, attribute), value)
    parts: list[str] = []
    size = 0
    for index, item in enumerate(value):
        text = str(item)
        size += len(text) + (len(separator) if index else 0)
        _refuse_if_larger(size, "join")
        parts.append(text)
        if index % 1024 == 1023:
            _tick()
    return separator.join(parts)


def _replace_filter(s: Any, old: Any, new: Any, count: Any = None) -> str:
    text, old, new = str(s), str(old), str(new)
    _check_replace(text, old, new, -1 if count is None else count)
    return text.replace(old, new, -1 if count is None else count)


def _make_indent_filter(original: Any) -> Any:
    def indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
        text = str(s)
        _refuse_if_larger(len(text) + (text.count("\n") + 1) * max(pad, 0), "indent")
        return original(s, width, first, blank)

    return indent


def _make_format_filter(original: Any) -> Any:
    def format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_format(str(value), kwargs if kwargs else args, "printf")
        return original(value, *args, **kwargs)

    return format_filter


@jinja2.pass_environment
def _sum_filter(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    # sum() of lists/strings is quadratic inside one C call; accumulate linearly with the size checks instead.
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    if isinstance(start, (int, float)) and not isinstance(start, bool):
        total = start
        for index, item in enumerate(iterable):
            total = total + item
            if index % 1024 == 1023:
                _tick()
        return total
    if not isinstance(start, (list, tuple)):
        raise SecurityError("sum() with a non-numeric, non-list start value")
    accumulated = list(start)
    for item in iterable:
        accumulated.extend(item)
        _check_size(accumulated)
        _tick()
    return type(start)(accumulated)


def _guard_filter(func: Any) -> Any:
    # Filters are called directly by compiled templates (not through Environment.call), so each gets the checks.
    leading = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1  # (context/env,) value, then arguments

    @wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_int_arguments(args[leading:], kwargs)
        _check_sizes(args[leading - 1:], kwargs)
        return _check_size(func(*args, **kwargs))

    return guarded


class _ChatSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _BoundedCodeGenerator
    compare = staticmethod(_bounded_compare)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja returns an Undefined that renders as "" and fails only on use; a template that reaches for
        # internals is hostile, so stop right away.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = str(value.__self__)

        def checked_format(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, [*args, *kwargs.values()], "format")
            return wrapped(*args, **kwargs)

        return checked_format

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(abs(left), 2).bit_length() * right > MAX_EXPONENT_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and not isinstance(count, bool):
                    size = len(seq) if isinstance(seq, str) else _weight(seq)
                    if size * count > (MAX_VALUE_CHARS if isinstance(seq, str) else MAX_ITEMS):
                        raise SecurityError(f"repeating a value {count} times is over the size limit")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right, "printf")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if isinstance(left, str) and isinstance(right, str):
                    if len(left) + len(right) > MAX_VALUE_CHARS:
                        raise SecurityError("concatenation is over the size limit")
                elif _weight(left) + _weight(right) > MAX_ITEMS:
                    raise SecurityError("concatenation is over the size limit")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        _check_int_arguments(args, kwargs)
        _check_sizes(args, kwargs)
        args = _precheck_str_method(__obj, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _make_environment() -> _ChatSandbox:
    env = _ChatSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        autoescape=False, finalize=_check_size,  # every {{ value }} is sized before it is turned into text
    )
    env.filters.update(
        tojson=_tojson,
        join=_join_filter,
        replace=_replace_filter,
        indent=_make_indent_filter(env.filters["indent"]),
        format=_make_format_filter(env.filters["format"]),
        sum=_sum_filter,
    )
    env.filters = {name: _guard_filter(func) for name, func in env.filters.items()}
    env.globals.pop("lipsum", None)  # generates text in a Python loop; no template needs it
    env.globals.update(
        range=_bounded_range,
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        namespace=_TemplateNamespace,
        dict=_template_dict,
    )
    return env


_ENV = _make_environment()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def compile_chat_template(template: str) -> jinja2.Template:
    """Parse and compile a chat template once (cached); syntax problems raise InvalidModelError."""
    if not isinstance(template, str):
        raise InvalidModelError(f"chat template should be a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidModelError(f"chat template is {len(template)} characters, over the {MAX_TEMPLATE_CHARS} limit")
    try:
        return _compile(template)
    except TemplateSyntaxError as exc:
        raise InvalidModelError(f"chat template has a syntax error at line {exc.lineno}: {_one_line(exc.message or '')}") from None
    except (RecursionError, MemoryError, SyntaxError) as exc:
        raise InvalidModelError(f"chat template cannot be compiled ({type(exc).__name__}); it is too deeply nested") from None
    except TemplateError as exc:
        raise InvalidModelError(f"chat template cannot be compiled: {_one_line(str(exc))}") from None


class _Watchdog:
    """Raises _RenderTimeout in the calling thread after `seconds` (catches loops that call nothing we hook)."""

    def __init__(self, seconds: float) -> None:
        self._thread_id = threading.get_ident()
        self._lock = threading.Lock()
        self._done = False
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _set_async_exc(self, exc: Any) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread_id), exc)

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self._fired = True
                self._set_async_exc(ctypes.py_object(_RenderTimeout))

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with self._lock:
            self._done = True
            if self._fired:
                self._set_async_exc(None)  # drop a timeout that was scheduled but not delivered yet
        self._timer.cancel()


def _plain(value: Any, depth: int = 0) -> Any:
    """Copy caller data into plain JSON-like values, so the template sees no Python objects of ours."""
    if depth > 64:
        raise InvalidModelError("chat messages are nested more than 64 levels deep")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    return str(value)


def render_chat(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a chat template the way transformers' apply_chat_template(tokenize=False) does.

    `extra` becomes template variables too (tools, documents, enable_thinking, other special tokens...).
    Hostile or broken templates raise InvalidModelError; raise_exception() raises TemplateRaisedError.
    """
    compiled = compile_chat_template(template)
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
        raise InvalidModelError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    context = {
        # transformers always passes these two (as None when absent): `tools is not none` must be false
        "tools": None,
        "documents": None,
        **{key: _plain(value) for key, value in extra.items()},
        "messages": _plain(list(messages)),
        "add_generation_prompt": bool(add_generation_prompt),
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    previous = _budget()
    _state.budget = _Budget(deadline=time.monotonic() + TIME_LIMIT_SECONDS)
    pieces: list[str] = []
    try:
        try:
            with _Watchdog(TIME_LIMIT_SECONDS + 0.25):
                size = 0
                for piece in compiled.generate(**context):
                    size += len(piece)
                    if size > MAX_VALUE_CHARS:
                        raise SecurityError(f"the rendered prompt is over {MAX_VALUE_CHARS} characters")
                    pieces.append(piece)
        finally:
            _state.budget = previous
    except _RenderTimeout:
        raise InvalidModelError(f"chat template did not finish within {TIME_LIMIT_SECONDS:g} s; it loops too much") from None
    except TemplateRaisedError:
        raise
    except RecursionError:
        raise InvalidModelError("chat template recursed too deeply") from None
    except MemoryError:
        raise InvalidModelError("chat template ran out of memory") from None
    except SecurityError as exc:
        raise InvalidModelError(f"chat template did something unsafe: {_one_line(str(exc))}") from None
    except TemplateError as exc:
        raise InvalidModelError(f"chat template failed: {_one_line(str(exc))}") from None
    except InvalidModelError:
        raise
    except Exception as exc:
        raise InvalidModelError(f"chat template failed: {type(exc).__name__}: {_one_line(str(exc))}") from None
    return "".join(pieces)


# ----------------------------------------------------------------------------------------------------------------
# loading


def _pick_template(value: Any, where: str) -> str | None:
    """A template string, or the "default" one of a list/dict of named templates."""
    if value is None or isinstance(value, str):
        return value
    named: dict[str, Any] = {}
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                named[entry["name"]] = entry.get("template")
    elif isinstance(value, Mapping):
        named = dict(value)
    else:
        raise InvalidModelError(f"{where}: chat_template should be a string or a list of named templates")
    if "default" not in named:
        names = ", ".join(sorted(named)) or "none"
        raise InvalidModelError(f"{where}: several chat templates ({names}) but none is named 'default'")
    template = named["default"]
    if not isinstance(template, str):
        raise InvalidModelError(f"{where}: the 'default' chat template is not a string")
    return template


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > 4 * MAX_TEMPLATE_CHARS:
        raise InvalidModelError(f"{path} is {size} bytes, too large for a chat template")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidModelError(f"{path} is not valid UTF-8") from None


def load_chat_template(folder: str | Path) -> str | None:
    """The chat template of a Hugging Face folder, in transformers' order of precedence: chat_template.jinja,
    chat_template.json, then tokenizer_config.json's "chat_template" (a string, or named templates -> "default")."""
    from ondevice.tokenizer import read_json_file

    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            data = read_json_file(path)
            if not isinstance(data, Mapping):
                raise InvalidModelError(f"{path} should hold a JSON object")
            template = _pick_template(data.get("chat_template"), str(path))
            if template is not None:
                return template
    return None


__all__ = [
    "MAX_ITERATIONS",
    "MAX_RANGE",
    "MAX_TEMPLATE_CHARS",
    "MAX_VALUE_CHARS",
    "TIME_LIMIT_SECONDS",
    "TemplateRaisedError",
    "compile_chat_template",
    "load_chat_template",
    "render_chat",
]
