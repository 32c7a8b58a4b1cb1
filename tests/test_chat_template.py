"""Chat templates rendered as transformers renders them, and bounded: each way a template from the
internet could run for hours or take gigabytes, refused within the deadline and the size bound."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from mlxinfer import chat_template
from mlxinfer.chat_template import CHAT_TEMPLATE_SECONDS, render_chat_template

MESSAGES = [{"role": "user", "content": "x"}]


def _render(template):
    """What Tokenizer.apply_chat_template passes (a tokenizer without BOS/EOS tokens)."""
    return render_chat_template(
        template, MESSAGES, add_generation_prompt=True, bos_token="", eos_token=""
    )


def test_chat_template_raise_exception_is_a_clear_error():
    with pytest.raises(ValueError, match="roles must alternate"):
        _render("{{ raise_exception('roles must alternate') }}")


@pytest.mark.parametrize(
    "template, why",
    [
        (
            "{% for i in range(10**9) %}{{ i }}{% endfor %}",
            "OverflowError: Range too big. The sandbox blocks ranges larger than MAX_RANGE",
        ),
        ("{{ messages | length / 0 }}", "ZeroDivisionError: division by zero"),
        ("{{ format_messages(messages) }}", "'format_messages' is undefined"),
        ("{{ messages() }}", "TypeError: 'list' object is not callable"),
        ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
        ("{% for m in messages %}{{ m.content }}", "Unexpected end of template"),  # syntax
    ],
)
def test_chat_template_failures_are_value_errors(template, why):
    """Whatever a model's chat template raises, the caller gets one ValueError that says the chat
    template failed and why, not the sandbox's own exception."""
    with pytest.raises(ValueError, match="^chat template error: ") as error:
        _render(template)
    assert why in str(error.value)
    assert type(error.value) is ValueError


