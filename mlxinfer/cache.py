"""KV caches. `KVCache` grows in preallocated steps so decoding writes in place instead of
concatenating a new array every token."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, `[B, kv_heads, capacity, head_dim]`, grown `step` at a time."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # tokens held; also the position of the next token

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `[B, kv_heads, T, head_dim]` keys/values; return everything held so far."""
        start = self.offset
        new = keys.shape[2]
        if self.keys is None or start + new > self.keys.shape[2]:
            self._grow(keys, values, start + new)
        self.offset += new
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, kv_heads, _, k_dim = keys.shape
        v_dim = values.shape[3]
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, kv_heads, capacity, k_dim), keys.dtype)
        new_v = mx.zeros((B, kv_heads, capacity, v_dim), values.dtype)
        if self.keys is not None and self.offset > 0:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (e.g. rejected draft tokens); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The arrays to evaluate together with the logits."""
        return () if self.keys is None else (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity, not just the filled part)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
