"""Tokenizer: `tokenizers` for tokenizer.json or a BPE rebuilt from GGUF metadata (byte-level, or
Gemma's SentencePiece vocabulary), the model's special tokens and chat template (found in its
files; rendered by chat_template.py), and a streaming detokenizer."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2 import Template
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .chat_template import GEMMA_CHAT_TEMPLATE, compile_chat_template, render_chat_template
from .config import ModelLoadError, brief, kind_problem, model_file, read_json, token_ids

# GGUF token types (llama.cpp's llama_token_type).
_GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED = 2, 3, 4
# Architectures whose `llama` (SentencePiece) vocabulary is rebuilt here, and the control tokens
# that end a turn there (llama.cpp finds them by their text: the metadata names only <eos>).
_SENTENCEPIECE_ARCHITECTURES = {"gemma2": ("<end_of_turn>",), "gemma3": ("<end_of_turn>",)}
# The chat template of a GGUF file that carries none, by architecture.
_GGUF_CHAT_TEMPLATES = {"gemma2": GEMMA_CHAT_TEMPLATE, "gemma3": GEMMA_CHAT_TEMPLATE}

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

    @functools.cached_property
    def base_vocab_size(self) -> int:
        """vocab_size without the added tokens: the model's own vocabulary."""
        return max(self._tokenizer.get_vocab(with_added_tokens=False).values(), default=-1) + 1

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS where the model expects it."""
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids as `encode` gives them, with each one's (start, end) character span in
        `text` ((0, 0) for an added BOS)."""
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids, offsets = list(encoding.ids), [(start, end) for start, end in encoding.offsets]
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        return ids, offsets

    def save_tokenizer_json(self, path: str | Path) -> None:
        """Write the tokenizer as a Hugging Face tokenizer.json (for another engine to load)."""
        self._tokenizer.save(str(path))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """One token as a person can read it: its text, or where it holds part of a character
        (byte-level BPE splits "é" or an emoji over tokens; decoded alone they are "\ufffd") its
        bytes, as "<0xE2><0x80>" beside the whole characters it has (SentencePiece's byte
        tokens are already "<0xE2>")."""
        text = self.decode([token_id])
        if "\ufffd" not in text:
            return text
        raw = self.token_bytes(token_id)
        return text if raw is None else readable_bytes(raw)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for (what OpenAI's logprobs call `bytes`): its text's UTF-8,
        or for a token holding part of a character its raw bytes (byte-level BPE's alphabet, or
        SentencePiece's "<0xE2>"); None when they cannot be known."""
        text = self.decode([token_id])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.id_to_token(token_id)
        if piece is None:
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        return _byte_level_bytes(piece)

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
        template = self.chat_template
        if template is None:
            raise ValueError("this model has no chat template")
        cached = self._compiled_chat_template
        if cached is None or cached[0] != template:
            cached = (template, compile_chat_template(template))
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
        if (generation_file := model_file(path, "generation_config.json")).is_file():
            eos = read_json(generation_file, "generation config").get("eos_token_id")
            ids += token_ids(
                _checked(eos, "a token id or a list of them", "eos_token_id", generation_file)
            )
        add_bos = _checked(config.get("add_bos_token"), "a boolean", "add_bos_token", config_file)
        return cls(
            tokenizer,
            eos_token_ids=ids,
            bos_token=_special_token(config, "bos_token", config_file),
            eos_token=_special_token(config, "eos_token", config_file),
            chat_template=_find_chat_template(path, config, config_file),
            add_bos_token=bool(add_bos),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], source: str) -> Tokenizer:
        """Rebuild the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`), which
        gguf.check_tokenizer_metadata has checked (loading does, before the config reads it)."""
        kind = metadata.get("tokenizer.ggml.model")
        arch = metadata.get("general.architecture")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types = metadata.get("tokenizer.ggml.token_type")
        end_of_turn: tuple[str, ...] = ()
        if kind == "gpt2":
            tokenizer = _gguf_byte_level_bpe(metadata, source)
        elif kind == "llama" and arch in _SENTENCEPIECE_ARCHITECTURES:
            tokenizer = _gguf_sentencepiece(metadata, source)
            end_of_turn = _SENTENCEPIECE_ARCHITECTURES[arch]
        else:
            raise ModelLoadError(
                f"{source}: GGUF tokenizer model {kind!r} is not supported for architecture "
                f"{brief(arch)} (supported: 'gpt2', byte-level BPE; 'llama', SentencePiece, for "
                f"{', '.join(_SENTENCEPIECE_ARCHITECTURES)})"
            )
        if types is not None:
            # matched whole in the text, as the vocabulary spells them (Gemma's runs of spaces
            # as "▁"s); a repeated token is added once, as its last id
            special = (_GGUF_CONTROL, _GGUF_UNKNOWN)
            added = [
                AddedToken(text, special=t in special, normalized=False)
                for i, t in enumerate(types)
                if t in (*special, _GGUF_USER_DEFINED)
                and (text := tokenizer.id_to_token(i)) is not None
            ]
            tokenizer.add_tokens(added)

        def token(key: str) -> str | None:
            i = metadata.get(key)
            return tokens[int(i)] if i is not None and 0 <= i < len(tokens) else None

        eos_ids = [
            int(metadata[k])
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if k in metadata
        ]
        for text in end_of_turn:
            i = tokenizer.token_to_id(text)
            if i is not None and types and types[i] == _GGUF_CONTROL:
                eos_ids.append(i)
        return cls(
            tokenizer,
            eos_token_ids=eos_ids,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            chat_template=metadata.get("tokenizer.chat_template")
            or _GGUF_CHAT_TEMPLATES.get(str(arch)),
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )


def _gguf_byte_level_bpe(metadata: dict[str, Any], source: str) -> HFTokenizer:
    """`tokenizer.ggml.model` "gpt2": byte-level BPE from the tokens and merges."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    try:
        tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    except Exception as e:  # a merge of tokens not in the vocabulary: a bare Exception
        raise ModelLoadError(f"{source}: invalid GGUF tokenizer ({e})") from None
    tokenizer.pre_tokenizer = _gguf_pre_tokenizer(
        metadata.get("tokenizer.ggml.pre", "default"), source
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _gguf_sentencepiece(metadata: dict[str, Any], source: str) -> HFTokenizer:
    """`tokenizer.ggml.model` "llama" of a Gemma file: SentencePiece's BPE with byte fallback, as
    Gemma's own tokenizer.json has it (spaces as "▁", no pre-tokenizer, `<0x..>` byte tokens).
    The file has no merges: they are the vocabulary's tokens cut in two known pieces, ranked by
    the merged token's place in the file (Gemma's scores do not follow its merge order). Runs of
    spaces are stored as spaces, but looked up as "▁"s."""
    tokens = [
        "\u2581" * len(t) if t and not t.strip(" ") else t
        for t in metadata["tokenizer.ggml.tokens"]
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    try:
        tokenizer = HFTokenizer(
            models.BPE(
                vocab=vocab,
                merges=_merges_by_rank(vocab),
                unk_token=unk_token,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelLoadError(f"{source}: invalid GGUF tokenizer ({e})") from None
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def _merges_by_rank(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) cut of a token whose two pieces are tokens too, best first: by the
    token's rank (its last place in the file), then longer left pieces first. (transformers'
    converter also orders by the pieces' ids, which never decides: a token and the length of
    its left piece make one cut.)"""
    merges = []
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        for k in range(len(token) - 1, 0, -1):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (bytes_to_unicode, as `tokenizers`' ByteLevel uses it):
    printable bytes stand for themselves, the others for the code points from 256 on, in order.
    Character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(rest)})
    return table


