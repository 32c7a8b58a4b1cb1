"""ModelConfig: one decoder-only transformer, configured from a Hugging Face config.json.

Families are data: `FAMILIES` maps a Hugging Face `model_type` to the architectural options that
distinguish it (biases, q/k norm, fused projections, which layers slide, how MoE routing
normalises). Everything else comes from config.json. Per-layer choices (sliding-window or full
attention; MoE or dense MLP) are resolved here once, as transformers resolves them.

Every file of a model directory is reached through `model_file` (no symlink out of the directory)
and every JSON file read with `read_json` (any malformed file is a ModelLoadError naming it); each
config.json value is checked to be of its kind (`_KINDS`, `kind_problem`) before it is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """A model file or directory could not be loaded; the message names the file and what is wrong."""


# An untrusted config.json decides how many layers are built; the deepest released models have
# about 130. A billion would exhaust memory before any weight is read.
MAX_LAYERS = 1024

# Sizes an untrusted config.json may claim, far above any released model: past them a model's
# lazily built arrays, RoPE tables or per-head loops would exhaust memory or time before any
# weight is compared.
_SIZE_LIMITS = {
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "moe_intermediate_size": 2**20,
    "shared_expert_intermediate_size": 2**20,
    "vocab_size": 2**22,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "num_experts": 4096,
    "num_local_experts": 4096,
    "max_position_embeddings": 2**24,
}
_ZERO_MEANS_NONE = {  # 0: no experts / no shared expert
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
}


# What each key an untrusted config.json may set must hold (a null counts as unset). Checked before
# any value is used: a list for model_type was a TypeError traceback, "false" for
# tie_word_embeddings silently meant true, and a string inside rope_scaling failed deep in rope.py.
_KINDS: dict[str, str] = {
    "model_type": "a string",
    "hidden_act": "a string",
    "hidden_activation": "a string",
    "torch_dtype": "a string",
    "dtype": "a string",
    "rms_norm_eps": "a number",
    "query_pre_attn_scalar": "a number",
    "attn_logit_softcapping": "a number",
    "final_logit_softcapping": "a number",
    "rope_local_base_freq": "a number",
    "sliding_window_pattern": "an integer",
    "_sliding_window_pattern": "an integer",
    "rope_theta": "a number",
    "partial_rotary_factor": "a number",
    "num_hidden_layers": "an integer",
    "sliding_window": "an integer",
    "max_window_layers": "an integer",
    "num_experts_per_tok": "an integer",
    "decoder_sparse_step": "an integer",
    "original_max_position_embeddings": "an integer",
    "bos_token_id": "an integer",
    "eos_token_id": "a token id or a list of them",
    "tie_word_embeddings": "a boolean",
    "attention_bias": "a boolean",
    "mlp_bias": "a boolean",
    "rope_traditional": "a boolean",
    "use_sliding_window": "a boolean",
    "norm_topk_prob": "a boolean",
    "layer_types": "a list of strings",
    "mlp_only_layers": "a list of integers",
    "rope_freqs": "a list of numbers",
    "rope_scaling": "an object",
    "rope_parameters": "an object",
    "quantization": "an object",
    "quantization_config": "an object",
}
# Inside rope_scaling / rope_parameters and quantization (a per-layer-type rope_parameters, which
# holds an object for each layer type, is checked by _parse_rope).
_NESTED_KINDS: dict[str, dict[str, str]] = {
    "rope": {
        "rope_type": "a string",
        "type": "a string",
        "rope_theta": "a number",
        "partial_rotary_factor": "a number",
        "factor": "a number",
        "low_freq_factor": "a number",
        "high_freq_factor": "a number",
        "original_max_position_embeddings": "an integer",
        "attention_factor": "a number",
        "mscale": "a number",
        "mscale_all_dim": "a number",
        "beta_fast": "a number",
        "beta_slow": "a number",
        "truncate": "a boolean",
    },
    "quantization": {"group_size": "an integer", "bits": "an integer", "mode": "a string"},
}
_NESTED = {
    "rope_scaling": "rope",
    "rope_parameters": "rope",
    "quantization": "quantization",
    "quantization_config": "quantization",
}


def _is_integer(value: Any) -> bool:
    """An int, or a float with an integral value (some writers save 4096.0); never a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_IS_KIND: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "a boolean": lambda v: isinstance(v, bool),
    "an integer": _is_integer,
    "a number": _is_number,
    "an object": lambda v: isinstance(v, dict),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(map(_is_integer, v)),
    "a list of numbers": lambda v: isinstance(v, list) and all(map(_is_number, v)),
    "a token id or a list of them": lambda v: (
        _is_integer(v) or (isinstance(v, list) and all(map(_is_integer, v)))
    ),
}


