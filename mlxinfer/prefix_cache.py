"""Prefix cache: the KV of prompts seen before, so a shared prefix (a system prompt, the earlier
turns of a chat) is not computed again.

After a prompt is prefilled, its single-sequence caches are stored under its token ids; when a
request finishes, its prompt and reply are stored the same way (the next turn of a chat). A new
prompt takes the longest common prefix with any stored prompt (at least `MIN_MATCH` tokens, and
never its last token: that one's logits are needed), starts from those keys and values and
prefills only the rest. Entries are bounded by bytes; the least recently used go first.

Keys at a position depend only on the tokens up to it, so a reused prefix is the same as a cold
prefill of it up to float rounding of the different matrix shapes. For 8- and 4-bit caches that
rounding can carry a value across a quantization step, so a hit differs from a cold prefill by up to
a quantization error (0.086 in the logits at 8 bits on the default model): as close to the
unquantized answer as a cold prefill, not bit-identical. Caches that have evicted tokens (a
rotating cache past its size) are not stored: their prefix is gone.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
import numpy as np

from .cache import KVCache, RotatingKVCache

MIN_MATCH = 16  # shorter matches are not worth a copy of the cache


class PrefixCache:
    """At most `max_bytes` of entries: their arrays' bytes, or with `bytes_per_token` that many
    per token (a model split over ranks counts the whole model's bytes, so that every rank keeps
    and evicts the same entries)."""

    def __init__(self, max_bytes: int, bytes_per_token: int | None = None):
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.max_tokens: int | None = None  # over ranks: the whole model's smallest ring
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def lookup(self, prompt_ids: list[int]) -> tuple[int, tuple | None]:
        """(matched tokens, entry key) of the longest stored prefix of `prompt_ids`."""
        ids = np.asarray(prompt_ids)
        best, best_key = 0, None
        for key, (tokens, _, _) in self.entries.items():
            n = min(len(tokens), len(ids) - 1)
            if n <= best:
                continue
            differ = np.flatnonzero(tokens[:n] != ids[:n])
            match = int(differ[0]) if differ.size else n
            if match > best:
                best, best_key = match, key
        if best < MIN_MATCH or best_key is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self.entries.move_to_end(best_key)
        return best, best_key

    def restore(self, key: tuple, n: int, caches: list) -> None:
        """Fill fresh single-sequence `caches` with the first `n` tokens of entry `key`."""
        _, stored, _ = self.entries[key]
        for cache, (keys, values) in zip(caches, stored, strict=True):
            cache.fill(_first(keys, n), _first(values, n), n)

    def store(self, prompt_ids: list[int], caches: list) -> None:
        """Keep the KV of a just-prefilled prompt (unless a cache evicted some of it)."""
        if not self.max_bytes or not all(_holds_all(c) for c in caches):
            return
        if self.max_tokens is not None and len(prompt_ids) > self.max_tokens:
            return  # (a stage's own caches may all hold it; another stage's ring has wrapped)
        key = tuple(prompt_ids)
        covering = [k for k in self.entries if len(k) >= len(key) and k[: len(key)] == key]
        if covering:  # a stored sequence already starts with all of it: keep that one fresh
            self.entries.move_to_end(covering[0])
            return
        n = len(prompt_ids)
        stored = []
        for c in caches:
            keys = tuple(mx.contiguous(a[..., :n, :]) for a in c.keys)
            values = tuple(mx.contiguous(a[..., :n, :]) for a in c.values)
            stored.append((keys, values))
        nbytes = sum(a.nbytes for kv in stored for part in kv for a in part)
        if self.bytes_per_token is not None:
            nbytes = n * self.bytes_per_token
        if nbytes > self.max_bytes:
            return
        # A stored prompt that this one extends is redundant: this one answers its lookups too.
        for old in [k for k in self.entries if len(k) < n and key[: len(k)] == k]:
            self._drop(old)
        while self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        mx.eval([a for kv in stored for part in kv for a in part])
        self.entries[key] = (np.asarray(prompt_ids), stored, nbytes)
        self.nbytes += nbytes

    def _drop(self, key: tuple) -> None:
        self.nbytes -= self.entries.pop(key)[2]

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def _first(stored: tuple, n: int) -> tuple:
    return tuple(a[..., :n, :] for a in stored)


def _holds_all(cache) -> bool:
    if cache.keys is None:
        return False
    if isinstance(cache, RotatingKVCache):
        return cache.size == cache.offset  # nothing evicted: positions 0..size-1 in order
    return isinstance(cache, KVCache)
