"""Sliding-window attention against transformers (which applies the window in every pass): a full
forward longer than the window, chunked prefill, and cached decoding through the rotating cache
across several wrap-arounds, on every family that has per-layer or global windows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer.cache import KVCache, RotatingKVCache
from mlxinfer.generate import prefill

from .reference import GEMMA3_ROPE, make_tiny_checkpoint, rel_err, torch_logits

pytestmark = pytest.mark.exactness  # CI runs these under each op set

TOL = 1e-4
WINDOW = 8
LENGTH = 40  # five windows: the rotating caches wrap around four times

CASES = {
    "mistral": ("mistral", dict(sliding_window=WINDOW, head_dim=32)),
    # Qwen2/3: layers i >= max_window_layers slide; layer 0 keeps full attention.
    "qwen2-max-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3-all-layers": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0, head_dim=32),
    ),
    "mixtral": (
        "mixtral",
        dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    ),
    "phi3": ("phi3", dict(sliding_window=WINDOW)),
    # Qwen2-MoE: even layers below max_window_layers slide (transformers' rule).
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
    ),
    # Gemma 2: even layers slide; Gemma 3: all but every third here (sliding_window_pattern),
    # the sliding ones with their own RoPE base.
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, num_hidden_layers=3, head_dim=32)),
    "gemma3": (
        "gemma3_text",
        dict(
            sliding_window=WINDOW,
            num_hidden_layers=4,
            head_dim=32,
            sliding_window_pattern=3,
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
}


def random_ids(batch: int = 2, length: int = LENGTH, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=(batch, length))


@pytest.fixture(scope="module", params=sorted(CASES))
def windowed(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny_checkpoint(path, family, **overrides)
    model, _ = mlxinfer.load(path)
    return ref, model, path


def test_layer_windows_follow_transformers(windowed):
    ref, model, _ = windowed
    config = ref.config
    if hasattr(config, "layer_types"):
        expected = [WINDOW if t == "sliding_attention" else None for t in config.layer_types]
    else:  # Mistral, Mixtral, Phi-3, Qwen3-MoE: one window for every layer
        expected = [config.sliding_window] * config.num_hidden_layers
    assert model.config.layer_windows == expected
    assert any(w == WINDOW for w in expected)


def test_window_changes_the_reference(windowed):
    """Without this the tests below could pass with the window ignored on both sides."""
    ref, _, path = windowed
    config = type(ref.config).from_pretrained(path)
    config.sliding_window = 10 * LENGTH  # a window wider than the sequence hides nothing
    unwindowed = type(ref).from_pretrained(path, config=config).eval()
    ids = random_ids()
    late = slice(WINDOW + 1, None)  # positions whose window excludes some earlier tokens
    assert rel_err(torch_logits(unwindowed, ids)[:, late], torch_logits(ref, ids)[:, late]) > 1e-2


def test_full_forward_applies_the_window(windowed):
    ref, model, _ = windowed
    ids = random_ids()
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref, ids)) <= TOL


@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_chunked_prefill_then_decode(windowed, chunk):
    """Chunks shorter than, equal to and longer than the window, then one token at a time: the
    logits at every position match the reference."""
    ref, model, _ = windowed
    ids = random_ids()
    expected = torch_logits(ref, ids)
    cache = model.make_cache()
    for layer_cache, window in zip(cache, model.config.layer_windows, strict=True):
        assert isinstance(layer_cache, RotatingKVCache if window else KVCache)
    steps = []
    prompt = 20
    for start in range(0, prompt, chunk):
        end = min(prompt, start + chunk)
        steps.append(np.array(model(mx.array(ids[:, start:end]), cache)))
    for t in range(prompt, LENGTH):
        steps.append(np.array(model(mx.array(ids[:, t : t + 1]), cache)))
    ours = np.concatenate(steps, axis=1)
    for t in range(LENGTH):
        assert rel_err(ours[:, t], expected[:, t]) <= TOL, f"position {t}"
    for layer_cache, window in zip(cache, model.config.layer_windows, strict=True):
        if window:  # bounded: the window, never more
            assert layer_cache.size == WINDOW and layer_cache.capacity == WINDOW


def test_prefill_helper_with_long_prompt(windowed):
    ref, model, _ = windowed
    ids = random_ids()
    last = prefill(model, mx.array(ids), model.make_cache(), chunk_size=16)
    assert rel_err(np.array(last), torch_logits(ref, ids)[:, -1]) <= TOL


def test_growing_cache_also_applies_the_window(windowed):
    """A caller's own growing caches on a sliding-window model: the mask, not the cache, bounds
    what each query sees."""
    ref, model, _ = windowed
    ids = random_ids()
    expected = torch_logits(ref, ids)
    cache = [KVCache() for _ in model.model.layers]
    steps = [np.array(model(mx.array(ids[:, :17]), cache))]
    steps += [np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(17, LENGTH)]
    assert rel_err(np.concatenate(steps, axis=1), expected) <= TOL
