"""Chat templates: a model's Jinja template rendered as transformers renders it, bounded in time
and size.

A chat template comes with the model, from the internet, and runs at every chat. transformers'
sandbox (kept here) stops it from reaching Python, not from spending: nested `range(100000)` loops
hung the first chat forever, and `{{ 'x' * 3000000000 }}` took 3 GB within seconds. So every loop
step, call and piece of output checks a deadline (CHAT_TEMPLATE_SECONDS), and every string,
container and output the template builds is held to CHAT_TEMPLATE_MAX_SIZE, checked before the
value exists where one operation would multiply it (`*`, `**`, `%`, widths, `replace`, `join`).
Real templates take under a millisecond and write their messages plus a little markup; the size
bound is about 1M tokens of text. Whatever goes wrong is a ValueError: 'chat template error: ...'.

`_BoundedSandbox` is transformers' environment with its operators, calls, filters and output
checked; `_BoundedCodeGenerator` routes each `{% for %}`, list, tuple, dict and `~` through it;
`_size` measures a value as printing it would write it.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from operator import length_hint
from string import Formatter
from types import GeneratorType
from typing import Any

from jinja2 import Template, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

CHAT_TEMPLATE_SECONDS = 2.0
CHAT_TEMPLATE_MAX_SIZE = 2**22  # characters of a string or of the output, items of a container
_MAX_INT_BITS = 4096  # a template counts messages; no integer it needs comes near this

# Gemma's turn format, for Gemma GGUF files that carry no template (llama.cpp, too, knows this
# format by name): `model` for the assistant's role; a system message opens the first user turn;
# roles alternate, starting with the user.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- set first_prefix = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' -%}
{%- set turns = messages[1:] if messages[0]['role'] == 'system' else messages -%}
{%- for message in turns -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}
{{- (first_prefix if loop.first else '') + message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


@dataclass
class _Rendering:
    """The one render in progress on this thread (or task): see `render_chat_template`."""

    deadline: float
    written: int = 0  # characters written by `{{ ... }}`, in macros and `{% set %}` blocks too


_rendering: ContextVar[_Rendering | None] = ContextVar("chat_template_rendering", default=None)


def render_chat_template(
    template: str | Template, messages: list[dict[str, Any]], **variables: Any
) -> str:
    """Render a Hugging Face chat template (its source, or compiled by `compile_chat_template`) with
    the environment transformers uses, within CHAT_TEMPLATE_SECONDS and CHAT_TEMPLATE_MAX_SIZE.
    Whatever goes wrong in the template is a ValueError that starts 'chat template error:'."""
    if isinstance(template, str):
        template = compile_chat_template(template)
    rendering = _rendering.set(_Rendering(deadline=time.monotonic() + CHAT_TEMPLATE_SECONDS))
    try:
        return template.render(messages=messages, **variables)
    except Exception as e:  # the sandbox's OverflowError, ZeroDivisionError, TypeError, ...
        raise _template_error(e) from None
    finally:
        _rendering.reset(rendering)


def compile_chat_template(template: str) -> Template:
    """A chat template's source compiled in the shared sandboxed environment."""
    try:
        return _chat_environment().from_string(template)
    except Exception as e:  # TemplateSyntaxError, and anything else compiling may raise
        raise _template_error(e) from None


