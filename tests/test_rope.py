"""RoPE on its own: the inverse frequencies of every type against transformers' own functions
(`ROPE_INIT_FUNCTIONS`, the models' default-RoPE functions), and the RoPE module's rotation under
both op sets against a float64 numpy rotation written here from those frequencies — half-split and
interleaved layouts, offsets, partial rotary, yarn's attention factor."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlxinfer.config import ModelConfig
from mlxinfer.ops import OPS
from mlxinfer.rope import RoPE, rope_inv_freq

from .reference import rel_err
from .test_model import LLAMA3_ROPE

BASE = dict(
    hidden_size=128,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=32,
    max_position_embeddings=256,
)

LLAMA3 = LLAMA3_ROPE  # the settings test_model checks end to end
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 1e4,
}

# name -> (rope_parameters, other config keys). head_dim 32 unless given.
CASES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, {}),
    "default-theta-500000-hd64": (
        {"rope_type": "default", "rope_theta": 500000.0},
        dict(head_dim=64),
    ),
    "linear": ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, {}),
    "llama3": (LLAMA3, dict(head_dim=64)),
    # Llama 3.1's own settings.
    "llama3.1-hd128": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        dict(head_dim=128, max_position_embeddings=131072),
    ),
    "yarn": (YARN, {}),
    "yarn-betas-no-truncate": (
        {**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
        dict(head_dim=64),
    ),
    "yarn-attention-factor": ({**YARN, "attention_factor": 1.3}, {}),
    "yarn-mscale": (
        {**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5},
        dict(max_position_embeddings=512),
    ),
    # No factor: transformers derives it from max_position_embeddings / original (DeepSeek).
    "yarn-factor-from-context": ({**YARN, "factor": None}, dict(max_position_embeddings=512)),
    "partial-default": (
        {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        {},
    ),
    "partial-linear": (
        {"rope_type": "linear", "factor": 3.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        {},
    ),
    "partial-llama3": ({**LLAMA3, "partial_rotary_factor": 0.5}, dict(head_dim=64)),
    "partial-yarn": ({**YARN, "partial_rotary_factor": 0.25}, dict(head_dim=64)),
}


def reference_inv_freq(params: dict, extra: dict) -> tuple[np.ndarray, float]:
    """transformers' inverse frequencies (float64 copy of its float32 ones) and attention factor."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    params = dict(params)
    factor_from_context = "factor" in params and params["factor"] is None
    if factor_from_context:
        # transformers' validation wants one (the value it would derive); set to None below.
        params["factor"] = (
            extra["max_position_embeddings"] / params["original_max_position_embeddings"]
        )
    config = transformers.LlamaConfig(**{**BASE, "head_dim": 32, **extra}, rope_parameters=params)
    if factor_from_context:
        config.rope_parameters["factor"] = None
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        # Llama's default ignores partial rotary; Phi-3's (same formula) honours it.
        default = (
            Phi3RotaryEmbedding if "partial_rotary_factor" in params else LlamaRotaryEmbedding
        ).compute_default_rope_parameters
        inv_freq, factor = default(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.double().numpy(), float(factor)


def our_config(params: dict, extra: dict, **fields) -> ModelConfig:
    """mlxinfer's config from the same keys, as a transformers-5 config.json spells them."""
    config = ModelConfig.from_dict(
        {"model_type": "llama", **BASE, "head_dim": 32, **extra, "rope_parameters": dict(params)}
    )
    return dataclasses.replace(config, **fields)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inv_freq_matches_transformers(case):
    params, extra = CASES[case]
    expected, expected_factor = reference_inv_freq(params, extra)
    inv_freq, factor = rope_inv_freq(our_config(params, extra))
    assert inv_freq.shape == expected.shape
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_cases_exercise_every_branch():
    """The scaled types really change the frequencies here (each case is not just the default)."""
    for case in ("linear", "llama3", "yarn", "yarn-betas-no-truncate", "partial-llama3"):
        params, extra = CASES[case]
        default = {"rope_type": "default", "rope_theta": params["rope_theta"]}
        if "partial_rotary_factor" in params:
            default["partial_rotary_factor"] = params["partial_rotary_factor"]
        scaled, _ = reference_inv_freq(params, extra)
        plain, _ = reference_inv_freq(default, extra)
        assert not np.allclose(scaled, plain, rtol=1e-3), case
    # llama3: all three bands (kept, divided by factor, interpolated) occur.
    scaled, _ = reference_inv_freq(*CASES["llama3"])
    plain, _ = reference_inv_freq({"rope_type": "default", "rope_theta": 1e4}, CASES["llama3"][1])
    ratio = plain / scaled
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()
    # yarn: the attention factor is not 1.
    assert reference_inv_freq(*CASES["yarn"])[1] > 1.0


def test_gguf_rope_freqs_replace_the_scaling():
    """GGUF llama3 models carry `rope_freqs`: per-dimension divisors of the default frequencies."""
    params, extra = CASES["llama3"]
    llama3, _ = reference_inv_freq(params, extra)
    default, _ = reference_inv_freq({"rope_type": "default", "rope_theta": 1e4}, extra)
    config = our_config(params, extra, rope_freqs=list(default / llama3))
    rope = RoPE(config)
    np.testing.assert_allclose(np.array(rope.inv_freq), llama3, rtol=1e-6)
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 5, 64)), dtype=mx.float32)
    for ops in OPS.values():
        rope.ops = ops
        expected = numpy_rope(np.array(x), llama3, 37, traditional=False)
        assert rel_err(np.array(rope(x, 37)), expected) <= 1e-5


