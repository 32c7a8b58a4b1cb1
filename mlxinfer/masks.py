"""Attention masks: which keys each query sees (causal, sliding windows, attention sinks). The
op sets (ops.py) and the caches (cache.py, batch_cache.py) build and read them."""

from __future__ import annotations

import mlx.core as mx

Mask = (
    mx.array | str | None
)  # None: all visible; "causal"; bool [T, S] or [B, 1, T, S] (True = visible)


def window_mask(
    q_positions: mx.array,
    k_positions: mx.array,
    window: int | None = None,
    keep: int = 0,
) -> mx.array:
    """Bool `[T, S]`: key k is visible to query q iff k <= q and (q - k < window or k < keep).
    `window=None` is plain causal attention; `keep` keys at the start are always visible (sinks)."""
    q = q_positions[:, None]
    k = k_positions[None, :]
    visible = k <= q
    if window is not None:
        visible = visible & ((q - k < window) | (k < keep))
    return visible


def causal_mask(T: int, S: int, window: int | None) -> Mask:
    """The mask of T queries at positions S-T..S-1 over keys 0..S-1: None or "causal" when the
    window hides nothing (the fast kernels' own causal mode), else a bool array."""
    if window is None or S <= window:
        return "causal" if T > 1 else None
    return window_mask(mx.arange(S - T, S), mx.arange(S), window)
