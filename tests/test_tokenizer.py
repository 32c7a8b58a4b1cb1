"""The tokenizer rebuilt from GGUF metadata against transformers' tokenizer for the same file; chat
templates against transformers' rendering; the streaming detokenizer against a whole decode."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

import mlxinfer
from mlxinfer import tokenizer as tokenizer_module
from mlxinfer.tokenizer import CHAT_TEMPLATE_SECONDS, Tokenizer

TEXTS = [
    "Hello, world!",
    "In 2024, 12345 apples cost $3.50.",  # SmolLM splits every digit
    "héllo wörld — 世界 🎉👩‍👩‍👧",
    "def f(x):\n\treturn x ** 2  # square\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",  # special tokens in text are matched whole
    "   leading spaces and trailing   ",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, 2 words max?"},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    import transformers

    path = mlxinfer.default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_matches_transformers(default_model, hf_tokenizer, text):
    _, tokenizer = default_model
    expected = hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == hf_tokenizer.decode(expected)


def test_digits_are_single_tokens(default_model):
    _, tokenizer = default_model
    ids = tokenizer.encode("31415")
    assert [tokenizer.decode([i]) for i in ids] == list("31415")


def test_special_tokens(default_model):
    _, tokenizer = default_model
    assert tokenizer.token_to_id("<|im_end|>") == 2
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.encode("<|im_start|>") == [1]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(default_model, hf_tokenizer, add_generation_prompt):
    _, tokenizer = default_model
    expected = hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    text = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text == expected
    ids = hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt) == ids


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_never_splits_a_character(default_model, text):
    _, tokenizer = default_model
    ids = tokenizer.encode(text)
    detokenizer = tokenizer.detokenizer()
    deltas = [detokenizer.add_token(i) for i in ids]
    deltas.append(detokenizer.finalize())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)
    if any(ord(c) > 127 for c in text):
        assert "" in deltas[:-1]  # some token ended mid-character and was held back


def test_streaming_detokenizer_sentencepiece_spaces(tmp_path):
    """A Metaspace tokenizer (Llama 2 / Mistral style) drops the leading space of a lone token; the
    window keeps one emitted token of context so spaces survive."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁how": 4}
    inner = HFTokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    tokenizer = Tokenizer(inner)
    ids = [1, 2, 3, 4]
    detokenizer = tokenizer.detokenizer()
    streamed = "".join(detokenizer.add_token(i) for i in ids) + detokenizer.finalize()
    assert streamed == tokenizer.decode(ids) == "Hello world! how"


def test_chat_template_from_files_and_eos_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; EOS ids come from config.json,
    generation_config.json and the tokenizer's eos_token."""
    from .reference import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "unused"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    tokenizer = Tokenizer.from_dir(tmp_path, eos_token_ids=[7])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "w9"}], tokenize=False)
    assert text == "user: w9\nassistant:"
    assert tokenizer.eos_token_ids == {2, 5, 6, 7}


def test_named_chat_templates_pick_default(tmp_path):
    from .reference import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0]['content'] }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"


