"""Rotary position embeddings: default, linear, llama3 and yarn frequencies.

Frequencies follow transformers' `modeling_rope_utils` formulas exactly. Scaled types are handed to
mx.fast.rope as explicit wavelengths (`freqs` = 1 / inv_freq), so every type runs the same fused kernel;
the "cpu" op set applies the same frequencies from a cos/sin table (cpu_kernels.rope).
"""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .ops import OPS, MLXOps


def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies for the rotated dims of one head, and yarn's attention factor (else 1.0)."""
    dims = rotary_dims(config)
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dims, base, scaling, config.max_position_embeddings)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def rotary_dims(config: ModelConfig) -> int:
    return int(config.head_dim * config.partial_rotary_factor)


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_inv_freq(dims: int, base: float, s: dict, max_positions: int) -> tuple[np.ndarray, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)


def local_rope(config: ModelConfig) -> RoPE | None:
    """The RoPE of sliding-window layers where they have their own (Gemma 3), else None."""
    if config.local_rope_theta is None:
        return None
    return RoPE(
        replace(
            config,
            rope_theta=config.local_rope_theta,
            rope_scaling=config.local_rope_scaling,
            rope_freqs=None,
        )
    )


class RoPE(nn.Module):
    """Applies rotary embeddings to `[B, heads, T, head_dim]` queries or keys at positions offset..,
    through the model's op set: mx.fast.rope ("mlx"), or a cos/sin table shared by the layers of a
    forward pass ("cpu", cpu_kernels.rope). One module is shared by all layers."""

    ops: MLXOps = OPS["mlx"]  # the model's op set, assigned by Model.set_kernels

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dims = rotary_dims(config)
        self.traditional = config.rope_traditional
        if config.rope_freqs is not None:
            # GGUF rope_freqs: per-dimension divisors of the default frequencies (llama3 scaling
            # baked in); they take the place of any rope_scaling.
            default_inv_freq, _ = rope_inv_freq(replace(config, rope_scaling=None))
            inv_freq, self.attention_factor = default_inv_freq / np.asarray(config.rope_freqs), 1.0
        else:
            inv_freq, self.attention_factor = rope_inv_freq(config)  # [dims / 2]
        self._inv_freq = mx.array(inv_freq, dtype=mx.float32)  # underscore: not a parameter
        # mx.fast.rope takes the base for default frequencies, else explicit wavelengths.
        default = config.rope_scaling is None and config.rope_freqs is None
        self.base: float | None = config.rope_theta if default else None
        self._freqs = None if default else mx.array(1.0 / inv_freq, dtype=mx.float32)

    @property
    def inv_freq(self) -> mx.array:
        """Inverse frequencies `[dims / 2]`, float32."""
        return self._inv_freq

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return self.ops.rope(self, x, offset)

    def fast(self, x: mx.array, offset: int) -> mx.array:
        """mx.fast.rope, the "mlx" op set's kernel."""
        if self.attention_factor != 1.0:
            # yarn scales cos and sin, i.e. the rotated dims only.
            rotated = x[..., : self.dims] * self.attention_factor
            x = (
                mx.concatenate([rotated, x[..., self.dims :]], axis=-1)
                if self.dims < x.shape[-1]
                else rotated
            )
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )
