"""Kernels for MLX's CPU backend, where transcendental functions are scalar: `mx.exp` costs ~12 ns
a float (30x a multiply) and `mx.sigmoid` more, so SwiGLU's sigmoid and attention's softmax took
about 40% of a 256-token prefill. Prefill chunks go to C kernels in the gemv shim's library
(`native_attention`, `native_swiglu`: vectorised, threaded); elsewhere exp is rebuilt from
multiplies and adds (exact to float32 rounding, like mx.exp) and compiled.

Here: exp, swiglu, rms_norm, attention (prefill chunks, in causal query blocks, or under a window mask),
quantized decode attention with folded query groups, RoPE from a cos/sin table, and the transposed
weight layouts of the float32 policy. The "cpu" op set (ops.py) is what calls them; on Metal MLX's
own fast ops are fast and are kept.
"""

from __future__ import annotations

import ctypes
import math
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import backend
from .masks import window_mask

_LOG2E = 1.4426950408889634
# Taylor coefficients of 2^f = e^(f ln 2) for f in [0, 1): degree 7 leaves < 1e-7 relative error.
_EXP2_COEFFICIENTS = [math.log(2) ** i / math.factorial(i) for i in range(8)]


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


def _rms_norm_graph(
    x: mx.array, weight: mx.array, eps: mx.array, inverse_dims: mx.array
) -> mx.array:
    # mx.fast.rms_norm's own graph on the CPU (its fallback), op for op: the same numbers (MLX's
    # mean is the sum times 1/n as a float32, which `inverse_dims` is)
    x32 = x.astype(mx.float32)
    mean = mx.sum(mx.square(x32), axis=-1, keepdims=True) * inverse_dims
    normed = x32 * mx.rsqrt(mean + eps)
    return normed.astype(mx.result_type(x, weight)) * weight


_rms_norm = mx.compile(_rms_norm_graph, shapeless=True)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """mx.fast.rms_norm, compiled: on the CPU MLX runs that as eight ops (casts, square, mean,
    add, rsqrt, products), each ~8 us of dispatch at a decode step's sizes; compiled they are
    three kernels (the square, the sum, the rest fused): 61 norms a step of the default model.
    Shapeless, with `eps` and 1/dims as inputs: one trace serves every prompt chunk's length,
    batch size and norm width (a trace per shape would pile up in MLX's compile cache)."""
    inverse = mx.array(1.0 / x.shape[-1], mx.float32)
    return _rms_norm(x, weight, mx.array(eps, mx.float32), inverse)


_shifted_exp = mx.compile(lambda scores, row_max: _exp(scores - row_max))


