"""A plain Q4_K and Q6_K quantizer for the tests, which need K-quant files of a real model: the
`gguf` package dequantizes K-quants but cannot make them, and no package here ships llama.cpp's
quantizer. Each sub-block's scale (and Q4_K's min) comes from its range, without llama.cpp's
search for the best ones: valid blocks, a little less accurate than llama.cpp's. Checked by the
`gguf` package's own dequantizer (tests/test_gguf_quants.py)."""

from __future__ import annotations

import numpy as np


def quantize_q4_k(weights: np.ndarray) -> np.ndarray:
    """Rows of `weights` (a multiple of 256 wide) as Q4_K blocks, `[rows, columns / 256 * 144]`
    uint8: per sub-block of 32, w ~ d * sc * q - dmin * m with q in 0..15, sc and m in 0..63."""
    rows, columns = weights.shape
    w = weights.astype(np.float32).reshape(-1, 8, 32)  # [blocks, sub-blocks, 32]
    low = np.minimum(w.min(axis=-1), 0)  # llama.cpp's mins are never above 0
    scale = (w.max(axis=-1) - low) / 15  # [blocks, 8]
    offset = -low
    d = scale.max(axis=-1, keepdims=True) / 63
    dmin = offset.max(axis=-1, keepdims=True) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = _round_clip(scale / _nonzero(d16), 63)
    m = _round_clip(offset / _nonzero(dmin16), 63)
    step = (d16.astype(np.float32) * sc)[..., None]
    bias = (dmin16.astype(np.float32) * m)[..., None]
    q = _round_clip((w + bias) / _nonzero(step), 15)  # [blocks, 8, 32]
    packed = np.empty((len(w), 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    chunks = q.reshape(-1, 4, 2, 32)  # 64 weights a chunk: 32 low nibbles, then 32 high
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [d16.view(np.uint8), dmin16.view(np.uint8), packed, qs.astype(np.uint8)], axis=1
    )
    return blocks.reshape(rows, columns // 256 * 144)


def quantize_q6_k(weights: np.ndarray) -> np.ndarray:
    """Rows of `weights` (a multiple of 256 wide) as Q6_K blocks, `[rows, columns / 256 * 210]`
    uint8: per sub-block of 16, w ~ d * sc * (q - 32) with q in 0..63 and sc an int8."""
    rows, columns = weights.shape
    w = weights.astype(np.float32).reshape(-1, 16, 16)
    amax = np.abs(w).max(axis=-1)  # [blocks, 16]
    d = (amax.max(axis=-1, keepdims=True) / 31 / 127).astype(np.float16)
    sc = np.clip(np.rint(amax / 31 / _nonzero(d)), 0, 127).astype(np.int8)
    step = (d.astype(np.float32) * sc)[..., None]
    q = (np.clip(np.rint(w / _nonzero(step)), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # [blocks, half, group of 32, l]
    ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)  # [blocks, half, 2, 32]
    qh = (q >> 4).astype(np.uint8)  # [blocks, half, 4, 32]: the top 2 bits of each weight
    qh = qh[:, :, 0] | (qh[:, :, 1] << 2) | (qh[:, :, 2] << 4) | (qh[:, :, 3] << 6)
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1
    )
    return blocks.reshape(rows, columns // 256 * 210)


def _round_clip(values: np.ndarray, top: int) -> np.ndarray:
    return np.clip(np.rint(values), 0, top).astype(np.uint8)


def _nonzero(values: np.ndarray) -> np.ndarray:
    """Divisors: a zero scale (an all-zero sub-block) divides by 1 instead (its q are then 0)."""
    values = values.astype(np.float32)
    return np.where(values == 0, 1, values)
