"""Rotary position embeddings: default, linear, llama3 and yarn frequencies, applied by mx.fast.rope.

Frequencies follow transformers' `modeling_rope_utils` formulas exactly. Scaled types are handed to
mx.fast.rope as explicit wavelengths (`freqs` = 1 / inv_freq), so every type runs the same fused kernel.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels
from .config import ModelConfig


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


class RoPE(nn.Module):
    """Applies rotary embeddings to `[B, heads, T, head_dim]` queries or keys at positions offset..

    On Metal: mx.fast.rope. On the CPU, where its per-element sin/cos are scalar, a cos/sin table
    for the positions (computed as transformers does: float32 angles pos * inv_freq) is built once
    per forward pass, shared by every layer, and applied by one compiled elementwise kernel."""

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

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if cpu_kernels.on_cpu():
            cos, sin = self._table(offset, x.shape[2])
            rotate = _rotate_interleaved if self.traditional else _rotate_half
            if self.dims == x.shape[-1]:
                return rotate(x, cos, sin)
            rotated = rotate(x[..., : self.dims], cos, sin)
            return mx.concatenate([rotated, x[..., self.dims :]], axis=-1)
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

    def _table(self, offset: int, length: int) -> tuple[mx.array, mx.array]:
        """cos and sin `[length, dims / 2]` for positions offset.., built once per forward pass: the
        model's layers share this module (one memo per thread: arrays stay on the thread that built
        them)."""
        memo = getattr(_tables, "last", None)
        # The memo holds the inv_freq array itself: compared by identity, it cannot be mistaken for
        # another model's (an id() could be reused once an array is freed).
        if memo is not None and memo[0] is self._inv_freq and memo[1:3] == (offset, length):
            return memo[3], memo[4]
        positions = mx.arange(offset, offset + length, dtype=mx.float32)
        angles = positions[:, None] * self._inv_freq[None, :]
        cos, sin = mx.cos(angles), mx.sin(angles)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        _tables.last = (self._inv_freq, offset, length, cos, sin)
        return cos, sin


_tables = threading.local()


@mx.compile
def _rotate_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Hugging Face layout: the first half of each head pairs with the second half."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@mx.compile
def _rotate_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """GGUF/llama.cpp layout: adjacent dims (2i, 2i+1) form a pair."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)