QUERY_BLOCK = 128
KEY_BLOCK = 512  # keys per block of the online softmax: [KV, G*128, 512] float32 scores, ~2 MB
LONG_CONTEXT = 2 * KEY_BLOCK  # causal attention over more keys than this goes key block by block


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Attention of T new queries `[B, H, T, hd]` over S >= T keys/values `[B, KV, S, hd]`, with GQA
    by broadcasting query groups. `mask` is "causal" (the queries are the last T of the S
    positions) or a bool `[T, S]` array (True = visible: sliding windows, rotating caches).

    Queries go in blocks of 128. A causal block is computed against only the keys it can see:
    that skips the masked upper triangle and keeps each score block in cache (a 512-token chunk:
    50 -> 13 ms a layer). Over a long context (more than LONG_CONTEXT keys) a causal block goes
    through its keys KEY_BLOCK at a time with an online softmax (`_online_attention_block`), so
    no score row longer than a key block is ever held: with 8k keys a query block's scores
    would be 38 MB, read and written six times from memory instead of cache."""
    T, S = q.shape[2], k.shape[2]
    causal = isinstance(mask, str)
    if causal and (out := native_attention(q, k, v, scale)) is not None:
        return out
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(T, start + QUERY_BLOCK)
        q_block = q[:, :, start:end]
        if blocks:  # one block at a time: its scores are freed before the next block's exist
            q_block = mx.depends(q_block, blocks[-1])
        if causal and S - T + end > LONG_CONTEXT:
            blocks.append(_online_attention_block(q_block, k, v, scale, S - T + start))
            continue
        if causal:
            visible = S - T + end  # keys up to this block's last query
            keys, values = k[:, :, :visible], v[:, :, :visible]
            rows = mx.arange(visible - (end - start), visible)
            block_mask = window_mask(rows, mx.arange(visible)) if end - start > 1 else None
        else:
            keys, values, block_mask = k, v, mask[start:end]
        blocks.append(_attention_block(q_block, keys, values, scale, block_mask))
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=2)


def native_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    kernel: str | None = None,
    lengths: np.ndarray | None = None,
) -> mx.array | None:
    """Causal attention of q `[B, H, T, hd]` (the last T of S positions) over k, v `[B, KV, S, hd]`
    by the shim's C kernel (flash_attention.h: vectorised exp, threads, no score row longer than
    256 keys held), or None where it does not apply: no shim, not float32, a head dim that is not
    a multiple of the vector width. With `lengths` (int `[B]`, a batch's decode step), row b holds
    only its first lengths[b] keys and its queries are the last T of those. MLX cannot call it
    inside a graph, so q, k and v are evaluated here and the result is a new array: one
    synchronisation per layer, which a prefill chunk's attention, or a batch's decode attention
    (MLX's fallback: a one-row product per row and query head), outweighs. `kernel` forces a
    variant (avx512, avx2, generic, neon), for tests; ValueError where this CPU cannot run it."""
    run = backend.native_prefill_kernel("mlxinfer_attention")
    if (
        run is None
        or mx.default_device() != mx.cpu
        or any(a.dtype != mx.float32 for a in (q, k, v))
    ):
        return None
    mx.eval(q, k, v)
    arrays = []
    for a in (q, k, v):
        view = np.asarray(a)  # no copy: MLX's buffer, with its strides
        if view.strides[-1] != view.itemsize:
            view = np.ascontiguousarray(view)
        arrays.append(view)
    (B, H, T, hd), (_, KV, S, _) = q.shape, k.shape
    out = np.empty((B, H, T, hd), dtype=np.float32)
    job = backend.AttentionJob(B, H, KV, T, S, hd, scale, *(a.ctypes.data for a in arrays))
    for name, a in zip(("q_strides", "k_strides", "v_strides"), arrays, strict=True):
        getattr(job, name)[:] = [stride // a.itemsize for stride in a.strides[:3]]
    job.out = out.ctypes.data
    if lengths is not None:
        lengths = np.ascontiguousarray(lengths, dtype=np.int32)
        if lengths.shape != (B,):
            raise ValueError(
                f"lengths must have one entry per row ({B}), got shape {lengths.shape}"
            )
        job.lengths = lengths.ctypes.data
    code = run(ctypes.byref(job), -1 if kernel is None else backend.kernel_index(kernel))
    if code == 2:
        raise ValueError(f"this CPU cannot run the {kernel} kernel")
    if code == 3:
        raise MemoryError("the native attention kernel could not allocate its scratch memory")
    return mx.array(out) if code == 0 else None


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array | None:
    """A batch's new queries, q `[B, H, T, hd]` over k, v `[B, KV, S, hd]`: one per row (a decode
    step), or each row's last token and its proposals (speculative decoding's verify pass), by the
    shim's kernel where `mask` lets each row see a prefix of the slots, its T queries causally the
    last T of that prefix: None (one query a row, every slot), or a batch cache's bool
    `[B, 1, T, S]` over rows of different lengths (a growing cache). None where the kernel does
    not apply, or the mask is not such prefixes (a rotating cache that has wrapped, a sliding
    window): MLX's attention then runs."""
    T = q.shape[2]
    lengths = None
    if mask is None:
        if T != 1:
            return None
    else:
        if isinstance(mask, str) or mask.ndim != 4 or mask.shape[1:3] != (1, T):
            return None
        lengths = _prefix_lengths(mask)
        if lengths is None:
            return None
    return native_attention(q, k, v, scale, lengths=lengths)


_last_mask = threading.local()  # the layers of a step share one mask: read it once


def _prefix_lengths(mask: mx.array) -> np.ndarray | None:
    """The slots each row holds (int32 `[B]`) when a bool mask `[B, 1, T, S]` lets row b's
    query t see exactly its first lengths[b] - (T - 1 - t) slots (causal, the queries the last T
    of the row's slots), else None."""
    seen = getattr(_last_mask, "value", None)
    if seen is not None and seen[0] is mask:
        return seen[1]
    visible = np.asarray(mask)  # evaluates it once, no copy (a reshape here would be a new array)
    B, _, T, S = visible.shape
    visible = visible.reshape(B, T, S)
    lengths = visible[:, -1].sum(axis=1, dtype=np.int32)
    sees = lengths[:, None] - (T - 1) + np.arange(T)  # [B, T]: the slots query t sees
    if not np.array_equal(visible, np.arange(S) < sees[:, :, None]):
        lengths = None
    _last_mask.value = (mask, lengths)
    return lengths


NATIVE_SWIGLU_MIN = 1 << 16  # floats; fewer (decode steps) stay in MLX's graph, unsynchronised