def test_chat_template_raise_exception_is_a_clear_error(default_model):
    _, tokenizer = default_model
    bad = Tokenizer(
        tokenizer._tokenizer, chat_template="{{ raise_exception('roles must alternate') }}"
    )
    with pytest.raises(ValueError, match="roles must alternate"):
        bad.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("arch, pre", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_gguf_pre_tokenizers_match_transformers(tmp_path, arch, pre):
    """Llama 3 and Qwen2 GGUFs split text with their own regexes before BPE: a GGUF carrying the
    default model's vocabulary under those pre-tokenizer names must tokenize as transformers'
    GGUF converters for those architectures do."""
    import gguf
    import mlx.core as mx
    import transformers

    from mlxinfer.gguf import metadata_to_python

    source = metadata_to_python(
        mx.load(str(mlxinfer.default_model_path()), return_metadata=True)[1]
    )
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(source["tokenizer.ggml.tokens"])
    writer.add_token_merges(source["tokenizer.ggml.merges"])
    writer.add_token_types(source["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    expected = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    metadata = metadata_to_python(mx.load(str(path), return_metadata=True)[1])
    ours = Tokenizer.from_gguf(metadata, str(path))
    # These regexes differ from GPT-2's on runs of newlines (\s*[\r\n]+), which this vocabulary
    # shows; it cannot show their digit rules (SmolLM never merges digits).
    discriminating = ["a\n\nb", "x  \n\n  y", "First line.\n\n\nSecond  \n\n third\n"]
    gpt2_style = Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "gpt2"}, str(path))
    assert any(gpt2_style.encode(t) != ours.encode(t) for t in discriminating)
    for text in TEXTS + discriminating + ["Year 2024: 1234567 items, x=3.14159!"]:
        assert ours.encode(text) == expected.encode(text, add_special_tokens=False), text


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
def test_chat_template_failures_are_value_errors(default_model, template, why):
    """Whatever a model's chat template raises, the caller gets one ValueError that says the chat
    template failed and why, not the sandbox's own exception."""
    _, tokenizer = default_model
    bad = Tokenizer(tokenizer._tokenizer, chat_template=template)
    with pytest.raises(ValueError, match="^chat template error: ") as error:
        bad.apply_chat_template([{"role": "user", "content": "x"}])
    assert why in str(error.value)
    assert type(error.value) is ValueError


def test_chat_template_compiled_once(default_model, monkeypatch):
    """Compiling a template costs ~100x rendering it: a tokenizer compiles its template once, and
    again only when given a new one. Rendering is unchanged (see the transformers comparison)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    _, model_tokenizer = default_model
    compiled = []
    from_string = ImmutableSandboxedEnvironment.from_string

    def counting(self, source, *args, **kwargs):
        compiled.append(source)
        return from_string(self, source, *args, **kwargs)

    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string", counting)
    tokenizer = Tokenizer(model_tokenizer._tokenizer, chat_template=model_tokenizer.chat_template)
    first = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == first
    assert tokenizer.apply_chat_template(CONVERSATION) == tokenizer.encode(
        first, add_special_tokens=False
    )
    assert first == model_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert compiled == [model_tokenizer.chat_template]
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == "You are terse."
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == "You are terse."
    assert compiled == [model_tokenizer.chat_template, "{{ messages[0]['content'] }}"]


# -- chat templates come from the internet: bounded in time and memory ---------------------------


def _render_measured(tokenizer, template):
    """(the error apply_chat_template raised, seconds taken, peak bytes Python allocated)."""
    bad = Tokenizer(tokenizer._tokenizer, chat_template=template)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError) as error:
            bad.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        return str(error.value), time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chat_template_loop_stops_at_the_deadline(default_model):
    """Nested range() loops (10^10 empty steps: the sandbox bounds each range, not their nesting)
    used to hang apply_chat_template forever."""
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    message, seconds, _ = _render_measured(default_model[1], template)
    assert message == (
        f"chat template error: rendering took longer than {CHAT_TEMPLATE_SECONDS:g} s "
        "(the limit for a chat template)"
    )
    assert seconds < CHAT_TEMPLATE_SECONDS + 2


def test_chat_template_repetition_is_refused_before_it_allocates(default_model):
    """{{ 'x' * 3000000000 }} used to take 3 GB within seconds (a MemoryError where less was
    free); it is refused before the string exists."""
    message, seconds, peak = _render_measured(default_model[1], "{{ 'x' * 3000000000 }}")
    assert message == (
        "chat template error: it builds a value of more than 4,194,304 characters or items "
        "(the limit for a chat template)"
    )
    assert seconds < 1 and peak < 16 * 2**20


def test_chat_template_huge_output_is_refused(default_model):
    """100,000 steps of 1,000 characters each: 100 MB of prompt used to be rendered (and then
    tokenized); the output stops at the bound."""
    template = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    message, seconds, peak = _render_measured(default_model[1], template)
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
def test_chat_template_cost_is_bounded(default_model, monkeypatch, template, why):
    """Each way a template could take gigabytes or run for hours, refused (before the big value
    exists where one operation would make it) within the deadline, shortened here to 1.5 s (the
    size checks answer within ~0.1 s; the margin is for a loaded machine, tracemalloc slowing
    Python down). Before the bounds each of these hung or took gigabytes."""
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_SECONDS", 1.5)
    message, seconds, peak = _render_measured(default_model[1], template)
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


def test_bounded_rendering_matches_transformers(default_model):
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
    tokenizer = Tokenizer(
        default_model[1]._tokenizer, bos_token="<s>", eos_token="</s>", chat_template=RICH_TEMPLATE
    )
    ours = tokenizer.apply_chat_template(messages, tokenize=False, tools=tools)
    expected = _compile_jinja_template(RICH_TEMPLATE).render(
        messages=messages,
        tools=tools,
        bos_token="<s>",
        eos_token="</s>",
        add_generation_prompt=True,
    )
    assert ours == expected
    assert "<|user|>[2/4]my ******, x" in ours and " a( b())" in ours  # it did run
