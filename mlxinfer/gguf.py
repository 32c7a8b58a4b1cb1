"""GGUF files: llama.cpp metadata -> a Hugging Face style config dict, tensor names -> ours.

`mx.load` reads GGUF natively: F32/F16 tensors as arrays, Q4_0/Q4_1/Q8_0 as MLX affine-quantized
triples (`weight`, `scales`, `biases`, group size 32). A file holding other types (K-quants:
Q2_K-Q6_K, Q8_K; Q5_0, Q5_1, IQ4_NL, BF16) or stacked quantized experts is read here instead
(`read_tensors`): every tensor dequantized to float32 under the float32 policy; under the native
one, blocks that are MLX affine groups kept as such and the others quantized again. llama.cpp stores the q/k projections of llama-architecture models with
RoPE pairs interleaved, so those models run with traditional RoPE.

Gemma files differ from their checkpoints in three ways llama.cpp's converter chose: the RMSNorm
weights hold 1 + w (taken back to w here, exactly: w was rounded as 1 + w), the norm before the
MLP is `ffn_norm` beside `post_attention_norm` and `post_ffw_norm`, and what the metadata leaves
out llama.cpp fixes per architecture (the sliding layer pattern, Gemma 3's local RoPE base, the
query scale), as `config_from_metadata` does here.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .config import ModelLoadError, kind_problem
from .gguf_quants import AFFINE_BITS, dequantize, to_mlx
from .gguf_quants import TYPES as QUANT_TYPES

# general.architecture -> (Hugging Face model_type, rope interleaved as llama.cpp's LLAMA rope type)
ARCHITECTURES = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma2": ("gemma2", False),
    "gemma3": ("gemma3_text", False),
    "qwen2moe": ("qwen2_moe", False),
    "qwen3moe": ("qwen3_moe", False),
}
# A `llama` file with experts is Mixtral (llama.cpp writes Mixtral as llama + expert_count).
_LLAMA_WITH_EXPERTS = "mixtral"
_MOE_ARCHITECTURES = ("llama", "qwen2moe", "qwen3moe")
GEMMA = ("gemma2", "gemma3")
# Gemma's 27B models scale queries by hidden_size / heads, the others by head_dim (their
# query_pre_attn_scalar); llama.cpp tells the 27B ones by their block count.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixture of experts: the router, the experts stacked [E, out, in], the shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GEMMA_PER_LAYER = {  # Gemma's norms around attention and the MLP
    **_PER_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias|scales|biases)$")
_TOP_NAME = re.compile(r"([a-z_]+)\.(weight|bias|scales|biases)$")


# What the tokenizer's GGUF metadata must hold, when set: a GGUF file types its values, but
# nothing stops it from typing them otherwise (an int for the tokens was a TypeError traceback).
_TOKENIZER_KINDS = {
    "tokenizer.ggml.tokens": "a list of strings",
    "tokenizer.ggml.merges": "a list of strings",
    "tokenizer.ggml.token_type": "a list of integers",
    "tokenizer.ggml.pre": "a string",
    "tokenizer.ggml.bos_token_id": "an integer",
    "tokenizer.ggml.eos_token_id": "an integer",
    "tokenizer.ggml.eot_token_id": "an integer",
    "tokenizer.ggml.add_bos_token": "a boolean",
    "tokenizer.chat_template": "a string",
}


def check_tokenizer_metadata(metadata: dict[str, Any], source: str) -> None:
    """The `tokenizer.*` metadata is there and of the kinds that config_from_metadata and
    Tokenizer.from_gguf need: a ModelLoadError naming the key otherwise."""
    if "tokenizer.ggml.tokens" not in metadata:
        raise ModelLoadError(f"{source}: GGUF metadata lacks 'tokenizer.ggml.tokens'")
    for key, kind in _TOKENIZER_KINDS.items():
        if problem := kind_problem(metadata.get(key), kind, key):
            raise ModelLoadError(f"{source}: GGUF metadata {problem}")
    if any(" " not in merge for merge in metadata.get("tokenizer.ggml.merges", [])):
        raise ModelLoadError(
            f"{source}: GGUF metadata tokenizer.ggml.merges must be pairs of tokens separated by "
            "a space"
        )
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise ModelLoadError(
            f"{source}: GGUF metadata tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )


def config_from_metadata(metadata: dict[str, Any], source: str) -> dict[str, Any]:
    """A config.json-like dict from GGUF metadata (`{arch}.block_count`, ...). Sizes must be
    positive integers and float settings finite numbers (`rms_norm_eps` >= 0, the others > 0):
    anything else is a ModelLoadError naming the key."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: GGUF architecture {_brief(arch)} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    model_type, interleaved = ARCHITECTURES[arch]

    def get(key: str, default: Any = None, required: bool = False, kind: str = "any") -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if required:
                raise ModelLoadError(f"{source}: GGUF metadata lacks {full!r}")
            return default
        value = metadata[full]
        if kind == "count" and not _is_int(value, minimum=0):
            raise ModelLoadError(
                f"{source}: GGUF metadata {full!r} is {_brief(value)}, not a count"
            )
        if kind == "size" and not _is_int(value, minimum=1):
            raise ModelLoadError(
                f"{source}: GGUF metadata {full!r} is {_brief(value)}, not a positive integer"
            )
        if kind in ("positive", "nonnegative") and not _is_number(value, kind == "positive"):
            raise ModelLoadError(
                f"{source}: GGUF metadata {full!r} is {_brief(value)}, not a finite {kind} number"
            )
        return value

    experts = get("expert_count", kind="count")
    if experts and arch not in _MOE_ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: mixture-of-experts GGUF files of architecture {arch!r} ({arch}."
            f"expert_count = {experts}) are not supported; supported: "
            f"{', '.join(_MOE_ARCHITECTURES)}"
        )
    if experts and arch == "llama":
        model_type = _LLAMA_WITH_EXPERTS
    heads = get("attention.head_count", required=True, kind="size")
    hidden = get("embedding_length", required=True, kind="size")
    vocab = get("vocab_size", kind="count") or len(metadata.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise ModelLoadError(
            f"{source}: GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens"
        )
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", required=True, kind="size"),
        "num_hidden_layers": get("block_count", required=True, kind="size"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads, kind="size"),
        "head_dim": get("attention.key_length", hidden // heads, kind="size"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5, kind="nonnegative"),
        "max_position_embeddings": get("context_length", 2048, kind="size"),
        "rope_theta": get("rope.freq_base", 10000.0, kind="positive"),
        "rope_traditional": interleaved,
        "vocab_size": vocab,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if config["head_dim"] == 0:
        raise ModelLoadError(
            f"{source}: GGUF metadata {arch}.embedding_length ({hidden}) is smaller than "
            f"{arch}.attention.head_count ({heads}) and {arch}.attention.key_length is not given"
        )
    if arch in GEMMA:
        config.update(_gemma_config(arch, config, get))
    if experts:
        config.update(
            num_experts=experts,
            num_local_experts=experts,
            num_experts_per_tok=get("expert_used_count", required=True, kind="size"),
            moe_intermediate_size=get(
                "expert_feed_forward_length", config["intermediate_size"], kind="size"
            ),
            shared_expert_intermediate_size=get(
                "expert_shared_feed_forward_length", 0, kind="count"
            ),
            # llama.cpp renormalises the top-k weights of Qwen3-MoE (and Mixtral), not of
            # Qwen2-MoE, unless the file says
            norm_topk_prob=bool(metadata.get(f"{arch}.expert_weights_norm", arch != "qwen2moe")),
        )
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        factor = get("rope.scaling.factor", 1.0, kind="positive")
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{source}: GGUF rope scaling {_brief(scaling)} is not supported")
    return config


def _gemma_config(arch: str, config: dict[str, Any], get) -> dict[str, Any]:
    """What llama.cpp reads or fixes for Gemma (llama-model.cpp): soft-caps and the window from
    the metadata; the sliding pattern (every other layer; five in six for Gemma 3), Gemma 3's
    local RoPE base (10000) and the query scale by architecture."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    is_27b = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
    out: dict[str, Any] = {
        "query_pre_attn_scalar": hidden // heads if is_27b else config["head_dim"],
        "sliding_window": get("attention.sliding_window", 4096, kind="size"),
    }
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (value := get(key, kind="positive")) is not None:  # else the family's default, as
            out[key] = value  # llama.cpp's (Gemma 2: 50 and 30; Gemma 3: none)
    if arch == "gemma3":
        out["sliding_window_pattern"] = 6
        out["rope_local_base_freq"] = get("rope.freq_base_swa", 10000.0, kind="positive")
    return out


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def rename_tensors(
    tensors: dict[str, mx.array], source: str, arch: str | None = None
) -> dict[str, mx.array]:
    """llama.cpp tensor names -> Hugging Face names (`blk.0.attn_q.weight` ->
    `model.layers.0.self_attn.q_proj.weight`). `rope_freqs` is returned under its own name.
    Gemma (`arch`): its own norm names, and each norm's 1 + w back to w."""
    per_layer = _GEMMA_PER_LAYER if arch in GEMMA else _PER_LAYER
    renamed = {}
    for name, value in tensors.items():
        if name == "rope_freqs.weight":
            renamed[name] = value
            continue
        if arch in GEMMA and name.endswith("norm.weight"):
            value = value.astype(mx.float32) - 1.0
        match = _LAYER_NAME.match(name)
        if match and match.group(2) in per_layer:
            layer, part, kind = match.groups()
            if part == "ffn_gate_inp_shexp" and value.ndim == 1:  # llama.cpp stores it as [D]
                value = value[None]
            renamed[f"model.layers.{layer}.{per_layer[part]}.{kind}"] = value
            continue
        match = _TOP_NAME.match(name)
        if match and match.group(1) in _TOP_LEVEL:
            renamed[f"{_TOP_LEVEL[match.group(1)]}.{match.group(2)}"] = value
            continue
        raise ModelLoadError(f"{source}: unexpected GGUF tensor {name!r}")
    return renamed


def metadata_to_python(metadata: dict[str, Any]) -> dict[str, Any]:
    """mx.load returns scalar metadata as 0-d arrays and token types as an array; make them Python."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, mx.array):
            value = value.item() if value.ndim == 0 else value.tolist()
        out[key] = value
    return out


# ggml tensor types mx.load turns into exact MLX arrays (F32/F16 as is, Q4_0/Q4_1/Q8_0 as affine-quantized).
MX_LOAD_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
# Every type this reader takes: a file with others than MX_LOAD_TYPES is read by read_tensors
# (gguf_quants.py) instead of mx.load.
SUPPORTED_TENSOR_TYPES = {kind: name for kind, (name, _, _) in QUANT_TYPES.items()}
_TYPE_NAMES = {**SUPPORTED_TENSOR_TYPES, 9: "Q8_1", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS"}
_TYPE_NAMES |= {19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M"}
# Elements and bytes per block of the supported tensor types (ggml's block sizes).
_BLOCKS = {kind: (block, nbytes) for kind, (_, block, nbytes) in QUANT_TYPES.items()}

# GGUF metadata value types. Scalars by struct format; a string is a u64 length and the bytes, an
# array an item type (u32), a u64 count and the items.
_STRING, _ARRAY, _UINT32, _FLOAT64 = 8, 9, 4, 12
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_VALUE_TYPE_NAMES = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}
# The fewest bytes a value of each type takes in the file: what bounds an array's item count.
_MIN_VALUE_SIZE = {**{k: struct.calcsize(f) for k, f in _SCALAR_FORMATS.items()}, 8: 8, 9: 12}
MAX_ARRAY_DEPTH = 8  # arrays of arrays ...; llama.cpp's own files nest at most 2 deep
SUPPORTED_VERSIONS = (2, 3)  # version 1 had 32-bit counts and lengths
_HEADER_SIZE = 24  # magic, version, tensor count, metadata count
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_DIM = 2**31 - 1  # MLX shapes are int32
# Bounds on what a count in the header can claim: each metadata entry takes at least a key length,
# a value type and a one-byte value; each tensor info a name length, a dimension count, one
# dimension, a type and a data offset.
_MIN_KV_SIZE = 8 + 4 + 1
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info of a GGUF header. `dims` in ggml order (`dims[0]` is contiguous), so the
    array shape is `shape`, reversed; `offset` is absolute, from the start of the file."""

    name: str
    type: int
    dims: tuple[int, ...]
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims[::-1]


@dataclass(frozen=True)
class SkippedArray:
    """An array value `read_header(path, array_values=False)` checked but did not read."""

    item_type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, ...]]  # key -> (type,), or (ARRAY, item type)
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int  # where the tensor data section starts
    file_size: int