# -- the rotation ---------------------------------------------------------------------------------


def numpy_rope(
    x: np.ndarray, inv_freq: np.ndarray, offset: int, traditional: bool, factor: float = 1.0
) -> np.ndarray:
    """float64 RoPE of `[B, heads, T, head_dim]` at positions offset..offset+T-1: the first
    2 * len(inv_freq) dims rotated (pairs (i, i + half) or (2i, 2i + 1)), scaled by `factor`; the
    rest passed through."""
    x = np.asarray(x, dtype=np.float64)
    dims = 2 * len(inv_freq)
    angles = (offset + np.arange(x.shape[2], dtype=np.float64))[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles) * factor, np.sin(angles) * factor  # [T, dims / 2]
    rot = x[..., :dims]
    if traditional:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.empty_like(rot)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
    else:
        a, b = rot[..., : dims // 2], rot[..., dims // 2 :]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return np.concatenate([out, x[..., dims:]], axis=-1)


def test_numpy_rope_is_a_rotation():
    """The reference itself: norms of each pair kept, position 0 the identity, and positions
    compose (rotating by m then by n is rotating by m + n)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, 1, 8))
    inv = np.array([1.0, 0.1, 0.01, 0.001])
    np.testing.assert_allclose(numpy_rope(x, inv, 0, False), x)
    for traditional in (False, True):
        y = numpy_rope(x, inv, 5, traditional)
        np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x))
        np.testing.assert_allclose(
            numpy_rope(numpy_rope(x, inv, 3, traditional), inv, 4, traditional),
            numpy_rope(x, inv, 7, traditional),
        )
    # Half-split pairs dim 0 with dim 4, interleaved dim 0 with dim 1.
    e0 = np.zeros((1, 1, 1, 8))
    e0[..., 0] = 1
    assert np.flatnonzero(numpy_rope(e0, inv, 1, False)[0, 0, 0]).tolist() == [0, 4]
    assert np.flatnonzero(numpy_rope(e0, inv, 1, True)[0, 0, 0]).tolist() == [0, 1]


APPLY_CASES = ["default", "linear", "llama3", "yarn", "partial-default", "partial-yarn"]


@pytest.mark.parametrize("ops", sorted(OPS))
@pytest.mark.parametrize("offset", [0, 37])
@pytest.mark.parametrize("traditional", [False, True], ids=["half-split", "interleaved"])
@pytest.mark.parametrize("case", APPLY_CASES)
def test_rope_module_matches_numpy_rotation(case, traditional, offset, ops):
    params, extra = CASES[case]
    inv_freq, factor = reference_inv_freq(params, extra)
    rope = RoPE(our_config(params, extra, rope_traditional=traditional))
    rope.ops = OPS[ops]
    head_dim = extra.get("head_dim", 32)
    rng = np.random.default_rng(offset)
    for T in (1, 9):  # a decode step and a prefill chunk
        x = rng.standard_normal((2, 3, T, head_dim)).astype(np.float32)
        out = rope(mx.array(x), offset)
        assert out.shape == x.shape and out.dtype == mx.float32
        expected = numpy_rope(x, inv_freq, offset, traditional, factor)
        assert rel_err(np.array(out), expected) <= 1e-5
        dims = 2 * len(inv_freq)
        if dims < head_dim:  # partial rotary: the rest untouched, bit for bit
            np.testing.assert_array_equal(np.array(out)[..., dims:], x[..., dims:])


@pytest.mark.parametrize("traditional", [False, True], ids=["half-split", "interleaved"])
@pytest.mark.parametrize("case", APPLY_CASES)
def test_op_sets_agree(case, traditional):
    params, extra = CASES[case]
    rope = RoPE(our_config(params, extra, rope_traditional=traditional))
    x = mx.array(
        np.random.default_rng(2).standard_normal((1, 4, 16, extra.get("head_dim", 32))),
        dtype=mx.float32,
    )
    outs = {}
    for name, ops in OPS.items():
        rope.ops = ops
        outs[name] = np.array(rope(x, 100))
    assert rel_err(outs["cpu"], outs["mlx"]) <= 1e-5


def test_offset_is_position_of_first_token():
    """Rotating a chunk at offset n equals the tail of rotating the whole sequence (cached
    prefill depends on it), under both op sets."""
    params, extra = CASES["llama3"]
    rope = RoPE(our_config(params, extra))
    x = mx.array(np.random.default_rng(3).standard_normal((1, 2, 20, 64)), dtype=mx.float32)
    for ops in OPS.values():
        rope.ops = ops
        whole = np.array(rope(x, 0))
        tail = np.array(rope(x[:, :, 12:], 12))
        assert rel_err(tail, whole[:, :, 12:]) <= 1e-6
