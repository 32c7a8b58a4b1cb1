"""The tokenizer rebuilt from GGUF metadata against transformers' tokenizer for the same file; chat
templates against transformers' rendering; the streaming detokenizer against a whole decode."""

from __future__ import annotations

import json
import re

import pytest

import mlxinfer
from mlxinfer import ModelLoadError
from mlxinfer.tokenizer import Tokenizer

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


@pytest.mark.parametrize("text", ["龘", "🎵 music", "naïve — 東京"])
def test_a_token_holding_part_of_a_character_reads_as_its_bytes(default_model, text):
    """Byte-level BPE splits a character over tokens, each "\ufffd" decoded alone (the Inside
    page showed rows of them): token_text shows such a token's bytes, so the pieces, bytes put
    back, are the text's UTF-8 (Python's encoder is the reference)."""
    _, tokenizer = default_model
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.token_text(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert any("<0x" in p for p in pieces)  # some token is part of a character
    raw = b"".join(
        bytes.fromhex(part[3:-1]) if part.startswith("<0x") else part.encode()
        for part in re.split(r"(<0x[0-9A-F]{2}>)", "".join(pieces))
        if part
    )
    assert raw == text.encode("utf-8")


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


def test_special_tokens_as_added_token_objects(tmp_path):
    """tokenizer_config.json may write a special token as an AddedToken object: its `content`."""
    from .reference import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    added = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": added}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_ids == {2}


def test_chat_template_file_not_utf8_names_the_file(tmp_path):
    """A Latin-1 chat_template.jinja was a UnicodeDecodeError traceback."""
    from .reference import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    expected = (
        f"{tmp_path / 'chat_template.jinja'}: not UTF-8 text ('utf-8' codec can't decode byte "
        "0xe9 in position 7: invalid continuation byte)"
    )
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        Tokenizer.from_dir(tmp_path)


TEMPLATE_KIND = "a string or a list of objects with string 'name' and 'template'"
TOKEN_KIND = "a string or an object with a string 'content'"
# (file, key, value, what it must be): each value was a traceback (AttributeError, TypeError) when
# loaded or at the first chat, or silently something else ('false' as true, 'x' as an EOS id).
WRONG_KINDS = [
    ("tokenizer_config.json", "chat_template", [1], TEMPLATE_KIND),
    ("tokenizer_config.json", "chat_template", [{"name": "default"}], TEMPLATE_KIND),
    ("tokenizer_config.json", "chat_template", [{"name": "default", "template": 5}], TEMPLATE_KIND),
    ("tokenizer_config.json", "chat_template", 5, TEMPLATE_KIND),
    ("chat_template.json", "chat_template", ["{{ messages }}"], TEMPLATE_KIND),
    ("tokenizer_config.json", "eos_token", 5, TOKEN_KIND),
    ("tokenizer_config.json", "bos_token", {"content": 5}, TOKEN_KIND),
    ("tokenizer_config.json", "add_bos_token", "false", "a boolean"),
    ("generation_config.json", "eos_token_id", "x", "a token id or a list of them"),
    ("generation_config.json", "eos_token_id", 1.5, "a token id or a list of them"),
    ("generation_config.json", "eos_token_id", [[2]], "a token id or a list of them"),
]


@pytest.mark.parametrize("name, key, value, kind", WRONG_KINDS)
def test_values_of_the_wrong_kind_name_the_file_and_key(tmp_path, name, key, value, kind):
    from .reference import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    file = tmp_path / name
    content = json.loads(file.read_text()) if file.exists() else {}
    file.write_text(json.dumps({**content, key: value}))
    expected = f"{file}: {key} must be {kind}, got {value!r}"
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        Tokenizer.from_dir(tmp_path)


@pytest.fixture(scope="module")
def gguf_metadata():
    """The default model's tokenizer metadata."""
    import mlx.core as mx

    from mlxinfer.gguf import metadata_to_python

    metadata = mx.load(str(mlxinfer.default_model_path()), return_metadata=True)[1]
    return {k: v for k, v in metadata_to_python(metadata).items() if k.startswith("tokenizer.")}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tokenizer.ggml.tokens", 5, "tokenizer.ggml.tokens must be a list of strings, got 5"),
        ("tokenizer.ggml.merges", [1, 2], "must be a list of strings, got [1, 2]"),
        ("tokenizer.ggml.merges", ["abc"], "merges must be pairs of tokens separated by a space"),
        ("tokenizer.ggml.bos_token_id", "x", "bos_token_id must be an integer, got 'x'"),
        ("tokenizer.ggml.eot_token_id", "x", "eot_token_id must be an integer, got 'x'"),
        ("tokenizer.ggml.token_type", [3], "token_type has 1 entries for 49152 tokens"),
        ("tokenizer.chat_template", 5, "tokenizer.chat_template must be a string, got 5"),
        ("tokenizer.ggml.add_bos_token", "false", "add_bos_token must be a boolean"),
    ],
)
def test_gguf_metadata_of_the_wrong_kind_names_the_key(gguf_metadata, key, value, message):
    """A GGUF types its values, but can type them otherwise: tokens as an int, a merge without
    its space, a bos id as a string were TypeError or AttributeError tracebacks; an eot id 'x' or
    one token type for 49,152 tokens loaded silently."""
    from mlxinfer.gguf import check_tokenizer_metadata

    with pytest.raises(ModelLoadError) as err:
        check_tokenizer_metadata({**gguf_metadata, key: value}, "m.gguf")
    assert str(err.value).startswith("m.gguf: GGUF metadata ") and message in str(err.value)


def test_gguf_merge_of_unknown_tokens_names_the_file(gguf_metadata):
    """tokenizers raises a bare Exception for a merge of tokens it does not have."""
    metadata = {**gguf_metadata, "tokenizer.ggml.merges": ["nosuch token"]}
    with pytest.raises(ModelLoadError, match=r"^m\.gguf: invalid GGUF tokenizer \(.*nosuch"):
        Tokenizer.from_gguf(metadata, "m.gguf")


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