def native_swiglu(gate: mx.array, up: mx.array, kernel: str | None = None) -> mx.array | None:
    """silu(gate) * up by the shim's C kernel (vectorised exp, threads), or None where it does not
    apply (no shim, not float32, shapes that differ). Like native_attention, it evaluates its
    inputs: for prefill chunks, where MLX's scalar kernel costs ~8 ns a float."""
    run = backend.native_prefill_kernel("mlxinfer_swiglu")
    if run is None or mx.default_device() != mx.cpu:
        return None
    if gate.dtype != mx.float32 or up.dtype != mx.float32 or gate.shape != up.shape:
        return None
    mx.eval(gate, up)
    gate_view, up_view = (np.ascontiguousarray(a) for a in (gate, up))  # no copy when contiguous
    out = np.empty(gate_view.shape, dtype=np.float32)
    variant = -1 if kernel is None else backend.kernel_index(kernel)
    if run(gate_view.ctypes.data, up_view.ctypes.data, out.ctypes.data, out.size, variant) == 2:
        raise ValueError(f"this CPU cannot run the {kernel} kernel")
    return mx.array(out)


def _online_attention_block(
    q: mx.array, k: mx.array, v: mx.array, scale: float, first: int
) -> mx.array:
    """Causal attention of t queries `[B, H, t, hd]` at positions first.. over the keys before
    and at them, KEY_BLOCK keys at a time (flash attention's online softmax): a running row max
    m, the running sum `denom` of exp(score - m) and the running output acc = sum exp(score - m) v,
    rescaled by exp(m_old - m_new) whenever the max grows. Only the key blocks that reach past
    `first` are masked."""
    B, H, t, hd = q.shape
    kv_heads = k.shape[1]
    groups = H // kv_heads
    q = (q * scale).reshape(B, kv_heads, groups * t, hd)  # [B, KV, G*t, hd]
    visible = first + t
    rows = mx.arange(first, visible)
    m = denom = acc = None
    for j0 in range(0, visible, KEY_BLOCK):
        j1 = min(visible, j0 + KEY_BLOCK)
        keys, values = k[:, :, j0:j1], v[:, :, j0:j1]
        # the causal mask, for a block that reaches past the first query
        masked = (window_mask(rows, mx.arange(j0, j1)),) if j1 - 1 > first else ()
        if m is None:
            m, denom, acc = _online_first(q, keys, values, *masked)
        else:
            m, denom, acc = _online_next(q, keys, values, m, denom, acc, *masked)
    return (acc / denom).reshape(B, H, t, hd)


def _block_scores(q, keys, mask=None):
    """Scores `[B, KV, G*t, kb]` of one key block, the mask `[t, kb]` applied over the G query
    groups."""
    scores = q @ keys.swapaxes(-1, -2)
    if mask is not None:
        B, kv_heads, rows, kb = scores.shape
        t = mask.shape[0]
        scores = scores.reshape(B, kv_heads, rows // t, t, kb)
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        scores = scores.reshape(B, kv_heads, rows, kb)
    return scores


def _online_first_impl(q, keys, values, mask=None):
    scores = _block_scores(q, keys, mask)
    m = scores.max(axis=-1, keepdims=True)  # finite: every query sees key 0, in the first block
    weights = _exp(scores - m)
    return m, weights.sum(axis=-1, keepdims=True), weights @ values


def _online_next_impl(q, keys, values, m, denom, acc, mask=None):
    scores = _block_scores(q, keys, mask)
    m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
    weights = _exp(scores - m_new)
    rescale = _exp(m - m_new)
    return (
        m_new,
        denom * rescale + weights.sum(axis=-1, keepdims=True),
        acc * rescale + weights @ values,
    )


# Compiled (shape-specialised, like exp; with and without the mask, traced apart): the
# elementwise steps fuse around the two products.
_online_first = mx.compile(_online_first_impl)
_online_next = mx.compile(_online_next_impl)


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


def quantized_decode_attention(
    q: mx.array, k: tuple, v: tuple, scale: float, mask, group_size: int, bits: int
) -> mx.array:
    """Attention of decode queries over quantized keys/values (packed, scales, biases) with each
    KV head's query groups folded into the rows of one product: 25% faster on the CPU than
    broadcasting the keys over the groups, which copies them. q `[B, H, T, hd]`."""
    B, H, T, hd = q.shape
    kv_heads, S = k[0].shape[1], k[0].shape[2]
    groups = H // kv_heads
    q = (q * scale).reshape(B, kv_heads, groups * T, hd)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
    if isinstance(mask, str):  # "causal": the T queries are the last T of the S positions
        mask = window_mask(mx.arange(S - T, S), mx.arange(S))
    if mask is not None:  # [T, S], or [B, 1, T, S] per row, over [B, KV, G, T, S]
        scores = scores.reshape(B, kv_heads, groups, T, S)
        mask = mask[:, :, None] if mask.ndim == 4 else mask
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        scores = scores.reshape(B, kv_heads, groups * T, S)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, H, T, hd)


