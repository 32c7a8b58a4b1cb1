"""The Attention module on its own, under both op sets, against float64 numpy attention written here
from the module's own weights: projections (biases, fused qkv), q/k RMSNorm, RoPE (the numpy rotation
of test_rope), GQA by repeating KV heads, causal and sliding-window masks, softmax, o_proj. MHA, GQA
and MQA; a full prefill without a cache, prefill then chunks and decode steps through a growing
cache, sliding windows shorter than the sequence (growing and rotating caches). Also the mask
helpers: `ops.masked` and `window_mask`."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxinfer.attention import Attention
from mlxinfer.cache import KVCache, RotatingKVCache
from mlxinfer.config import ModelConfig
from mlxinfer.masks import causal_mask, window_mask
from mlxinfer.ops import OPS, masked
from mlxinfer.rope import RoPE

from .reference import rel_err
from .test_rope import numpy_rope

TOL = 1e-5
HIDDEN = 48
BATCH = 2

# name -> ModelConfig fields (heads, KV heads, family options, RoPE settings)
CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa-qkv-bias": dict(num_attention_heads=4, num_key_value_heads=2, qkv_bias=True),  # Qwen2
    "mqa-all-bias-linear-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        qkv_bias=True,
        o_bias=True,
        rope_theta=500.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    # Qwen3: q/k RMSNorm, head_dim * heads != hidden_size.
    "gqa-qk-norm-head-dim-32": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, qk_norm=True
    ),
    # Phi-3: fused qkv_proj, half the head rotated.
    "mha-fused-partial-rotary": dict(
        num_attention_heads=4, num_key_value_heads=4, fused_qkv=True, partial_rotary_factor=0.5
    ),
    "gqa-interleaved-rope": dict(
        num_attention_heads=4, num_key_value_heads=2, rope_traditional=True, rope_theta=100.0
    ),
}


def make_config(case: str) -> ModelConfig:
    fields = {"head_dim": 16, **CASES[case]}
    return ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        **fields,
    )


def make_attention(case: str, ops: str, window: int | None = None, seed: int = 0) -> Attention:
    config = make_config(case)
    mx.random.seed(seed)
    attn = Attention(config, RoPE(config), window=window)
    if config.qk_norm:  # RMSNorm weights start at ones, which would hide a missing norm weight
        rng = np.random.default_rng(seed)
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight = mx.array(1.0 + 0.2 * rng.standard_normal(norm.weight.shape), mx.float32)
    set_ops(attn, ops)
    return attn


def set_ops(attn: Attention, ops: str) -> None:
    attn.ops = OPS[ops]
    attn.rope.ops = OPS[ops]


def random_x(T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 100).standard_normal((BATCH, T, HIDDEN)).astype(np.float32)


# -- the float64 reference ------------------------------------------------------------------------


def _linear(layer, x: np.ndarray) -> np.ndarray:
    out = x @ np.array(layer.weight, dtype=np.float64).T
    if "bias" in layer:
        out = out + np.array(layer.bias, dtype=np.float64)
    return out


def _rms_norm(x: np.ndarray, norm) -> np.ndarray:
    weight = np.array(norm.weight, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + norm.eps) * weight


def reference_inv_freq(config: ModelConfig) -> np.ndarray:
    """Default (and linear) RoPE frequencies, from the formula."""
    dims = int(config.head_dim * config.partial_rotary_factor)
    inv_freq = config.rope_theta ** -(np.arange(0, dims, 2, dtype=np.float64) / dims)
    if config.rope_scaling is not None:
        assert config.rope_scaling["rope_type"] == "linear"
        inv_freq = inv_freq / config.rope_scaling["factor"]
    return inv_freq


def reference_attention(attn: Attention, config: ModelConfig, x: np.ndarray, window=None):
    """float64 attention of the tokens `x` `[B, T, D]` at positions 0..T-1, each query seeing keys
    k <= q (and q - k < window)."""
    x = np.asarray(x, dtype=np.float64)
    B, T, _ = x.shape
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if config.fused_qkv:
        q, k, v = np.split(_linear(attn.qkv_proj, x), [H * hd, (H + KV) * hd], axis=-1)
    else:
        q, k, v = _linear(attn.q_proj, x), _linear(attn.k_proj, x), _linear(attn.v_proj, x)
    q = q.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
    k = k.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    v = v.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    if config.qk_norm:
        q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
    inv_freq = reference_inv_freq(config)
    q = numpy_rope(q, inv_freq, 0, config.rope_traditional)
    k = numpy_rope(k, inv_freq, 0, config.rope_traditional)
    k = np.repeat(k, H // KV, axis=1)  # query head h reads KV head h // (H / KV)
    v = np.repeat(v, H // KV, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # [B, H, T, T]
    pos = np.arange(T)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[:, None] - pos[None, :] < window
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    return _linear(attn.o_proj, out)


def assert_positions_match(ours: np.ndarray, expected: np.ndarray, start: int = 0) -> None:
    """Every position of `ours` (positions start.. of the sequence) within TOL of the reference."""
    assert ours.shape == expected[:, start : start + ours.shape[1]].shape
    for t in range(ours.shape[1]):
        err = rel_err(ours[:, t], expected[:, start + t])
        assert err <= TOL, f"position {start + t}: relative error {err:.2e}"


OPS_NAMES = sorted(OPS)

# -- full prefill, no cache ----------------------------------------------------------------------


@pytest.mark.parametrize("ops", OPS_NAMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_without_cache(case, ops):
    attn = make_attention(case, ops)
    x = random_x(13)
    expected = reference_attention(attn, make_config(case), x)
    out = np.array(attn(mx.array(x)))
    assert_positions_match(out, expected)


def test_reference_is_sensitive_to_what_it_checks():
    """The reference changes when heads are grouped differently, RoPE is dropped or the mask is
    removed, by far more than TOL: a test comparing against it can fail."""
    attn = make_attention("gqa", "mlx")
    config = make_config("gqa")
    x = random_x(13)
    expected = reference_attention(attn, config, x)
    assert rel_err(reference_attention(attn, config, x, window=4), expected) > 100 * TOL
    no_rope = ModelConfig(**{**config.__dict__, "partial_rotary_factor": 0.0})
    assert rel_err(reference_attention(attn, no_rope, x), expected) > 100 * TOL
    ours = np.array(attn(mx.array(x)))
    assert rel_err(ours, expected) <= TOL
    # The module itself is not MHA in disguise: tiling the KV heads the other way changes it.
    attn_swapped = make_attention("gqa", "mlx")
    k = attn_swapped.k_proj.weight.reshape(2, 16, HIDDEN)
    attn_swapped.k_proj.weight = k[::-1].reshape(32, HIDDEN)
    assert rel_err(np.array(attn_swapped(mx.array(x))), expected) > 100 * TOL


# -- cached: prefill, a chunk, then decode steps --------------------------------------------------


@pytest.mark.parametrize("ops", OPS_NAMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_decode_with_cache(case, ops):
    """Prefill 6 tokens, a chunk of 3, then one token at a time to 16: each output equals the
    reference full-sequence attention at its positions."""
    attn = make_attention(case, ops)
    x = random_x(16, seed=1)
    expected = reference_attention(attn, make_config(case), x)
    cache = KVCache()
    steps = [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, 16)]
    for start, end in steps:
        assert cache.offset == start
        out = np.array(attn(mx.array(x[:, start:end]), cache))
        assert_positions_match(out, expected, start)
    assert cache.offset == 16


# -- sliding windows -----------------------------------------------------------------------------

WINDOW = 5
WINDOW_CASES = ["gqa", "mqa", "gqa-qk-norm-head-dim-32", "mha-fused-partial-rotary"]


@pytest.mark.parametrize("ops", OPS_NAMES)
@pytest.mark.parametrize("case", WINDOW_CASES)
@pytest.mark.parametrize("T", [4, 5, 17], ids=["shorter", "equal", "longer"])
def test_window_without_cache(case, ops, T):
    attn = make_attention(case, ops, window=WINDOW)
    x = random_x(T, seed=2)
    expected = reference_attention(attn, make_config(case), x, window=WINDOW)
    assert_positions_match(np.array(attn(mx.array(x))), expected)


@pytest.mark.parametrize("ops", OPS_NAMES)
@pytest.mark.parametrize("case", WINDOW_CASES)
@pytest.mark.parametrize("cache_kind", ["growing", "rotating"])
def test_window_with_cache(case, ops, cache_kind):
    """Prefill 7 tokens (longer than the window), a chunk of 3, then decode to 22: the rotating
    cache of the window (what sliding layers use) wraps around three times; the growing cache
    keeps everything and the mask alone applies the window."""
    attn = make_attention(case, ops, window=WINDOW)
    x = random_x(22, seed=3)
    expected = reference_attention(attn, make_config(case), x, window=WINDOW)
    cache = KVCache() if cache_kind == "growing" else RotatingKVCache(WINDOW, 0)
    steps = [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 22)]
    for start, end in steps:
        out = np.array(attn(mx.array(x[:, start:end]), cache))
        assert_positions_match(out, expected, start)
    if cache_kind == "rotating":
        assert cache.size == WINDOW


@pytest.mark.parametrize("ops", OPS_NAMES)
def test_layers_sharing_masks(ops):
    """Layers of one pass share a `masks` dict; a windowed layer and a full layer (different
    masks, same cache state) each still get their own."""
    full = make_attention("gqa", ops, seed=0)
    windowed = make_attention("gqa", ops, window=4, seed=1)
    config = make_config("gqa")
    x = random_x(12, seed=4)
    expected_full = reference_attention(full, config, x)
    expected_windowed = reference_attention(windowed, config, x, window=4)
    caches = (KVCache(), KVCache())
    for start, end in [(0, 9), (9, 10), (10, 12)]:
        masks = {}
        for attn, cache, expected in [
            (full, caches[0], expected_full),
            (windowed, caches[1], expected_windowed),
        ]:
            out = np.array(attn(mx.array(x[:, start:end]), cache, masks))
            assert_positions_match(out, expected, start)
    masks = {}
    assert_positions_match(np.array(windowed(mx.array(x), None, masks)), expected_windowed)
    assert_positions_match(np.array(full(mx.array(x), None, masks)), expected_full)


@pytest.mark.parametrize("case", ["gqa", "mha-fused-partial-rotary"])
def test_op_sets_agree(case):
    x = mx.array(random_x(20, seed=5))
    outs = []
    for ops in OPS_NAMES:
        attn = make_attention(case, ops, window=6)
        outs.append(np.array(attn(x)))
    assert rel_err(outs[0], outs[1]) <= 2 * TOL


# -- mask helpers --------------------------------------------------------------------------------


def numpy_window_mask(q, k, window=None, keep=0):
    q, k = np.asarray(q)[:, None], np.asarray(k)[None, :]
    visible = k <= q
    if window is not None:
        visible &= (q - k < window) | (k < keep)
    return visible


@pytest.mark.parametrize("window, keep", [(None, 0), (1, 0), (3, 0), (3, 2), (50, 0)], ids=str)
def test_window_mask_semantics(window, keep):
    rng = np.random.default_rng(6)
    q_positions = np.arange(20, 26)
    k_positions = rng.permutation(26)  # a rotating cache returns keys out of order
    ours = np.array(window_mask(mx.array(q_positions), mx.array(k_positions), window, keep))
    np.testing.assert_array_equal(ours, numpy_window_mask(q_positions, k_positions, window, keep))
    # By hand: query 25 with window 3 and 2 sinks sees keys 0, 1, 23, 24, 25.
    if (window, keep) == (3, 2):
        assert sorted(k_positions[ours[-1]].tolist()) == [0, 1, 23, 24, 25]


def test_causal_mask_forms():
    """None for one query with nothing hidden, "causal" when the window hides nothing, else a
    bool array that applies the window."""
    assert causal_mask(1, 9, None) is None
    assert causal_mask(1, 5, 5) is None
    assert causal_mask(4, 9, None) == "causal"
    assert causal_mask(4, 5, 5) == "causal"
    mask = causal_mask(3, 9, 4)
    np.testing.assert_array_equal(np.array(mask), numpy_window_mask(range(6, 9), range(9), 4))
    np.testing.assert_array_equal(  # one query beyond the window: an array, not None
        np.array(causal_mask(1, 9, 4)), numpy_window_mask([8], range(9), 4)
    )


def test_masked_semantics():
    rng = np.random.default_rng(7)
    scores = rng.standard_normal((2, 3, 4, 9)).astype(np.float32)  # [B, H, T=4, S=9]
    s = mx.array(scores)
    np.testing.assert_array_equal(np.array(masked(s, None)), scores)
    causal = np.array(masked(s, "causal"))  # the 4 queries are positions 5..8
    expected = np.where(numpy_window_mask(range(5, 9), range(9)), scores, -np.inf)
    np.testing.assert_array_equal(causal, expected)
    bool_mask = rng.random((4, 9)) < 0.5
    bool_mask[:, 0] = True
    out = np.array(masked(s, mx.array(bool_mask)))
    np.testing.assert_array_equal(out, np.where(bool_mask, scores, -np.inf))
    assert np.array(masked(s.astype(mx.float16), "causal")).dtype == np.float16
