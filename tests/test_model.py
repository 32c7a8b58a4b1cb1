"""Logits parity with transformers on tiny random checkpoints of every family: full forward,
cached decoding one token at a time, and chunked prefill."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer.generate import prefill

from .reference import GEMMA3_ROPE, make_tiny_checkpoint, rel_err, torch_logits

pytestmark = pytest.mark.exactness  # CI runs these under each op set

TOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 10000.0,
}
YARN_ROPE = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}

CASES = {
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa-llama3-rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-mqa-bias-linear-rope": (
        "llama",
        dict(
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        ),
    ),
    "llama-yarn-rope": ("llama", dict(rope_parameters=YARN_ROPE)),
    "mistral-gqa-head-dim": ("mistral", dict(head_dim=32, sliding_window=None)),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=32)),
    "phi3-fused": ("phi3", dict(num_key_value_heads=2)),
    "phi3-partial-rotary": ("phi3", dict(num_key_value_heads=4, partial_rotary_factor=0.5)),
    # Soft-caps low enough to bend random scores and logits; a query scale not head_dim's.
    "gemma2-softcap": (
        "gemma2",
        dict(
            head_dim=32,
            num_hidden_layers=3,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
        ),
    ),
    "gemma3-local-rope": (
        "gemma3_text",
        dict(
            head_dim=32,
            num_hidden_layers=3,
            sliding_window=8,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny_checkpoint(path, family, **overrides)
    model, _ = mlxinfer.load(path)
    return ref, model, path


def random_ids(batch: int = 2, length: int = 40, vocab: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


def test_full_forward_matches_transformers(tiny):
    ref, model, _ = tiny
    ids = random_ids()
    expected = torch_logits(ref, ids)
    ours = np.array(model(mx.array(ids)))
    assert ours.shape == expected.shape
    assert rel_err(ours, expected) <= TOL


def test_cached_decode_matches_transformers(tiny):
    """Prefill 12 tokens, then feed one token at a time; every step's logits match the reference
    full forward at that position."""
    ref, model, _ = tiny
    ids = random_ids()
    expected = torch_logits(ref, ids)
    cache = model.make_cache()
    ours = [np.array(model(mx.array(ids[:, :12]), cache))]
    for t in range(12, ids.shape[1]):
        ours.append(np.array(model(mx.array(ids[:, t : t + 1]), cache)))
    ours = np.concatenate(ours, axis=1)
    for t in range(ids.shape[1]):
        assert rel_err(ours[:, t], expected[:, t]) <= TOL, f"position {t}"


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_matches_transformers(tiny, chunk):
    ref, model, _ = tiny
    ids = random_ids(length=33)
    expected = torch_logits(ref, ids)[:, -1]
    last = prefill(model, mx.array(ids), model.make_cache(), chunk_size=chunk)
    assert rel_err(np.array(last), expected) <= TOL


def test_classic_rope_spelling_gives_same_logits(tmp_path):
    """Old hub checkpoints spell RoPE as top-level rope_theta + rope_scaling{type, ...}."""
    ref = make_tiny_checkpoint(tmp_path, "llama", rope_parameters=LLAMA3_ROPE)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    config["rope_scaling"] = params
    config_file.write_text(json.dumps(config))
    model, _ = mlxinfer.load(tmp_path)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    ids = random_ids()
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref, ids)) <= TOL


def test_gemma3_classic_spelling_gives_same_logits(tmp_path):
    """Gemma 3 checkpoints on the hub spell the sliding layers' RoPE as `rope_local_base_freq`
    and their pattern as `sliding_window_pattern` (no layer_types, no per-type rope_parameters)."""
    ref = make_tiny_checkpoint(
        tmp_path,
        "gemma3_text",
        head_dim=32,
        num_hidden_layers=4,
        sliding_window=8,
        sliding_window_pattern=2,
        rope_parameters=GEMMA3_ROPE,
    )
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("layer_types") == ["sliding_attention", "full_attention"] * 2
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["full_attention"].pop("rope_theta")
    config["rope_scaling"] = params["full_attention"]
    config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    config["sliding_window_pattern"] = config.pop("_sliding_window_pattern", 2)
    config_file.write_text(json.dumps(config))
    model, _ = mlxinfer.load(tmp_path)
    assert model.config.layer_windows == [8, None, 8, None]
    assert (model.config.rope_theta, model.config.local_rope_theta) == (1e6, 1e4)
    ids = random_ids()
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref, ids)) <= TOL


def test_cache_growth_across_step_boundary(tmp_path, monkeypatch):
    """The preallocated cache grows in steps; decoding across several growths stays exact."""
    monkeypatch.setattr(mlxinfer.KVCache, "step", 8)
    ref = make_tiny_checkpoint(tmp_path, "llama")
    model, _ = mlxinfer.load(tmp_path)
    ids = random_ids(batch=1, length=30)
    expected = torch_logits(ref, ids)
    cache = model.make_cache()
    model(mx.array(ids[:, :5]), cache)
    for t in range(5, 30):
        logits = np.array(model(mx.array(ids[:, t : t + 1]), cache))
        assert rel_err(logits[:, 0], expected[:, t]) <= TOL, f"position {t}"
    assert cache[0].capacity == 32  # grown 8 at a time, not per token


def test_rope_tables_never_leak_between_models(tmp_path):
    """Two models with different RoPE settings, called in turn with the same offsets and lengths
    (the CPU path memoises one cos/sin table per forward pass), each still match transformers."""
    ids = random_ids(batch=1, length=12)
    models = []
    for name, rope in [("a", {"rope_type": "default", "rope_theta": 100.0}), ("b", YARN_ROPE)]:
        ref = make_tiny_checkpoint(tmp_path / name, "llama", rope_parameters=rope)
        models.append((ref, mlxinfer.load(tmp_path / name)[0]))
    for _ in range(2):
        for ref, model in models:
            cache = model.make_cache()
            logits = np.concatenate(
                [np.array(model(mx.array(ids[:, :6]), cache))]
                + [np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(6, 12)],
                axis=1,
            )
            assert rel_err(logits, torch_logits(ref, ids)) <= TOL


def test_config_built_directly_fills_per_layer_choices():
    """ModelConfig(...) without config.json: the global window and expert count apply per layer."""
    from mlxinfer.moe import SparseMoE

    config = mlxinfer.ModelConfig(
        model_type="mixtral",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        sliding_window=3,
    )
    model = mlxinfer.Model(config)
    assert config.layer_windows == [3, 3] and config.layer_moe == [True, True]
    assert all(isinstance(layer.mlp, SparseMoE) for layer in model.model.layers)
    assert [c.max_size for c in model.make_cache()] == [3, 3]
    with pytest.raises(mlxinfer.ModelLoadError, match="layer_moe has 1 entries for 2 layers"):
        mlxinfer.ModelConfig(**{**config.__dict__, "layer_moe": [True]})