def _check_values(config: dict[str, Any], source: str) -> None:
    """Every key that is set holds the kind _KINDS names, and every size is within _SIZE_LIMITS."""
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"{source}: a config must be a JSON object, got {type(config).__name__}"
        )
    for key, limit in _SIZE_LIMITS.items():
        value = config.get(key)
        if value is None or (value == 0 and key in _ZERO_MEANS_NONE):
            continue
        if not _is_integer(value) or not 1 <= value <= limit:
            raise ModelLoadError(
                f"{source}: {key} must be an integer between 1 and {limit}, got {brief(value)}"
            )
    for key, kind in _KINDS.items():
        if problem := kind_problem(config.get(key), kind, key):
            raise ModelLoadError(f"{source}: invalid config ({problem})")
    for key, table in _NESTED.items():
        inside = config.get(key) or {}  # an object: checked above
        for inner, kind in _NESTED_KINDS[table].items():
            if problem := kind_problem(inside.get(inner), kind, f"{key}.{inner}"):
                raise ModelLoadError(f"{source}: invalid config ({problem})")


def kind_problem(value: Any, kind: str, key: str) -> str | None:
    """What is wrong with `value`, read from a model file under `key`, unless it is None (unset) or
    of `kind`, one of "a string", "a boolean", "an integer", "a number", "an object", "a list of
    strings" (of integers, of numbers), "a token id or a list of them"."""
    if value is None or _IS_KIND[kind](value):
        return None
    return f"{key} must be {kind}, got {brief(value)}"