def _byte_level_bytes(piece: str) -> bytes | None:
    """A byte-level BPE token's bytes; None for a token of another kind of vocabulary."""
    alphabet = _byte_level_alphabet()
    if not piece or any(c not in alphabet for c in piece):
        return None
    return bytes(alphabet[c] for c in piece)


def readable_bytes(raw: bytes) -> str:
    """UTF-8 bytes as text, each byte that is not part of a whole character as "<0xE2>"."""
    out, i = [], 0
    while i < len(raw):
        for n in (1, 2, 3, 4):
            try:
                out.append(raw[i : i + n].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += n
            break
        else:
            out.append(f"<0x{raw[i]:02X}>")
            i += 1
    return "".join(out)


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


# The files of a model directory come from the internet: each value read is checked to be of the
# kind its use needs, else a ModelLoadError naming the file and key (an int for eos_token was a
# TypeError traceback, "x" for eos_token_id silently the id "x").


def _find_chat_template(path: Path, config: dict[str, Any], config_file: Path) -> str | None:
    """transformers >= 4.43 writes chat_template.jinja; older files keep it in tokenizer_config.json
    (a string, or a list of named templates) or chat_template.json."""
    if (jinja_file := model_file(path, "chat_template.jinja")).is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{jinja_file}: not UTF-8 text ({e})") from None
    template, source = config.get("chat_template"), config_file
    if template is None and (json_file := model_file(path, "chat_template.json")).is_file():
        template = read_json(json_file, "chat template").get("chat_template")
        source = json_file
    return _chosen_template(template, source)


def _chosen_template(template: Any, source: Path) -> str | None:
    """A `chat_template` value: a string, or a list of `{"name": ..., "template": ...}` of which
    transformers uses the one named "default", else the first."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in template
    ):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default") or next(iter(named.values()), None)
    raise ModelLoadError(
        f"{source}: chat_template must be a string or a list of objects with string 'name' and "
        f"'template', got {brief(template)}"
    )


def _special_token(config: dict[str, Any], key: str, source: Path) -> str | None:
    """`bos_token` or `eos_token`: a string, or an AddedToken object holding it as `content`."""
    token = config.get(key)
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    if token is None or isinstance(token, str):
        return token
    raise ModelLoadError(
        f"{source}: {key} must be a string or an object with a string 'content', got {brief(token)}"
    )


def _checked(value: Any, kind: str, key: str, source: Path) -> Any:
    """`value` if it is unset or of `kind` (see config.kind_problem), else a ModelLoadError."""
    if problem := kind_problem(value, kind, key):
        raise ModelLoadError(f"{source}: {problem}")
    return value