def read_header(path: str | Path, array_values: bool = True) -> GGUFHeader:
    """Read a GGUF file's header: version, metadata, tensor infos, with every length and count
    checked against the bytes left in the file before anything is read or allocated, and arrays
    nested at most MAX_ARRAY_DEPTH deep. Metadata values come back as Python values (int, float,
    bool, str, lists for arrays); with `array_values=False` arrays are checked and skipped, each
    a SkippedArray. Raises ModelLoadError naming the file (and the key or tensor) on bad input."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_SIZE)
        if head[:4] != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        if len(head) < _HEADER_SIZE:
            raise ModelLoadError(
                f"{path}: truncated or corrupt GGUF header (the file has {len(head)} bytes, a "
                f"GGUF header {_HEADER_SIZE})"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _HeaderReader(buf, str(path), array_values).read()


class _HeaderReader:
    """A cursor over a GGUF header that never reads, slices or allocates past the end of the file."""

    def __init__(self, buf, source: str, array_values: bool):
        self.buf, self.source, self.array_values = buf, source, array_values
        self.size, self.pos = len(buf), 0

    def error(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: truncated or corrupt GGUF header: {what}")

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes; return where they start."""
        if n > self.size - self.pos:
            raise self.error(
                f"{what} needs {n} bytes at offset {self.pos}, but the file has "
                f"{self.size - self.pos} left"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        layout = struct.Struct(fmt)
        return layout.unpack_from(self.buf, self.take(layout.size, what))

    def string(self, what: str, decode: bool = True) -> str | None:
        (length,) = self.unpack("<Q", f"{what}: string length")
        start = self.take(length, f"{what}: string of {length} bytes")
        if not decode:
            return None
        try:
            return str(self.buf[start : start + length], "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what}: string is not valid UTF-8") from None

    def value(self, kind: int, key: str, keep: bool = True, depth: int = 0) -> Any:
        what = f"metadata {_quote(key)}"
        if kind in _SCALAR_FORMATS:
            return self.unpack("<" + _SCALAR_FORMATS[kind], what)[0]
        if kind == _STRING:
            return self.string(what, decode=keep)
        if kind != _ARRAY:
            raise self.error(f"{what}: unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item, count = self.unpack("<IQ", f"{what}: array header")
        if item not in _MIN_VALUE_SIZE:
            raise self.error(f"{what}: array of unknown value type {item}")
        left = self.size - self.pos
        if count > left // _MIN_VALUE_SIZE[item]:
            raise self.error(
                f"{what}: an array of {count} {_VALUE_TYPE_NAMES[item]} values cannot fit in "
                f"the {left} bytes left in the file"
            )
        keep = keep and self.array_values
        if item in _SCALAR_FORMATS:
            start = self.take(count * _MIN_VALUE_SIZE[item], what)
            if not keep:
                return SkippedArray(item, count)
            return list(struct.unpack_from(f"<{count}{_SCALAR_FORMATS[item]}", self.buf, start))
        if item == _STRING:
            values = self.strings(count, what, keep)
        else:
            values = [self.value(item, key, keep, depth + 1) for _ in range(count)]
        return values if keep else SkippedArray(item, count)

    def strings(self, count: int, what: str, decode: bool) -> list[str]:
        """`count` strings in one tight loop (a vocabulary is ~10^5 of them)."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack_length = struct.Struct("<Q").unpack_from
        raw = []
        for _ in range(count):
            length = unpack_length(buf, pos)[0] if size - pos >= 8 else size
            start, pos = pos + 8, pos + 8 + length
            if pos > size:
                self.pos = start - 8
                self.string(what)  # raises: this string does not fit (reported as string() does)
            if decode:
                raw.append(buf[start:pos])
        self.pos = pos
        try:
            return [str(value, "utf-8") for value in raw]
        except UnicodeDecodeError:
            raise self.error(f"{what}: string is not valid UTF-8") from None

    def value_type(self, kind: int) -> tuple[int, ...]:
        """(kind,), or (ARRAY, item type) for an array (peeked, before its value is read)."""
        if kind == _ARRAY and self.pos + 4 <= self.size:
            return (kind, *struct.unpack_from("<I", self.buf, self.pos))
        return (kind,)

    def read(self) -> GGUFHeader:
        _, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", self.buf, 0)
        self.pos = _HEADER_SIZE
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            detail = " (a big-endian file)" if swapped in SUPPORTED_VERSIONS else ""
            raise ModelLoadError(
                f"{self.source}: GGUF version {version}{detail} is not supported; supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))} (little-endian)"
            )
        left = self.size - self.pos
        if n_kv * _MIN_KV_SIZE + n_tensors * _MIN_TENSOR_INFO_SIZE > left:
            raise self.error(
                f"it claims {n_kv} metadata entries and {n_tensors} tensors, more than the "
                f"{left} bytes after the header can hold"
            )
        metadata: dict[str, Any] = {}
        value_types: dict[str, tuple[int, ...]] = {}
        for i in range(n_kv):
            key = self.string(f"metadata entry {i} of {n_kv}: key")
            if key in metadata:
                raise self.error(f"metadata key {_quote(key)} appears twice")
            (kind,) = self.unpack("<I", f"metadata {_quote(key)}: value type")
            value_types[key] = self.value_type(kind)
            metadata[key] = self.value(kind, key)

        alignment = metadata.get("general.alignment", 32)
        if "general.alignment" in metadata and value_types["general.alignment"] != (_UINT32,):
            raise self.error("metadata 'general.alignment' is not a uint32")
        if alignment <= 0 or alignment & (alignment - 1):
            raise self.error(f"metadata 'general.alignment' is {alignment}, not a power of two")

        infos = []
        for i in range(n_tensors):
            name = self.string(f"tensor info {i} of {n_tensors}: name")
            what = f"tensor {_quote(name)}"
            (n_dims,) = self.unpack("<I", f"{what}: dimension count")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self.error(f"{what} has {n_dims} dimensions (1 to {_MAX_DIMS} are allowed)")
            dims = self.unpack(f"<{n_dims}Q", f"{what}: dimensions")
            if max(dims) > _MAX_DIM:
                raise self.error(f"{what} has dimensions {list(dims)}, larger than {_MAX_DIM}")
            kind, offset = self.unpack("<IQ", f"{what}: type and data offset")
            if offset % alignment:
                raise self.error(
                    f"{what}: data offset {offset} is not a multiple of the alignment {alignment}"
                )
            infos.append((name, kind, dims, offset))
        data_offset = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, kind, dims, offset in infos:
            if name in tensors:
                raise self.error(f"tensor {_quote(name)} appears twice")
            tensors[name] = TensorInfo(name, kind, dims, data_offset + offset)
        return GGUFHeader(
            version, metadata, value_types, tensors, alignment, data_offset, self.size
        )


def needs_own_reader(header: GGUFHeader) -> bool:
    """Whether the file holds tensor types mx.load does not read exactly (K-quants, ...), or
    quantized tensors of more than two dimensions (a MoE's stacked experts)."""
    return any(
        info.type not in MX_LOAD_TYPES or (len(info.dims) > 2 and info.type not in (0, 1))
        for info in header.tensors.values()
    )


# Under the native policy, the quantized types that are not MLX affine groups as they stand
# (sub-blocks of 16, non-linear values) are dequantized and either quantized again, to these MLX
# bits in groups of 32, or (None) kept as float: the error and memory of each choice on the real
# Gemma-3-270M Q4_K_M are in BENCHMARKS.md ("K-quants under the native policy").
REQUANTIZE_BITS: dict[str, int | None] = {
    # 8 bits: 5.4e-3 of logit error on Gemma-3-270M where float is exact, but float would hold a
    # 7B Q4_K_M (a fifth of it Q6_K) in 2.6 times the file's bytes; 8 bits, 1.5 times
    "Q6_K": 8,
    "Q3_K": 8,
    "Q2_K": 8,
    "IQ4_NL": 8,
    "Q8_K": 8,
}


def read_tensors(
    path: str | Path, header: GGUFHeader, keep_quantized: bool = False
) -> dict[str, mx.array]:
    """Every tensor of a (checked) file, each read from its own byte range of the mapped file:
    dequantized to float32 block by block (gguf_quants.py), or with `keep_quantized` (the native
    policy) each quantized matrix as MLX affine groups of 32, `name` (packed), `name.scales` and
    `name.biases` as mx.load gives Q4_0: without loss where the blocks are such groups
    (AFFINE_BITS), else quantized again (REQUANTIZE_BITS) as mx.quantize would, bit for bit.

    The numpy work (numpy releases the GIL) runs on a thread per core, a few tensors ahead of
    this thread, which alone makes MLX arrays of the results (MLX arrays belong to the thread
    that makes them), without holding the GIL for long (`_to_mlx_array`)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def decode(name: str, info: TensorInfo) -> tuple[str, tuple[np.ndarray, ...]]:
        block, nbytes = _BLOCKS[info.type]
        raw = data[info.offset : info.offset + math.prod(info.dims) // block * nbytes]
        kind = QUANT_TYPES[info.type][0]
        if keep_quantized and len(info.shape) >= 2 and block > 1:
            bits = AFFINE_BITS.get(kind) or REQUANTIZE_BITS.get(kind)
            if bits is not None:
                rows = info.shape[:-1]  # (a MoE's experts: [E, out])
                packed, scales, biases = to_mlx(raw, info.type, bits)
                words = packed.view("<u4").reshape(*rows, -1)
                return "quantized", (words, scales.reshape(*rows, -1), biases.reshape(*rows, -1))
        return "float", (dequantize(raw, info.type).reshape(info.shape),)

    tensors: dict[str, mx.array] = {}
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers, thread_name_prefix="mlxinfer-gguf") as pool:
        items = list(header.tensors.items())
        ahead = 2 * workers  # results waiting at most: bounded memory
        pending = deque(pool.submit(decode, *item) for item in items[:ahead])
        for i, (name, _) in enumerate(items):
            how, arrays = pending.popleft().result()
            if i + ahead < len(items):
                pending.append(pool.submit(decode, *items[i + ahead]))
            if how == "float":
                tensors[name] = _to_mlx_array(arrays[0])
                continue
            stem = name.removesuffix(".weight")
            words, scales, biases = (_to_mlx_array(a) for a in arrays)
            tensors[name], tensors[f"{stem}.scales"], tensors[f"{stem}.biases"] = (
                words,
                scales,
                biases,
            )
    return tensors


_COPY_BYTES = 1 << 23  # bytes of a numpy array mx.array copies at once (see _to_mlx_array)


def _to_mlx_array(values: np.ndarray) -> mx.array:
    """`values` as an MLX array. mx.array holds the GIL while it copies, which stops the decoding
    threads (measured: a 100 MB copy left a numpy thread 35 passes in 2 s instead of 112,000),
    and a fresh buffer's first touch runs at ~2 GB/s on the machines we measure; so a large
    array is copied in row slices of ~8 MB (the GIL held a few ms each) and joined by
    mx.concatenate, which runs in mx.eval, without the GIL. A 4 GB file loads ~2x faster
    (BENCHMARKS.md)."""
    if values.nbytes <= 2 * _COPY_BYTES or values.ndim == 0:
        return mx.array(values)
    rows = max(1, _COPY_BYTES // max(1, values[0].nbytes))
    parts = [mx.array(values[start : start + rows]) for start in range(0, len(values), rows)]
    joined = mx.concatenate(parts, axis=0)
    mx.eval(joined)
    return joined


def check_tensor_types(path: Path) -> GGUFHeader:
    """Check a GGUF file before `mx.load` reads it (MLX's reader trusts lengths and offsets, and
    crashes on some well-formed files): the header as `read_header` checks it, no float64
    metadata (MLX misreads it and crashes), tensors of a type mx.load reads exactly (it returns
    some K-quants as float16 instead of failing) and whose data lies inside the file. Raises
    ModelLoadError naming the file and the key or tensor at fault; returns the header."""
    header = read_header(path, array_values=False)
    for key, types in header.value_types.items():
        if types in ((_FLOAT64,), (_ARRAY, _FLOAT64)):
            raise ModelLoadError(
                f"{path}: GGUF metadata {_quote(key)} holds float64 values, which MLX's GGUF "
                "reader cannot read"
            )
    for name, info in header.tensors.items():
        if info.type not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {_quote(name)} has GGUF type "
                f"{_TYPE_NAMES.get(info.type, info.type)}, which is not supported; supported: "
                f"{', '.join(SUPPORTED_TENSOR_TYPES.values())}"
            )
        block, block_bytes = _BLOCKS[info.type]
        if info.dims[0] % block:
            raise ModelLoadError(
                f"{path}: tensor {_quote(name)} has rows of {info.dims[0]} values, not a "
                f"multiple of the {SUPPORTED_TENSOR_TYPES[info.type]} block size {block}"
            )
        end = info.offset + math.prod(info.dims) // block * block_bytes
        if end > header.file_size:
            raise ModelLoadError(
                f"{path}: cannot read GGUF file (truncated: tensor {_quote(name)} extends past the "
                f"end of the file, to byte {end} of {header.file_size})"
            )
    check_shapes(config_from_metadata(header.metadata, str(path)), header, str(path))
    return header


def check_shapes(config: dict[str, Any], header: GGUFHeader, source: str) -> None:
    """The tensor infos against the config drawn from the metadata: layers 0 .. block_count - 1
    and the shape of every known tensor. Done before a model of that config is built, so a
    corrupt size (a huge block_count or embedding_length) is an error, not a huge model."""
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim, n_layers = config["head_dim"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    per_layer = {
        "attn_norm": (hidden,),
        "ffn_norm": (hidden,),
        "post_attention_norm": (hidden,),
        "post_ffw_norm": (hidden,),
        "attn_q": (q, hidden),
        "attn_k": (kv, hidden),
        "attn_v": (kv, hidden),
        "attn_output": (hidden, q),
        "attn_q_norm": (head_dim,),
        "attn_k_norm": (head_dim,),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
    }
    experts = config.get("num_experts", 0)
    if experts:
        expert_ffn, shared = (
            config["moe_intermediate_size"],
            config["shared_expert_intermediate_size"],
        )
        per_layer.update(
            ffn_gate_inp=(experts, hidden),
            ffn_gate_exps=(experts, expert_ffn, hidden),
            ffn_up_exps=(experts, expert_ffn, hidden),
            ffn_down_exps=(experts, hidden, expert_ffn),
            ffn_gate_shexp=(shared, hidden),
            ffn_up_shexp=(shared, hidden),
            ffn_down_shexp=(hidden, shared),
        )
    top = {"token_embd": (vocab, hidden), "output": (vocab, hidden), "output_norm": (hidden,)}
    layers = set()
    for name, info in header.tensors.items():
        if match := _LAYER_NAME.match(name):
            layers.add(int(match.group(1)))
            expected, kind = per_layer.get(match.group(2)), match.group(3)
        elif match := _TOP_NAME.match(name):
            expected, kind = top.get(match.group(1)), match.group(2)
        else:
            continue  # rename_tensors names it
        if expected is not None and kind == "bias":
            expected = expected[:1]
        if expected is not None and info.shape != expected:
            raise ModelLoadError(
                f"{source}: tensor {_quote(name)} has shape {info.shape}, expected {expected} "
                f"from the GGUF metadata ({_describe(config)})"
            )
    if len(layers) != n_layers or (layers and max(layers) != n_layers - 1):
        found = f"layers 0 to {max(layers)}" if layers else "no layers"
        if layers and len(layers) != max(layers) + 1:
            found = f"{len(layers)} layers numbered up to {max(layers)}"
        raise ModelLoadError(
            f"{source}: GGUF metadata gives {n_layers} layers (block_count), but its tensors "
            f"hold {found}"
        )


def _describe(config: dict[str, Any]) -> str:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return ", ".join(f"{k}={config[k]}" for k in (*keys, "head_dim", "vocab_size"))


def _brief(value: Any, limit: int = 100) -> str:
    """repr() of a metadata value for a message, shortened (a vocabulary can be a value)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _quote(name: str, limit: int = 100) -> str:
    """repr() of a key or tensor name for a message, shortened: names come from the file."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "..."