def brief(value: Any, limit: int = 60) -> str:
    """repr() of a value from a model file for a message, shortened (a file may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# model_type -> options that differ between families. Keys not listed take the defaults in ModelConfig.
FAMILIES: dict[str, dict[str, Any]] = {
    # Llama 2/3, SmolLM2: `attention_bias` and `mlp_bias` come from config.json.
    "llama": {},
    # transformers' Mistral, Mixtral and Phi-3 modules have no biases whatever config.json says.
    "mistral": {"qkv_bias": False, "o_bias": False, "mlp_bias": False},
    # Qwen2: bias on q/k/v projections, none on o_proj.
    "qwen2": {"qkv_bias": True, "o_bias": False, "mlp_bias": False},
    # Qwen3: RMSNorm on each head of q and k, before RoPE; `attention_bias` from config.json.
    "qwen3": {"qk_norm": True, "mlp_bias": False},
    # Phi-3: q/k/v stored as one `qkv_proj`, gate/up as one `gate_up_proj`.
    "phi3": {
        "fused_qkv": True,
        "fused_gate_up": True,
        "qkv_bias": False,
        "o_bias": False,
        "mlp_bias": False,
    },
    # Mixtral: every MLP is top-k of `num_local_experts`; top-k weights always renormalised.
    "mixtral": {
        "moe": True,
        "norm_topk_prob": True,
        "qkv_bias": False,
        "o_bias": False,
        "mlp_bias": False,
    },
    # Qwen2-MoE: routed experts plus a shared expert behind a sigmoid gate.
    "qwen2_moe": {
        "moe": True,
        "shared_expert": True,
        "qkv_bias": True,
        "o_bias": False,
        "mlp_bias": False,
        "sliding": "qwen2_moe",
    },
    "qwen3_moe": {
        "moe": True,
        "qk_norm": True,
        "mlp_bias": False,
        "sliding": "every_layer_if_used",
    },
    # Gemma 2: GeGLU; RMSNorm scaled by (1 + weight), before and after both attention and MLP;
    # embeddings scaled by sqrt(hidden_size); queries scaled by query_pre_attn_scalar ** -0.5;
    # attention scores and final logits soft-capped; every other layer slides (even ones);
    # `attention_bias` from config.json.
    "gemma2": {
        "gemma": True,
        "mlp_bias": False,
        "sliding": "gemma2",
        # transformers' Gemma2Config defaults, for keys config.json leaves out (a null: none)
        "defaults": {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        },
    },
    # Gemma 3 (text): Gemma 2's layout with RMSNorm on each head of q and k and no soft-capping;
    # five sliding layers to each full one, the sliding ones with their own RoPE base.
    "gemma3_text": {
        "gemma": True,
        "qk_norm": True,
        "mlp_bias": False,
        "sliding": "gemma3",
        "defaults": {
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        },
    },
}
# How a family picks its sliding-window layers (transformers' rules):
#   "every_layer"          all layers slide when `sliding_window` is set (Mistral, Mixtral, Phi-3)
#   "above_max_window"     with `use_sliding_window`, layers i >= `max_window_layers` (Qwen2/3)
#   "qwen2_moe"            with `use_sliding_window`, even layers i < `max_window_layers`
#   "every_layer_if_used"  with `use_sliding_window`, all layers (Qwen3-MoE)
#   "gemma2"               always: even layers
#   "gemma3"               always: all but every `sliding_window_pattern`-th layer (default 6)
# All but "every_layer" and "every_layer_if_used" read an explicit `layer_types` list first.
_SLIDING_DEFAULT = {"qwen2": "above_max_window", "qwen3": "above_max_window"}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The MLP's activation: config.json's `hidden_act` (`hidden_activation` in Gemma) -> ours.
ACTIVATIONS = {
    "silu": "silu",  # SwiGLU
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",  # GeGLU with tanh-approximated GELU
    "gelu_new": "gelu_tanh",  # (the same formula)
}

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
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
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
    # Sliding-window layers' own RoPE (Gemma 3): its base and scaling, or None for the model's.
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    # Gemma: RMSNorm weights are offsets from 1 (the norm multiplies by 1 + weight, in float32);
    # a norm after attention and after the MLP as well as before each; embeddings times
    # sqrt(hidden_size).
    gemma_norms: bool = False
    scale_embeddings: bool = False
    # Attention's query scale (query_pre_attn_scalar ** -0.5), or None for head_dim ** -0.5.
    query_scale: float | None = None
    # Soft-capping, cap * tanh(x / cap), of attention scores and of the final logits (Gemma 2).
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # Sliding-window attention: keys with position > query - sliding_window are visible, on the
    # layers where layer_windows[i] is not None.
    sliding_window: int | None = None
    layer_windows: list[int | None] = field(default_factory=list)
    # Mixture of experts (0 experts: dense model). layer_moe[i]: whether layer i's MLP is MoE.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # F of each routed expert
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    layer_moe: list[bool] = field(default_factory=list)
    # mlx-community quantization: {"group_size", "bits", optional "mode", per-layer overrides}.
    quantization: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    def __post_init__(self):
        # Built directly rather than by from_dict: per-layer lists default to full attention, dense.
        n = self.num_hidden_layers
        self.layer_windows = list(self.layer_windows) or [self.sliding_window] * n
        self.layer_moe = list(self.layer_moe) or [self.num_experts > 0] * n
        for name in ("layer_windows", "layer_moe"):
            if len(getattr(self, name)) != n:
                raise ModelLoadError(
                    f"{name} has {len(getattr(self, name))} entries for {n} layers"
                )

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build a config from a Hugging Face config.json dict; unknown keys are ignored. Anything
        wrong with it is a ModelLoadError naming `source`."""
        _check_values(config, source)
        family = FAMILIES.get(config.get("model_type"), {})  # (checked to be a string)
        config = {**family.get("defaults", {}), **config}  # a null given is kept: no default
        config = {key: value for key, value in config.items() if value is not None}  # null: unset
        try:
            return cls._from_dict(config, source)
        except ModelLoadError:
            raise
        except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
            raise ModelLoadError(f"{source}: invalid config ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, config: dict[str, Any], source: str) -> ModelConfig:
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
        family = FAMILIES[model_type]
        act_keys = ("hidden_act", "hidden_activation")  # Gemma's modules read the second
        act_keys = act_keys[::-1] if family.get("gemma") else act_keys
        act_key = next((key for key in act_keys if key in config), act_keys[0])
        act = config.get(act_key, "silu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(
                f"{source}: {act_key} {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        rope_theta, rope_scaling, partial, local_rope = _parse_rope(config, source)
        _check_rope_freqs(config.get("rope_freqs"), int(head_dim * partial) // 2, source)
        attention_bias = bool(config.get("attention_bias", False))
        n_layers = int(config["num_hidden_layers"])
        if not 1 <= n_layers <= MAX_LAYERS:  # per-layer lists are built from it: bound it first
            raise ModelLoadError(
                f"{source}: num_hidden_layers must be between 1 and {MAX_LAYERS}, got {n_layers}"
            )
        window, layer_windows = _parse_sliding(config, family, n_layers, source)
        moe = _parse_moe(config, family, n_layers, source)
        if any(moe["layer_moe"]) and ACTIVATIONS[act] != "silu":
            raise ModelLoadError(f"{source}: mixture-of-experts layers need {act_key} 'silu'")
        gemma = _parse_gemma(config, family, source)

        return cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            hidden_act=ACTIVATIONS[act],
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial,
            rope_traditional=bool(config.get("rope_traditional", False)),
            rope_freqs=config.get("rope_freqs"),
            local_rope_theta=local_rope[0] if local_rope else None,
            local_rope_scaling=local_rope[1] if local_rope else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family.get("qkv_bias", attention_bias),
            o_bias=family.get("o_bias", attention_bias),
            mlp_bias=family.get("mlp_bias", bool(config.get("mlp_bias", False))),
            qk_norm=family.get("qk_norm", False),
            fused_qkv=family.get("fused_qkv", False),
            fused_gate_up=family.get("fused_gate_up", False),
            sliding_window=window,
            layer_windows=layer_windows,
            **moe,
            **gemma,
            quantization=config.get("quantization") or config.get("quantization_config"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=token_ids(config.get("eos_token_id")),
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
    except RecursionError:  # '[' * 100000: Python's parser recurses once per level
        raise ModelLoadError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def model_file(directory: Path, name: str) -> Path:
    """`directory / name`, checked before it is read: a model from the internet may link its
    `config.json` or `chat_template.jinja` to any file on this machine, so a symlink leading out
    of the directory is refused (see `inside_model_dir`). A missing file is the caller's to report."""
    file = directory / name
    if not inside_model_dir(file, directory):
        raise ModelLoadError(f"{file}: a symlink leading outside the model directory")
    return file


def inside_model_dir(file: Path, directory: Path) -> bool:
    """Whether `file` (symlinks resolved) lies inside `directory` — or, when `directory` is a
    snapshot of the Hugging Face cache (`models--org--name/snapshots/<revision>`, whose files are
    symlinks to `../../blobs/<hash>`), inside that repository's own `blobs` folder."""
    target, root = _resolved(file), _resolved(directory)
    if target is None or root is None:
        return False
    if target.is_relative_to(root):
        return True
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return target.parent == root.parent.parent / "blobs"
    return False


def _resolved(file: Path) -> Path | None:
    try:
        return file.resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        return None


def token_ids(value: int | list[int] | None) -> list[int]:
    """`eos_token_id` as config files write it (one id, a list or null: "a token id or a list of
    them" to `kind_problem`), as a list of ints."""
    if value is None:
        return []
    return [int(value)] if _is_integer(value) else [int(v) for v in value]


def _parse_sliding(
    config: dict[str, Any], family: dict[str, Any], n_layers: int, source: str
) -> tuple[int | None, list[int | None]]:
    """(sliding_window or None, per-layer window or None) by the family's rule (see FAMILIES)."""
    model_type = config["model_type"]
    rule = family.get("sliding", _SLIDING_DEFAULT.get(model_type, "every_layer"))
    window = config.get("sliding_window") or None
    always = rule in ("every_layer", "gemma2", "gemma3")  # no `use_sliding_window` switch
    if not always and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, [None] * n_layers
    window = int(window)
    if window < 1:
        raise ModelLoadError(f"{source}: sliding_window must be >= 1, got {window}")
    layer_types = config.get("layer_types")
    if layer_types is not None and rule not in ("every_layer", "every_layer_if_used"):
        if len(layer_types) != n_layers:
            raise ModelLoadError(
                f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers"
            )
        sliding = [t == "sliding_attention" for t in layer_types]
    else:
        max_window_layers = int(config.get("max_window_layers", n_layers))
        pattern = int(
            config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
        )
        if pattern < 1:
            raise ModelLoadError(f"{source}: sliding_window_pattern must be >= 1, got {pattern}")
        sliding = {
            "every_layer": lambda i: True,
            "every_layer_if_used": lambda i: True,
            "above_max_window": lambda i: i >= max_window_layers,
            "qwen2_moe": lambda i: i % 2 == 0 and i < max_window_layers,
            "gemma2": lambda i: i % 2 == 0,
            "gemma3": lambda i: (i + 1) % pattern != 0,
        }[rule]
        sliding = [sliding(i) for i in range(n_layers)]
    return window, [window if s else None for s in sliding]


def _parse_moe(
    config: dict[str, Any], family: dict[str, Any], n_layers: int, source: str
) -> dict[str, Any]:
    """MoE fields for ModelConfig; a dense family gets no experts."""
    if not family.get("moe"):
        return {"layer_moe": [False] * n_layers}
    experts = int(config.get("num_local_experts", config.get("num_experts")) or 0)
    top_k = int(config.get("num_experts_per_tok") or 0)
    if experts and not 1 <= top_k <= experts:
        raise ModelLoadError(
            f"{source}: num_experts_per_tok must be in [1, {experts}], got {top_k}"
        )
    step = int(config.get("decoder_sparse_step") or 1)
    dense_layers = set(config.get("mlp_only_layers") or [])
    layer_moe = [
        experts > 0 and i not in dense_layers and (i + 1) % step == 0 for i in range(n_layers)
    ]
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": int(
            config.get("moe_intermediate_size") or config["intermediate_size"]
        ),
        "shared_expert_intermediate_size": int(config.get("shared_expert_intermediate_size") or 0)
        if family.get("shared_expert")
        else 0,
        "norm_topk_prob": family.get("norm_topk_prob", bool(config.get("norm_topk_prob", False))),
        "layer_moe": layer_moe,
    }


def _parse_gemma(config: dict[str, Any], family: dict[str, Any], source: str) -> dict[str, Any]:
    """The Gemma fields of ModelConfig: soft-capping and the query scale come from config.json
    (with the family's defaults, FAMILIES)."""
    if not family.get("gemma"):
        return {}
    out: dict[str, Any] = {"gemma_norms": True, "scale_embeddings": True}
    for key, field_name in (
        ("attn_logit_softcapping", "attn_logit_softcap"),
        ("final_logit_softcapping", "final_logit_softcap"),
        ("query_pre_attn_scalar", "query_scale"),
    ):
        value = config.get(key)
        if value is None:
            continue
        if value <= 0:
            raise ModelLoadError(f"{source}: {key} must be > 0, got {brief(value)}")
        out[field_name] = float(value) ** -0.5 if key == "query_pre_attn_scalar" else float(value)
    return out


def _parse_rope(
    config: dict[str, Any], source: str
) -> tuple[float, dict | None, float, tuple[float, dict | None] | None]:
    """Accept both spellings: classic `rope_theta` + `rope_scaling`, and transformers-5
    `rope_parameters: {rope_type, rope_theta, ...}`, or one such object per layer type
    (`full_attention`, `sliding_attention`). Returns (theta, scaling or None, partial factor,
    the sliding layers' own (theta, scaling) or None): Gemma 3's `rope_local_base_freq` or the
    `sliding_attention` parameters."""
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown or "full_attention" not in params:
            raise ModelLoadError(
                f"{source}: per-layer-type 'rope_parameters' must hold 'full_attention' (and "
                f"'sliding_attention'), got {brief(sorted(params))}"
            )
        for layer_type, inner in params.items():
            for key, kind in _NESTED_KINDS["rope"].items():
                where = f"rope_parameters.{layer_type}.{key}"
                if problem := kind_problem(inner.get(key), kind, where):
                    raise ModelLoadError(f"{source}: invalid config ({problem})")
        theta, scaling, partial, _ = _parse_rope(
            {**config, "rope_parameters": params["full_attention"]}, source
        )
        local = None
        if "sliding_attention" in params:
            local_theta, local_scaling, _, _ = _parse_rope(
                {**config, "rope_parameters": params["sliding_attention"]}, source
            )
            local = (local_theta, local_scaling)
        return theta, scaling, partial, local
    local = None
    if config.get("rope_local_base_freq") is not None:
        local = (float(config["rope_local_base_freq"]), None)
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.pop("rope_theta", config.get("rope_theta", 10000.0)))
    partial = float(merged.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    if not 0 <= partial <= 1:  # the fraction of each head's dims rotated (0: none)
        raise ModelLoadError(f"{source}: partial_rotary_factor must be in [0, 1], got {partial}")
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None, partial, local
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
    return theta, merged, partial, local


def _check_rope_freqs(freqs: list[float] | None, pairs: int, source: str) -> None:
    """GGUF `rope_freqs` divide the default frequencies: one positive number per rotated pair."""
    if freqs is not None and (len(freqs) != pairs or not all(f > 0 for f in freqs)):
        raise ModelLoadError(
            f"{source}: rope_freqs must hold {pairs} positive numbers (one per rotated pair of "
            f"dimensions), got {len(freqs)}: {brief(freqs)}"
        )