def _template_error(e: Exception) -> ValueError:
    """The model's chat template failed: say so, and why (a Jinja error's own message suffices;
    any other exception is named, e.g. 'OverflowError: Range too big...')."""
    why = str(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
    return ValueError(f"chat template error: {why}")


@functools.cache  # one environment: it holds no per-template state, and templates cannot change it
def _chat_environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        width = len(indent) if isinstance(indent, str) else indent or 0
        if width > 16:  # each line repeats it once per level of nesting
            raise _limit(f"tojson's indent is {width} wide, more than 16")
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = _BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        finalize=_BoundedSandbox.write,
    )
    # Unused by chat templates, and each writes far more than it is given.
    del env.globals["lipsum"], env.filters["urlize"]
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles a chat template so that each `{% for %}` goes through `environment.loop_steps`
    and each list, tuple, dict and `~` string it builds through `environment.bounded`."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        steps = nodes.Call(nodes.EnvironmentAttribute("loop_steps"), [node.iter], [], None, None)
        bounded = nodes.For(node.target, steps, node.body, node.else_, node.test, node.recursive)
        super().visit_For(bounded.set_lineno(node.lineno), frame)

    def _bounded(self, visit: Callable, node: nodes.Expr, frame: Frame) -> None:
        self.write("environment.bounded(")
        visit(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":  # not `{% for a, b in ... %}`
            self._bounded(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._bounded(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._bounded(super().visit_Dict, node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self._bounded(super().visit_Concat, node, frame)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with each way a template spends time or memory bounded.

    Time: every loop step, call and piece of output checks the deadline. Size: no string, list,
    dict or output built by the template may exceed CHAT_TEMPLATE_MAX_SIZE, a part it repeats
    counted each time (as printing it would): operators, calls, filters, literals and `~` are
    checked after they build a value, and the ones that multiply (`*`, `**`, `%`, padding and
    format widths, `replace`, `join`: _STR_METHOD_SIZE, _FILTER_SIZE) before. So a template is
    stopped within about the deadline plus one bounded step."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":  # by far the most common: checked after, strings cheaply
            result = left + right
            if type(result) is str and len(result) <= CHAT_TEMPLATE_MAX_SIZE:
                return result
            return _bounded(result)
        if operator == "*" and isinstance(left, int) and isinstance(right, int):
            _check_int_bits(left.bit_length() + right.bit_length())
        elif operator == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                _check_size(_size(sequence) * count)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0:
                _check_int_bits(left.bit_length() * right)
        elif operator == "%" and isinstance(left, str):
            _check_size(_format_size(left, "%", right))
        return _bounded(super().call_binop(context, operator, left, right))

    def call(self, context: Context, function: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        args, kwargs = _expanded(args), _expanded(kwargs)
        method = getattr(function, "__wrapped__", function)  # the sandbox wraps str.format
        subject, name = getattr(method, "__self__", None), getattr(method, "__name__", None)
        if isinstance(subject, str) and name in _STR_METHOD_SIZE:
            _check_size(_STR_METHOD_SIZE[name](subject, *args, **kwargs))
        return _bounded(super().call(context, function, *args, **kwargs))

    @staticmethod
    def concat(pieces: Iterable[str]) -> str:
        """Join output (the template's, a macro's, a `{% set %}` block's) as it is written."""
        written, size = [], 0
        for piece in pieces:
            _check_time()
            size += len(piece)
            if size > CHAT_TEMPLATE_MAX_SIZE:
                raise _limit(f"its output is longer than {CHAT_TEMPLATE_MAX_SIZE:,} characters")
            written.append(piece)
        return "".join(written)

    @staticmethod
    def write(value: Any) -> str:
        """Each `{{ ... }}` (the environment's `finalize`). Counted across the render: what a
        macro or a `{% set %}` block writes is held until the end of the block. A macro's output
        is counted again where it is written, hence the margin."""
        text = str(value)
        rendering = _rendering.get()
        if rendering is not None:
            rendering.written += len(text)
            if rendering.written > 4 * CHAT_TEMPLATE_MAX_SIZE:
                raise _limit(f"it writes more than {4 * CHAT_TEMPLATE_MAX_SIZE:,} characters")
        return text

    def loop_steps(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """What every `{% for %}` iterates (see _BoundedCodeGenerator)."""
        for item in iterable:
            _check_time()
            yield item

    def bounded(self, value: Any) -> Any:
        """A list, tuple, dict or `~` string the template wrote (see _BoundedCodeGenerator)."""
        return _bounded(value)


def _bounded_filter(name: str, function: Callable) -> Callable:
    """`function`, checking the deadline, its result's size and, for the filters in _FILTER_SIZE,
    the size its arguments ask for. Jinja passes some filters a context first: not checked."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0
    expected_size = _FILTER_SIZE.get(name)

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        args, kwargs = _expanded(args), _expanded(kwargs)
        if expected_size is not None:
            _check_size(expected_size(*args[skip:], **kwargs))
        return _bounded(function(*args, **kwargs))

    return bounded


# Upper bounds on the size of what these str methods and filters return, for those whose result
# can be far larger than their arguments. Called with the method's or filter's own arguments.
_STR_METHOD_SIZE: dict[str, Callable[..., int]] = {
    "ljust": lambda s, width, fillchar=" ": len(s) + width,
    "rjust": lambda s, width, fillchar=" ": len(s) + width,
    "center": lambda s, width, fillchar=" ": len(s) + width,
    "zfill": lambda s, width: len(s) + width,
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * tabsize,
    "replace": lambda s, old, new, count=-1: _replaced_size(s, old, new, count),
    "join": lambda s, items: _size(items) + len(s) * length_hint(items),
    "translate": lambda s, table: len(s) * (1 + _size(table)),
    "format": lambda s, *args, **kwargs: _format_size(s, "{}", (args, kwargs)),
    "format_map": lambda s, mapping: _format_size(s, "{}", mapping),
}
_FILTER_SIZE: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80: _size(value) + width,
    "indent": lambda s, width=4, first=False, blank=False: (
        _size(s) + (str(s).count("\n") + 1) * (width if isinstance(width, int) else len(width))
    ),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, **_: (
        _size(s) * (2 + len(wrapstring or ""))
    ),
    "replace": lambda s, old, new, count=None: _replaced_size(str(s), old, new, count),
    "join": lambda value, d="", attribute=None: _size(value) + len(d) * length_hint(value),
    "format": lambda value, *args, **kwargs: _format_size(value, "%", (args, kwargs)),
    "batch": lambda value, linecount, fill_with=None: 2 * _size(value) + linecount,
    "slice": lambda value, slices, fill_with=None: 2 * _size(value) + slices,
    # sum(start=[]) of lists: each step copies what came before
    "sum": lambda iterable, attribute=None, start=0: (
        0
        if isinstance(start, (int, float))
        else length_hint(iterable) * (_size(iterable) + _size(start))
    ),
}


def _replaced_size(s: str, old: str, new: str, count: int | None) -> int:
    found = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        found = min(found, count)
    return len(s) + found * len(new)


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?([-#0 +]*[\d*]*(?:\.[\d*]*)?)[a-zA-Z%]")


def _format_size(template: str, style: str, values: Any) -> int:
    """An upper bound on the length of `template % values` (style "%") or of
    `template.format(*values)` ("{}"): its text, and for each field its width and precision and
    all of `values` (a field may name any of them, and repeat one)."""
    if style == "%":
        specs = _PERCENT_FIELD.findall(template)
    else:
        specs = [
            spec or "" for _, field, spec, _ in Formatter().parse(template) if field is not None
        ]
    if any("*" in spec or "{" in spec for spec in specs):  # widths taken from the values
        return CHAT_TEMPLATE_MAX_SIZE + 1
    widths = sum(int(n) for spec in specs for n in re.findall(r"\d+", spec))
    return len(template) + widths + len(specs) * _size(values)


def _size(value: Any) -> int:
    """Characters of strings plus items of containers, a part shared n times counted n times (as
    printing or tojson would write it), a namespace inside itself once (printing writes `...`).
    Counts no further than past CHAT_TEMPLATE_MAX_SIZE."""
    size, pending, steps = 0, [value], 0
    inside: set[int] = set()  # the namespaces the walk is in
    while pending and size <= CHAT_TEMPLATE_MAX_SIZE:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            size += len(item)
            if size <= CHAT_TEMPLATE_MAX_SIZE:
                pending.extend(item)
                if isinstance(item, dict):
                    pending.extend(item.values())
        elif isinstance(item, Namespace):  # `{% set ns.x = ... %}` can nest namespaces
            size += 1
            if id(item) not in inside:
                inside.add(id(item))
                pending += [_Leaving(id(item)), item._Namespace__attrs]
        elif isinstance(item, _Leaving):
            inside.discard(item.namespace)
        steps += 1
        if steps % 65536 == 0:
            _check_time()
    return size


@dataclass
class _Leaving:
    namespace: int  # its id


def _bounded(value: Any) -> Any:
    if type(value) is str:
        _check_size(len(value))
    elif not isinstance(value, (int, float, type(None))):
        _check_size(_size(value))
    return value


def _expanded(values: Any) -> Any:
    """Arguments (a tuple or a dict of them) with each generator (what map, select and the like
    return) expanded to a list, its items counted as they come: lazily computed items could
    otherwise add up past any bound inside one builtin such as str.join."""
    if isinstance(values, dict):
        if not any(isinstance(v, GeneratorType) for v in values.values()):
            return values
        return dict(zip(values, _expanded(tuple(values.values())), strict=True))
    if not any(isinstance(v, GeneratorType) for v in values):
        return values
    expanded = []
    for value in values:
        if isinstance(value, GeneratorType):
            items, size = [], 0
            for item in value:
                size += 1 + _size(item)
                _check_size(size)
                items.append(item)
            value = items
        expanded.append(value)
    return tuple(expanded)


def _check_time() -> None:
    rendering = _rendering.get()
    if rendering is not None and time.monotonic() > rendering.deadline:
        raise _limit(f"rendering took longer than {CHAT_TEMPLATE_SECONDS:g} s")


def _check_size(size: int) -> None:
    if size > CHAT_TEMPLATE_MAX_SIZE:
        raise _limit(
            f"it builds a value of more than {CHAT_TEMPLATE_MAX_SIZE:,} characters or items"
        )


def _check_int_bits(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise _limit(f"it computes an integer of more than {_MAX_INT_BITS} bits")


def _limit(what: str) -> SecurityError:
    return SecurityError(f"{what} (the limit for a chat template)")