def _render_measured(template):
    """(the error rendering raised, seconds taken, peak bytes Python allocated)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError) as error:
            _render(template)
        return str(error.value), time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chat_template_loop_stops_at_the_deadline():
    """Nested range() loops (10^10 empty steps: the sandbox bounds each range, not their nesting)
    used to hang apply_chat_template forever."""
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    message, seconds, _ = _render_measured(template)
    assert message == (
        f"chat template error: rendering took longer than {CHAT_TEMPLATE_SECONDS:g} s "
        "(the limit for a chat template)"
    )
    assert seconds < CHAT_TEMPLATE_SECONDS + 2


def test_chat_template_repetition_is_refused_before_it_allocates():
    """{{ 'x' * 3000000000 }} used to take 3 GB within seconds (a MemoryError where less was
    free); it is refused before the string exists."""
    message, seconds, peak = _render_measured("{{ 'x' * 3000000000 }}")
    assert message == (
        "chat template error: it builds a value of more than 4,194,304 characters or items "
        "(the limit for a chat template)"
    )
    assert seconds < 1 and peak < 16 * 2**20


def test_chat_template_huge_output_is_refused():
    """100,000 steps of 1,000 characters each: 100 MB of prompt used to be rendered (and then
    tokenized); the output stops at the bound."""
    template = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    message, seconds, peak = _render_measured(template)
    assert message == (
        "chat template error: its output is longer than 4,194,304 characters "
        "(the limit for a chat template)"
    )
    assert seconds < 2 and peak < 64 * 2**20


BIG = "4000000"
HOSTILE_TEMPLATES = {
    "a power": ("{{ 10 ** 10000000 }}", "an integer of more than 4096 bits"),
    "squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
        "{% endfor %}",
        "an integer of more than 4096 bits",
    ),
    "a list repeated": ("{{ ([1] * 3000000000)|length }}", "a value of more than"),
    "a printf width": ("{{ '%3000000000s' % 'x' }}", "a value of more than"),
    "a format width": ("{{ '{:>3000000000}'.format('x') }}", "a value of more than"),
    "a format filter": ("{{ '%3000000000s'|format('x') }}", "a value of more than"),
    "a field repeated": ("{{ ('{0}' * 1000).format('x' * " + BIG + ") }}", "a value of more"),
    "ljust": ("{{ 'x'.ljust(3000000000) }}", "a value of more than"),
    "center": ("{{ 'x'|center(3000000000) }}", "a value of more than"),
    "expandtabs": ("{{ ('\t' * " + BIG + ").expandtabs(" + BIG + ") }}", "a value of more"),
    "replace ''": ("{{ ('x' * " + BIG + ").replace('', 'y' * 4000) }}", "a value of more"),
    "a long separator": (
        "{{ range(2000)|map('string')|join('x' * " + BIG + ") }}",
        "a value of more than",
    ),
    "translate": ("{{ ('x' * " + BIG + ").translate({120: 'y' * 4000}) }}", "a value of more"),
    "indent": ("{{ ('\n' * " + BIG + ")|indent(" + BIG + ", blank=True) }}", "a value of more"),
    "batch": ("{{ [1]|batch(3000000000, 'x')|list|length }}", "a value of more than"),
    "doubling with +": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "a value of more than",
    ),
    "doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "a value of more than",
    ),
    "a list doubled by sharing": (  # 2**64 items to print, held in 64 lists
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l }}",
        "(the limit for a chat template)",
    ),
    "namespaces doubled by sharing": (
        "{% set ns = namespace(n=1) %}{% for i in range(64) %}"
        "{% set ns.n = namespace(a=ns.n, b=ns.n) %}{% endfor %}{{ ns.n }}",
        "(the limit for a chat template)",
    ),
    "dict.fromkeys": ("{{ {}.fromkeys(range(100000), 'x' * " + BIG + ") }}", "a value of more"),
    "macro recursion": (  # 2**60 calls, no loop
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "rendering took longer than",
    ),
    "output held by a set block": (
        "{% set x %}{% for i in range(100000) %}{{ 'y' * " + BIG + " }}{% endfor %}{% endset %}",
        "it writes more than 16,777,216 characters",
    ),
    "a lazy map": (
        "{{ 'a' in (range(100000)|map('center', " + BIG + ")) }}",
        "rendering took longer than",
    ),
    "tojson's indent": ("{{ [[[1]]]|tojson(indent=100000000) }}", "indent is 100000000 wide"),
}


@pytest.mark.parametrize("template, why", HOSTILE_TEMPLATES.values(), ids=list(HOSTILE_TEMPLATES))
def test_chat_template_cost_is_bounded(monkeypatch, template, why):
    """Each way a template could take gigabytes or run for hours, refused (before the big value
    exists where one operation would make it) within the deadline, shortened here to 1.5 s (the
    size checks answer within ~0.1 s; the margin is for a loaded machine, tracemalloc slowing
    Python down). Before the bounds each of these hung or took gigabytes."""
    monkeypatch.setattr(chat_template, "CHAT_TEMPLATE_SECONDS", 1.5)
    message, seconds, peak = _render_measured(template)
    assert message.startswith("chat template error: ") and why in message
    assert seconds < 4 and peak < 128 * 2**20


RICH_TEMPLATE = """\
{%- macro render(content) -%}
{%- if content is string -%}{{ content | trim }}{%- else -%}
{%- for part in content -%}{{ part['text'] }}{{ ', ' if not loop.last }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(users=0, names=[]) -%}
{{ bos_token }}
{%- if tools %}{{ '<tools>' ~ (tools | tojson(indent=4)) ~ '</tools>\n' }}{% endif %}
{%- for message in messages %}
{%- if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
{%- set ns.names = ns.names + [message['role'] | upper] %}
{{- '<|%s|>' % message['role'] }}{{ '[{}/{}]'.format(loop.index, loop.length) }}
{{- render(message['content']) | replace('secret', '******') }}
{{- loop.cycle('\n', '\n\n') }}
{%- endfor %}
{%- set summary %}{% for name in ns.names | unique | sort %}{{ name }};{% endfor %}{% endset %}
{{- summary | indent(2) }} users={{ ns.users }} {{ ['a', 'b'] * 2 }} {{ {'k': [1, 2]} }}
{{- ' ' ~ ('=' * 10) ~ ' ' ~ ('%05.1f' | format(3.14159)) ~ ' ' ~ 'x'.center(7, '*') }}
{%- for row in messages | map(attribute='role') | batch(2, '-') %} {{ row | join('+') }}{% endfor %}
{%- for item in [{'n': 'a', 'c': [{'n': 'b', 'c': []}]}] recursive %} {{ item.n }}({{ loop(item.c) }}){% endfor %}
{%- for m in messages if m.role == 'nobody' %}never{% else %} none{% endfor %}
{%- set me = namespace(name='me') %}{% set me.me = me %} {{ [me] }}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"""


def test_bounded_rendering_matches_transformers():
    """The bounds change no output: a template using loops (recursive, filtered, with else),
    macros, namespaces (one holding itself), `{% set %}` blocks, `~`, `%`, `*`, format, tojson and
    the common filters renders as transformers' own sandbox renders it (the default model's
    template: above)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    messages = [
        {"role": "system", "content": "  Be terse.  "},
        {"role": "user", "content": [{"type": "text", "text": "my secret"}, {"text": "x"}]},
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "And?"},
    ]
    tools = [{"name": "f", "parameters": {"a": {"type": "int"}, "b": ["x", None, 1.5]}}]
    variables = dict(tools=tools, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    ours = render_chat_template(RICH_TEMPLATE, messages, **variables)
    expected = _compile_jinja_template(RICH_TEMPLATE).render(messages=messages, **variables)
    assert ours == expected
    assert "<|user|>[2/4]my ******, x" in ours and " a( b())" in ours  # it did run
