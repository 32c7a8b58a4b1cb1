"""The CPU kernels against MLX's native ops and float64 numpy."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxinfer import cpu_kernels


def test_exp_matches_float64_across_the_float32_range():
    x = np.concatenate(
        [np.linspace(-87.0, 88.0, 100_001), np.random.default_rng(0).normal(size=10_000) * 5]
    )
    x = x.astype(np.float32)
    ours = np.array(cpu_kernels.exp(mx.array(x)), dtype=np.float64)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(ours - expected) / expected) < 5e-6  # mx.exp itself: ~4e-6 here


def test_exp_of_masked_scores_is_zero():
    x = mx.array([-math.inf, -1000.0, -100.0, 0.0], mx.float32)
    assert np.array(cpu_kernels.exp(x)).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_swiglu_matches_silu_times_up():
    rng = np.random.default_rng(1)
    gate = mx.array(rng.normal(size=(2, 9, 300)).astype(np.float32) * 8)
    up = mx.array(rng.normal(size=(2, 9, 300)).astype(np.float32))
    expected = np.array(nn.silu(gate) * up)
    ours = np.array(cpu_kernels.swiglu(gate, up))
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-6
    assert np.isfinite(
        np.array(cpu_kernels.swiglu(mx.array([-1e4, 1e4]), mx.array([1.0, 1.0])))
    ).all()


@pytest.mark.parametrize(
    "heads, kv_heads, new, total",
    [
        (4, 4, 5, 5),
        (9, 3, 17, 17),
        (8, 1, 7, 30),
        (6, 2, 1, 12),
        (3, 1, 300, 300),
        (2, 2, 200, 450),
        (9, 3, 512, 2048),  # long contexts: key blocks with the online softmax
        (4, 1, 129, 1100),  # a query block that straddles LONG_CONTEXT
        (6, 2, 1, 1700),  # one decode-like query over a long context
        (3, 3, 1200, 1200),  # a whole long prompt at once
    ],
)
def test_causal_attention_matches_fast_sdpa(heads, kv_heads, new, total):
    """`new` queries at the end of `total` positions (a chunk after a cached prefix), MHA/GQA/MQA;
    more than 128 new queries go through the blocked path, more than LONG_CONTEXT keys through
    key blocks with an online softmax."""
    rng = np.random.default_rng(heads * 100 + total)
    q = mx.array(rng.normal(size=(2, heads, new, 16)).astype(np.float32))
    k = mx.array(rng.normal(size=(2, kv_heads, total, 16)).astype(np.float32))
    v = mx.array(rng.normal(size=(2, kv_heads, total, 16)).astype(np.float32))
    mask = "causal" if new > 1 else None
    expected = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask))
    ours = np.array(cpu_kernels.attention(q, k, v, 0.25, "causal"))
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-6
