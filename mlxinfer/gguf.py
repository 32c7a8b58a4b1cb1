"""GGUF files: llama.cpp metadata -> a Hugging Face style config dict, tensor names -> ours.

`mx.load` reads GGUF natively: F32/F16 tensors as arrays, Q4_0/Q4_1/Q8_0 as MLX affine-quantized
triples (`weight`, `scales`, `biases`, group size 32). llama.cpp stores the q/k projections of
llama-architecture models with RoPE pairs interleaved, so those models run with traditional RoPE.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx

from .config import ModelLoadError

# general.architecture -> (Hugging Face model_type, rope interleaved as llama.cpp's LLAMA rope type)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

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
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias|scales|biases)$")
_TOP_NAME = re.compile(r"([a-z_]+)\.(weight|bias|scales|biases)$")


def config_from_metadata(metadata: dict[str, Any], source: str) -> dict[str, Any]:
    """A config.json-like dict from GGUF metadata (`{arch}.block_count`, ...)."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    model_type, interleaved = ARCHITECTURES[arch]

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if required:
                raise ModelLoadError(f"{source}: GGUF metadata lacks {full!r}")
            return default
        return metadata[full]

    if get("expert_count"):
        raise ModelLoadError(
            f"{source}: mixture-of-experts GGUF files ({arch}.expert_count = "
            f"{get('expert_count')}) are not supported; load the Hugging Face or mlx-community "
            "checkpoint instead"
        )
    heads = get("attention.head_count", required=True)
    hidden = get("embedding_length", required=True)
    vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": get("context_length", 2048),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_traditional": interleaved,
        "vocab_size": vocab,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor", 1.0)}
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{source}: GGUF rope scaling {scaling!r} is not supported")
    return config


def rename_tensors(tensors: dict[str, mx.array], source: str) -> dict[str, mx.array]:
    """llama.cpp tensor names -> Hugging Face names (`blk.0.attn_q.weight` ->
    `model.layers.0.self_attn.q_proj.weight`). `rope_freqs` is returned under its own name."""
    renamed = {}
    for name, value in tensors.items():
        if name == "rope_freqs.weight":
            renamed[name] = value
            continue
        match = _LAYER_NAME.match(name)
        if match and match.group(2) in _PER_LAYER:
            layer, part, kind = match.groups()
            renamed[f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"] = value
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
SUPPORTED_TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
_TYPE_NAMES = {
    **SUPPORTED_TENSOR_TYPES,
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    20: "IQ4_NL",
    30: "BF16",
}
# GGUF metadata value types -> fixed byte sizes (8 = string, 9 = array are variable).
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_tensor_types(path: Path) -> None:
    """Raise ModelLoadError for tensors of a type mx.load would not read exactly (mx.load returns
    some K-quants as float16 instead of failing), naming the tensor and its type."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            types = _tensor_types(buf)
        except (struct.error, IndexError, UnicodeDecodeError):
            raise ModelLoadError(f"{path}: truncated or corrupt GGUF header") from None
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
    for name, kind in types.items():
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has GGUF type {_TYPE_NAMES.get(kind, kind)}, which is not "
                f"supported; supported: {', '.join(SUPPORTED_TENSOR_TYPES.values())}"
            )


def _tensor_types(buf) -> dict[str, int]:
    """Walk the GGUF header (magic, version, counts, key/values) to the tensor infos."""
    if buf[:4] != b"GGUF":
        raise ModelLoadError("not a GGUF file (bad magic)")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def skip_string(pos: int) -> int:
        (length,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + length

    def skip_value(kind: int, pos: int) -> int:
        if kind in _VALUE_SIZES:
            return pos + _VALUE_SIZES[kind]
        if kind == 8:
            return skip_string(pos)
        if kind == 9:
            item_kind, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item_kind in _VALUE_SIZES:
                return pos + count * _VALUE_SIZES[item_kind]
            for _ in range(count):
                pos = skip_value(item_kind, pos)
            return pos
        raise ModelLoadError(f"unknown GGUF metadata value type {kind}")

    for _ in range(n_kv):
        pos = skip_string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(kind, pos + 4)
    types = {}
    for _ in range(n_tensors):
        (length,) = struct.unpack_from("<Q", buf, pos)
        name = bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8")
        pos += 8 + length
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * n_dims
        (kind,) = struct.unpack_from("<I", buf, pos)
        types[name] = kind
        pos += 12  # type + data offset
    return types
