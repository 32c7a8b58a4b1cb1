"""ModelConfig: one decoder-only transformer, configured from a Hugging Face config.json.

Families are data: `FAMILIES` maps a Hugging Face `model_type` to the architectural options that
distinguish it (biases, q/k norm, fused projections). Everything else comes from config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """A model file or directory could not be loaded; the message names the file and what is wrong."""


# model_type -> options that differ between families. Keys not listed take the defaults in ModelConfig.
FAMILIES: dict[str, dict[str, Any]] = {
    # Llama 2/3, SmolLM2: `attention_bias` and `mlp_bias` come from config.json.
    "llama": {},
    "mistral": {},
    # Qwen2: bias on q/k/v projections, none on o_proj.
    "qwen2": {"qkv_bias": True, "o_bias": False},
    # Qwen3: RMSNorm on each head of q and k, before RoPE.
    "qwen3": {"qk_norm": True},
    # Phi-3: q/k/v stored as one `qkv_proj`, gate/up as one `gate_up_proj`.
    "phi3": {"fused_qkv": True, "fused_gate_up": True},
}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # D, the residual stream width
    intermediate_size: int  # F, the SwiGLU hidden width
    num_hidden_layers: int
    num_attention_heads: int  # H query heads
    num_key_value_heads: int  # KV heads: H (MHA), 1 (MQA) or a divisor of H (GQA)
    head_dim: int  # explicit in config.json, or hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Normalised rope scaling: {"rope_type": one of ROPE_TYPES, ...type-specific keys}, or None.
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    # False: Hugging Face half-split RoPE layout. True: GGUF/llama.cpp interleaved pairs.
    rope_traditional: bool = False
    # Per-dimension wavelengths overriding rope_theta (GGUF `rope_freqs` tensors hold llama3 factors).
    rope_freqs: list[float] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # mlx-community quantization: {"group_size", "bits", optional "mode", per-layer overrides}.
    quantization: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build a config from a Hugging Face config.json dict; unknown keys are ignored."""
        model_type = config.get("model_type")
        if model_type is None:
            raise ModelLoadError(f"{source}: missing required key 'model_type'")
        if model_type not in FAMILIES:
            raise ModelLoadError(
                f"{source}: unsupported model_type {model_type!r}; "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        for key in _REQUIRED_KEYS:
            if config.get(key) is None:
                raise ModelLoadError(f"{source}: missing required key {key!r}")
        act = config.get("hidden_act", config.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise ModelLoadError(
                f"{source}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')"
            )

        family = FAMILIES[model_type]
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        rope_theta, rope_scaling, partial = _parse_rope(config, source)
        attention_bias = bool(config.get("attention_bias", False))

        return cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial,
            rope_traditional=bool(config.get("rope_traditional", False)),
            rope_freqs=config.get("rope_freqs"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family.get("qkv_bias", attention_bias),
            o_bias=family.get("o_bias", attention_bias),
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=family.get("qk_norm", False),
            fused_qkv=family.get("fused_qkv", False),
            fused_gate_up=family.get("fused_gate_up", False),
            quantization=config.get("quantization") or config.get("quantization_config"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_as_id_list(config.get("eos_token_id")),
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read and parse a config.json file, with errors that name the file."""
        return cls.from_dict(read_json(path, "config"), source=str(path))


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON object from `path`; missing or malformed files raise ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: {what} file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _parse_rope(config: dict[str, Any], source: str) -> tuple[float, dict | None, float]:
    """Accept both spellings: classic `rope_theta` + `rope_scaling`, and transformers-5
    `rope_parameters: {rope_type, rope_theta, ...}`. Returns (theta, scaling or None, partial factor)."""
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"{source}: per-layer-type 'rope_parameters' are not supported")
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.pop("rope_theta", config.get("rope_theta", 10000.0)))
    partial = float(merged.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None, partial
    if rope_type in ("llama3", "yarn"):
        # transformers falls back to the top-level value when the dict does not carry it.
        merged.setdefault(
            "original_max_position_embeddings",
            config.get("original_max_position_embeddings", config.get("max_position_embeddings")),
        )
    required = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}
    for key in required.get(rope_type, []):
        if merged.get(key) is None:
            raise ModelLoadError(f"{source}: rope type {rope_type!r} needs key {key!r}")
    merged["rope_type"] = rope_type
    return theta, merged, partial
