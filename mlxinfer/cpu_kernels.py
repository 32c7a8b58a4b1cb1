"""Kernels for MLX's CPU backend, where transcendental functions are scalar: `mx.exp` costs ~12 ns
a float (30x a multiply) and `mx.sigmoid` more, so SwiGLU's sigmoid and attention's softmax take
about 40% of a 256-token prefill. Here exp is rebuilt from multiplies and adds (exact to float32
rounding, like mx.exp) and compiled into one fused kernel.

Here: exp, swiglu, attention (prefill chunks, in causal query blocks, or under a window mask), and the transposed
weight layouts of the float32 policy. Used only when MLX runs on the CPU (`on_cpu()`, or the float32
policy that only the CPU picks by default); on Metal the native ops are fast and are kept.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import window_mask

_LOG2E = 1.4426950408889634
# Taylor coefficients of 2^f = e^(f ln 2) for f in [0, 1): degree 7 leaves < 1e-7 relative error.
_EXP2_COEFFICIENTS = [math.log(2) ** i / math.factorial(i) for i in range(8)]


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _exp(x: mx.array) -> mx.array:
    """e^x = 2^n * 2^f with n = floor(x log2 e): 2^n built in the exponent bits, 2^f a polynomial."""
    # Float32 range: at y <= -127 the exponent field is 0, so exp(-inf) (masked scores) is exactly 0.
    y = mx.clip(x * _LOG2E, -127.0, 127.0)
    n = mx.floor(y)
    f = y - n
    p = _EXP2_COEFFICIENTS[-1]
    for c in reversed(_EXP2_COEFFICIENTS[:-1]):
        p = p * f + c
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


# Plain (shape-specialised) compiles: re-tracing for a new shape costs ~0.2 ms, the generated kernel
# is reused; shapeless compilation cannot infer the shape of the bit-level view.
exp = mx.compile(_exp)


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up in one fused kernel; exp(-gate) saturates, never NaN."""
    return gate / (1.0 + _exp(-gate)) * up


_shifted_exp = mx.compile(lambda scores, row_max: _exp(scores - row_max))


QUERY_BLOCK = 128


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Attention of T new queries `[B, H, T, hd]` over S >= T keys/values `[B, KV, S, hd]`, with GQA
    by broadcasting query groups. `mask` is "causal" (the queries are the last T of the S
    positions) or a bool `[T, S]` array (True = visible: sliding windows, rotating caches).

    Queries go in blocks of 128. A causal block is computed against only the keys it can see:
    that skips the masked upper triangle and keeps each score block in cache (a 512-token chunk:
    50 -> 13 ms a layer)."""
    T, S = q.shape[2], k.shape[2]
    causal = isinstance(mask, str)
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(T, start + QUERY_BLOCK)
        if causal:
            visible = S - T + end  # keys up to this block's last query
            keys, values = k[:, :, :visible], v[:, :, :visible]
            rows = mx.arange(visible - (end - start), visible)
            block_mask = window_mask(rows, mx.arange(visible)) if end - start > 1 else None
        else:
            keys, values, block_mask = k, v, mask[start:end]
        q_block = q[:, :, start:end]
        if blocks:  # one block at a time: its scores are freed before the next block's exist
            q_block = mx.depends(q_block, blocks[-1])
        blocks.append(_attention_block(q_block, keys, values, scale, block_mask))
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=2)


def _attention_block(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None
) -> mx.array:
    """Masked attention of T queries over S keys. Softmax is normalised after the value product:
    a divide over [T, hd] instead of [T, S]."""
    B, H, T, hd = q.shape
    kv_heads = k.shape[1]
    groups = H // kv_heads
    S = k.shape[2]
    q = (q * scale).reshape(B, kv_heads, groups * T, hd)  # [B, KV, G*T, hd]
    scores = q @ k.swapaxes(-1, -2)  # [B, KV, G*T, S]
    if mask is not None:  # [T, S], broadcast over the query groups
        scores = scores.reshape(B, kv_heads, groups, T, S)
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        scores = scores.reshape(B, kv_heads, groups * T, S)
    weights = _shifted_exp(scores, scores.max(axis=-1, keepdims=True))  # unnormalised
    out = (weights @ v) / weights.sum(axis=-1, keepdims=True)  # [B, KV, G*T, hd]
    return out.reshape(B, H, T, hd)


# -- weight layouts for the float32 CPU policy -------------------------------------------------------
# OpenBLAS's matrix-vector kernels read a wide matrix (many more outputs than inputs) faster stored
# [in, out] than [out, in]: measured 21 vs 17 GB/s for SmolLM2's gate/up, 27 vs 19 GB/s for its
# 49k-row LM head, but slower for narrow ones. Decode is bound by reading weights, so wide layers
# keep a transposed copy (and only that one).


class TransposedLinear(nn.Module):
    """A float32 Linear stored as `weight_t` [in, out]: y = x @ weight_t (+ bias)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight_t)
        return x @ self.weight_t


class TransposedEmbedding(nn.Module):
    """A (tied) embedding stored as `weight_t` [dim, vocab]: lookups gather columns, and as the LM
    head it is a wide matrix read in its fast layout."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight_t = mx.contiguous(embedding.weight.T)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)  # [..., dim]

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def is_wide(weight: mx.array) -> bool:
    out_features, in_features = weight.shape
    return out_features >= 2 * in_features
