"""Op sets: the few operations whose best kernel depends on where MLX runs, chosen once at load.

    "mlx"  MLX's own fast ops (mx.fast.scaled_dot_product_attention, mx.fast.rope, nn.silu,
           mx.quantized_matmul in mlx-lm's layout): exactly the code a Mac runs on Metal. MLX's
           CPU backend implements them too, so this path is tested on every machine.
    "cpu"  the CPU-tuned kernels of cpu_kernels.py: causal attention and SwiGLU of prefill
           chunks in C (the gemv shim's library), elsewhere a polynomial exp for SwiGLU and
           softmax (MLX's CPU transcendentals are scalar), RMSNorm compiled (three kernels, not
           eight ops), attention in causal query blocks
           through BLAS, one cos/sin table per forward pass for RoPE, and quantized caches read
           through dequantize for prefill chunks and with folded query groups for decode.

`load(..., kernels="auto")` picks "cpu" on the CPU device and "mlx" elsewhere; MLXINFER_KERNELS
overrides "auto" (for the test suite, and for users). The model carries its op set
(`model.kernels`); each module that uses one holds it as `self.ops`.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernels
from .masks import Mask, window_mask

KERNELS = ("auto", "cpu", "mlx")
KERNELS_ENV = "MLXINFER_KERNELS"


class MLXOps:
    """MLX's fast ops: what a Mac runs."""

    name = "mlx"

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        return nn.silu(gate) * up

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    def geglu(self, gate: mx.array, up: mx.array) -> mx.array:
        """tanh-approximated GELU (transformers' gelu_pytorch_tanh) of gate, times up."""
        return nn.gelu_approx(gate) * up

    def rope(self, rope, x: mx.array, offset: int | mx.array) -> mx.array:
        """`rope` is the model's RoPE module (its dims, frequencies and layout); `offset` is the
        position of x's first token, or an int array `[B]` of each row's."""
        return rope.fast(x, offset)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask):
        """q `[B, H, T, hd]` over k, v `[B, KV, S, hd]`; GQA by broadcasting."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def softcapped_attention(
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, cap: float, mask: Mask
    ) -> mx.array:
        """Attention whose scores are soft-capped, cap * tanh(score / cap), before the mask and
        softmax (Gemma 2): no fused kernel takes that. The query groups are a batch dimension
        over broadcast keys, as in quantized_attention."""
        B, H, T, hd = q.shape
        kv_heads = k.shape[1]
        q = (q * scale).reshape(B, kv_heads, H // kv_heads, T, hd)
        scores = q @ k[:, :, None].swapaxes(-1, -2)  # [B, KV, G, T, S]
        scores = masked(softcap(scores, cap), mask)
        weights = mx.softmax(scores, axis=-1, precise=True)
        return (weights @ v[:, :, None]).reshape(B, H, T, hd)

    def quantized_attention(
        self, q: mx.array, k: tuple, v: tuple, scale: float, mask: Mask, group_size: int, bits: int
    ) -> mx.array:
        """Attention over quantized keys/values (packed, scales, biases), never dequantized as a
        whole: the query groups are a batch dimension over broadcast keys (mlx-lm's layout, which
        keeps Metal on its one-row kernels)."""
        B, H, T, hd = q.shape
        kv_heads = k[0].shape[1]
        q = (q * scale).reshape(B, kv_heads, H // kv_heads, T, hd)
        k = tuple(a[:, :, None] for a in k)  # [B, KV, 1, S, ...]
        v = tuple(a[:, :, None] for a in v)
        scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
        scores = masked(scores, mask)  # [B, KV, G, T, S]
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
        return out.reshape(B, H, T, hd)


class CPUOps(MLXOps):
    """The CPU-tuned kernels (cpu_kernels.py); what MLX's fast ops already do well is kept."""

    name = "cpu"

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        if gate.size >= cpu_kernels.NATIVE_SWIGLU_MIN:  # a prefill chunk: the shim's C kernel
            if (out := cpu_kernels.native_swiglu(gate, up)) is not None:
                return out
        return cpu_kernels.swiglu(gate, up)  # MLX's CPU sigmoid is scalar

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return cpu_kernels.rms_norm(x, weight, eps)

    def rope(self, rope, x: mx.array, offset: int | mx.array) -> mx.array:
        return cpu_kernels.rope(
            x, offset, rope.inv_freq, rope.dims, rope.traditional, rope.attention_factor
        )

    def attention(self, q, k, v, scale, mask):
        if mask is None or (not isinstance(mask, str) and mask.ndim == 4):
            # A batch's decode step or verify pass (masks [B, 1, T, S]): the shim's kernel where
            # each row sees a prefix of its slots; MLX's fallback makes a one-row product per row
            # and head.
            if (out := cpu_kernels.decode_attention(q, k, v, scale, mask)) is not None:
                return out
            return super().attention(q, k, v, scale, mask)
        return cpu_kernels.attention(q, k, v, scale, mask)  # BLAS + fast exp, causal blocks

    def quantized_attention(self, q, k, v, scale, mask, group_size, bits):
        if q.shape[2] > 1 and (mask is None or isinstance(mask, str) or mask.ndim == 2):
            # A prefill chunk: MLX's CPU quantized matmuls don't use BLAS, so dequantize (the same
            # numbers quantized_matmul uses) and take the BLAS kernels.
            k = mx.dequantize(*k, group_size=group_size, bits=bits)
            v = mx.dequantize(*v, group_size=group_size, bits=bits)
            return cpu_kernels.attention(q, k, v, scale, mask)
        # a decode step, or a batch's verify pass (speculative decoding: [B, 1, T, S] masks)
        return cpu_kernels.quantized_decode_attention(q, k, v, scale, mask, group_size, bits)


OPS = {"mlx": MLXOps(), "cpu": CPUOps()}


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap): Gemma 2's bound on attention scores and final logits."""
    return mx.tanh(x / cap) * cap


def masked(scores: mx.array, mask: Mask) -> mx.array:
    """Scores `[B, ..., T, S]` with hidden keys at -inf; `mask` None, "causal" (the T queries are
    the last T of the S positions), bool `[T, S]`, or bool `[B, 1, T, S]` (a batch's rows)."""
    T, S = scores.shape[-2:]
    if mask is None:
        return scores
    if isinstance(mask, str):
        mask = window_mask(mx.arange(S - T, S), mx.arange(S))
    elif mask.ndim == 4 and scores.ndim == 5:  # [B, KV, G, T, S]: the query groups axis
        mask = mask[:, :, None]
    return mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))


def resolve_kernels(kernels: str = "auto") -> str:
    """The op set to use, cpu or mlx: "auto" takes MLXINFER_KERNELS when set, else "cpu" on the
    CPU device and "mlx" elsewhere."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels != "auto":
        return kernels
    chosen = os.environ.get(KERNELS_ENV)
    if chosen:
        if chosen not in OPS:
            raise ValueError(f"{KERNELS_ENV} must be cpu or mlx, got {chosen!r}")
        return chosen
    return "cpu" if mx.default_device() == mx.cpu else "mlx"


def op_set(kernels: str = "auto") -> MLXOps:
    return OPS[resolve_kernels(kernels)]
