"""Tokenizer: `tokenizers` for tokenizer.json or a BPE rebuilt from GGUF metadata, Jinja chat
templates rendered as Hugging Face renders them, and a streaming detokenizer."""

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
from pathlib import Path
from string import Formatter
from types import GeneratorType
from typing import Any

from jinja2 import Template, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .config import ModelLoadError, model_file, read_json

# GGUF token types (llama.cpp's llama_token_type).
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# llama.cpp `tokenizer.ggml.pre` names -> the pre-tokenizer the original tokenizer.json used.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf_pre_tokenizer(pre: str, source: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own token.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    patterns = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
    if pre in patterns:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ModelLoadError(
        f"{source}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
        "default, gpt2, smollm, llama-bpe, qwen2"
    )


class Tokenizer:
    """Text <-> token ids, special tokens, EOS ids and the chat template of one model."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        eos_token_ids: Iterable[int] = (),
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ):
        self._tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.add_bos_token = (
            add_bos_token  # prepend BOS when the tokenizer.json does not do it itself
        )
        self._compiled_chat_template: tuple[str, Template] | None = None  # see _chat_template()
        ids = list(dict.fromkeys(eos_token_ids))
        if eos_token is not None and (eos_id := tokenizer.token_to_id(eos_token)) is not None:
            ids.append(eos_id)
        self.eos_token_ids: set[int] = set(ids)

    @functools.cached_property
    def vocab_size(self) -> int:
        """One more than the largest token id, added tokens included: ids lie in [0, vocab_size).
        (A tokenizer.json may leave gaps, so this can exceed the number of tokens.)"""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS where the model expects it."""
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` with the model's Jinja chat template, as transformers does; return token
        ids (no extra BOS: the template writes its own) or the text when tokenize=False."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        text = render_chat_template(
            self._chat_template(),
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _chat_template(self) -> Template:
        """The chat template compiled once (compiling costs far more than rendering), again only
        if `chat_template` is assigned a new string."""
        cached = self._compiled_chat_template
        if cached is None or cached[0] != self.chat_template:
            cached = (self.chat_template, compile_chat_template(self.chat_template))
            self._compiled_chat_template = cached
        return cached[1]

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and any chat template file from a model dir."""
        path = Path(path)
        tokenizer_file = model_file(path, "tokenizer.json")
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{tokenizer_file}: tokenizer file not found")
        try:
            tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"{tokenizer_file}: invalid tokenizer ({e})") from None
        config = {}
        if (config_file := model_file(path, "tokenizer_config.json")).is_file():
            config = read_json(config_file, "tokenizer config")
        ids = list(eos_token_ids)
        generation_config = model_file(path, "generation_config.json")
        if generation_config.is_file():
            ids += _id_list(read_json(generation_config, "generation config").get("eos_token_id"))
        return cls(
            tokenizer,
            eos_token_ids=ids,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            chat_template=_find_chat_template(path, config),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], source: str) -> Tokenizer:
        """Rebuild the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(
                f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', "
                "byte-level BPE)"
            )
        try:
            tokens: list[str] = metadata["tokenizer.ggml.tokens"]
            merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        except KeyError as e:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {e.args[0]!r}") from None
        types = metadata.get("tokenizer.ggml.token_type")
        vocab = {token: i for i, token in enumerate(tokens)}
        tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        tokenizer.pre_tokenizer = _gguf_pre_tokenizer(
            metadata.get("tokenizer.ggml.pre", "default"), source
        )
        tokenizer.decoder = decoders.ByteLevel()
        if types is not None:
            added = [
                AddedToken(tokens[i], special=t == _GGUF_CONTROL, normalized=False)
                for i, t in enumerate(types)
                if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
            ]
            tokenizer.add_tokens(added)

        def token(key: str) -> str | None:
            i = metadata.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eos_ids = [
            metadata[k]
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if k in metadata
        ]
        return cls(
            tokenizer,
            eos_token_ids=eos_ids,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            chat_template=metadata.get("tokenizer.chat_template"),
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas that never end inside a UTF-8 character.

    Decodes a short window (from `prefix_offset`) rather than the whole sequence each step, and keeps
    one already-emitted token of context so tokenizers that drop a leading space still decode right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens before this are emitted
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.tokens.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset])
        full = decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self.text += delta
            return delta
        return ""

    def finalize(self) -> str:
        """Flush whatever is left, except the bytes of a character cut off by the end of generation
        (they would decode to U+FFFD): the final text never holds half a character."""
        rest = self.tokenizer.decode(self.tokens[self.read_offset :]).rstrip("\ufffd")
        self.read_offset = len(self.tokens)
        self.prefix_offset = self.read_offset
        self.text += rest
        return rest


# -- chat templates -------------------------------------------------------------------------------

# A chat template comes with the model, from the internet, and runs at every chat. The sandbox keeps
# it from reaching Python; these bound what it may cost. Real templates take under a millisecond
# and write their messages plus a little markup; the size bound is about 1M tokens of text.
CHAT_TEMPLATE_SECONDS = 2.0
CHAT_TEMPLATE_MAX_SIZE = 2**22  # characters of a string or of the output, items of a container
_MAX_INT_BITS = 4096  # a template counts messages; no integer it needs comes near this


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


def _find_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """transformers >= 4.43 writes chat_template.jinja; older files keep it in tokenizer_config.json
    (a string, or a list of named templates) or chat_template.json."""
    if (jinja_file := model_file(path, "chat_template.jinja")).is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None and (json_file := model_file(path, "chat_template.json")).is_file():
        template = read_json(json_file, "chat template").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _token_content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