# -- RoPE from a cos/sin table -----------------------------------------------------------------------
# mx.fast.rope computes sin/cos per element, scalar on the CPU. Here the table for the positions of a
# forward pass (float32 angles pos * inv_freq, as transformers computes them) is built once, shared by
# every layer, and applied by one compiled elementwise kernel.

_tables = threading.local()  # one memo per thread: arrays stay on the thread that built them


def rope(
    x: mx.array,
    offset: int | mx.array,
    inv_freq: mx.array,
    dims: int,
    traditional: bool,
    attention_factor: float = 1.0,
) -> mx.array:
    """Rotate the first `dims` of each head of `[B, heads, T, head_dim]` for positions offset..;
    `offset` is one int for all rows or an int array `[B]`, each row's own (a batch of sequences).
    `traditional` pairs adjacent dims (GGUF/llama.cpp), else the two halves (Hugging Face)."""
    cos, sin = _rope_table(inv_freq, offset, x.shape[2], attention_factor)
    rotate = _rotate_interleaved if traditional else _rotate_half
    if dims == x.shape[-1]:
        return rotate(x, cos, sin)
    rotated = rotate(x[..., :dims], cos, sin)
    return mx.concatenate([rotated, x[..., dims:]], axis=-1)


def _rope_table(
    inv_freq: mx.array, offset: int | mx.array, length: int, attention_factor: float
) -> tuple[mx.array, mx.array]:
    """cos and sin `[length, dims / 2]` (`[B, 1, length, dims / 2]` for per-row offsets), built once
    per forward pass: every layer asks for the same positions. The memo holds the inv_freq array
    (and an offsets array) itself: compared by identity, it cannot be mistaken for another model's
    (an id() could be reused once an array is freed). It keeps the last table of each of two
    frequency sets: Gemma 3's sliding layers rotate with their own, between full layers."""
    memos = getattr(_tables, "last", ())
    for memo in memos:
        if memo[0] is inv_freq and memo[2] == length:
            cached = memo[1]
            if cached is offset or (type(cached) is type(offset) is int and cached == offset):
                return memo[3], memo[4]
    if isinstance(offset, mx.array):  # [B] -> positions [B, 1, length, 1]
        steps = mx.arange(length, dtype=mx.float32)
        positions = (offset.astype(mx.float32)[:, None] + steps[None, :])[:, None, :, None]
        angles = positions * inv_freq
    else:
        positions = mx.arange(offset, offset + length, dtype=mx.float32)
        angles = positions[:, None] * inv_freq[None, :]
    cos, sin = mx.cos(angles), mx.sin(angles)
    if attention_factor != 1.0:  # yarn scales cos and sin
        cos, sin = cos * attention_factor, sin * attention_factor
    others = tuple(memo for memo in memos if memo[0] is not inv_freq)
    _tables.last = ((inv_freq, offset, length, cos, sin), *others[:1])
    return cos, sin


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


# -- weight layouts for the float32 CPU policy -------------------------------------------------------
# OpenBLAS's matrix-vector kernels read a wide matrix (many more outputs than inputs) faster stored
# [in, out] than [out, in]: measured 21 vs 17 GB/s for SmolLM2's gate/up, 27 vs 19 GB/s for its
# 49k-row LM head, but slower for narrow ones. Decode is bound by reading weights, so wide layers
# keep a transposed copy (and only that one).


class TransposedLinear(nn.Module):
    """A float32 Linear stored as `weight_t` [in, out]: y = x @ weight_t (+ bias)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = transposed(linear.weight)
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
        self.weight_t = transposed(embedding.weight)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)  # [..., dim]

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def transposed(weight: mx.array, rows: int = 256) -> mx.array:
    """`weight.T`, contiguous, copied a band of `rows` rows at a time: MLX's CPU copy of a whole
    transpose reads a column at a time (2.3 s for a 262144 x 640 embedding; 0.43 s in bands)."""
    if weight.shape[0] <= rows:
        return mx.contiguous(weight.T)
    bands = [weight[i : i + rows].T for i in range(0, weight.shape[0], rows)]
    return mx.concatenate(bands, axis=1)


def is_wide(weight: mx.array) -> bool:
    out_features, in_features = weight.shape
    return out_features >= 2 * in_features
