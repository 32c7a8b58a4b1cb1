"""KV caches: one per attention layer, holding the keys and values of the tokens seen so far.

- `KVCache` grows in preallocated steps, so decoding writes in place instead of concatenating.
- `RotatingKVCache(max_size, keep)` is a fixed-size ring buffer: the first `keep` tokens stay
  forever (attention sinks), the most recent `max_size - keep` after them. Sliding-window layers
  use it with keep=0 and max_size = the window; `max_kv_size` bounds any model's memory with it.
- Either one stores keys and values quantized (`bits=8` or `4`, groups of `group_size` along the
  head dim) when asked; attention then reads them with quantized matmuls.

Every cache answers `make_mask(T, window)` for the T queries it has just added: which of the keys
it returned each query may see (causal, inside the layer's sliding window, and for a rotating cache
inside its own sinks + recent window). Positions are absolute: a key keeps the RoPE rotation of the
position it was written at, so a rotating cache needs no re-rotation.

Quantized storage is a tuple (packed uint32, scales, biases); unquantized storage is a 1-tuple.
All of them share the sequence axis 2, so the bookkeeping below never needs to tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .masks import Mask, causal_mask, window_mask

Stored = tuple[mx.array, ...]

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # those mx.quantize supports


def check_quantization(bits: int | None, group_size: int) -> None:
    if bits is not None and bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS} or None, got {bits!r}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {group_size!r}")


class StoredKV:
    """Keys and values as stored, plain or quantized, and their sizes: what the single-sequence
    caches here and the batch cache (batch_cache.py) share. Subclasses keep `keys`/`values` as
    tuples of arrays `[B, H, S, ...]` and say how many slots hold tokens (`held_nbytes`)."""

    def __init__(self, bits: int | None = None, group_size: int = 64):
        check_quantization(bits, group_size)
        self.bits = bits
        self.group_size = group_size
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.offset = 0  # tokens seen; also the position of the next token

    def _encode(self, x: mx.array) -> Stored:
        if self.bits is None:
            return (x,)
        if x.shape[-1] % self.group_size:
            raise ValueError(
                f"kv_group_size {self.group_size} does not divide head_dim {x.shape[-1]}"
            )
        return tuple(mx.quantize(x, self.group_size, self.bits))

    def _fetch(self, stored: Stored, end: int) -> mx.array | Stored:
        parts = tuple(a[..., :end, :] for a in stored)
        return parts[0] if self.bits is None else parts

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate together with the logits."""
        return [] if self.keys is None else [*self.keys, *self.values]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity, not just the filled part)."""
        return sum(a.nbytes for a in self.state)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    @property
    def held_nbytes(self) -> int:
        """Bytes of the slots that hold tokens (not the capacity around them)."""
        raise NotImplementedError


class _SingleSequence(StoredKV):
    """What KVCache and RotatingKVCache share: one sequence, `tokens_held` of its slots in use."""

    tokens_held: int

    @property
    def held_nbytes(self) -> int:
        if not self.capacity:
            return 0
        return self.nbytes * min(self.tokens_held, self.capacity) // self.capacity


def _empty_like(stored: Stored, capacity: int) -> Stored:
    return tuple(mx.zeros((*a.shape[:2], capacity, a.shape[3]), a.dtype) for a in stored)


def _write(stored: Stored, start: int, new: Stored) -> None:
    for dst, src in zip(stored, new, strict=True):
        dst[..., start : start + src.shape[2], :] = src


def _concat(parts: list[Stored]) -> Stored:
    return tuple(mx.concatenate(arrays, axis=2) for arrays in zip(*parts, strict=True))


def _slice(stored: Stored, start: int, end: int | None = None) -> Stored:
    return tuple(a[..., start:end, :] for a in stored)


class KVCache(_SingleSequence):
    """Keys and values `[B, kv_heads, capacity, head_dim]`, grown `step` tokens at a time."""

    step = 256

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append `[B, kv_heads, T, head_dim]` keys/values; return everything held so far (arrays,
        or (packed, scales, biases) tuples when quantized)."""
        k, v = self._encode(keys), self._encode(values)
        start, new = self.offset, keys.shape[2]
        if self.keys is None or start + new > self.capacity:
            self._grow(k, v, start + new)
        _write(self.keys, start, k)
        _write(self.values, start, v)
        self.offset += new
        return self._fetch(self.keys, self.offset), self._fetch(self.values, self.offset)

    def _grow(self, k: Stored, v: Stored, needed: int) -> None:
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k, new_v = _empty_like(k, capacity), _empty_like(v, capacity)
        if self.keys is not None and self.offset > 0:
            _write(new_k, 0, _slice(self.keys, 0, self.offset))
            _write(new_v, 0, _slice(self.values, 0, self.offset))
        self.keys, self.values = new_k, new_v

    def mask_key(self, T: int, window: int | None) -> tuple:
        """Everything make_mask depends on: layers whose caches agree share one mask per pass."""
        return ("growing", self.offset, T, window)

    def make_mask(self, T: int, window: int | None = None) -> Mask:
        """The mask for the T queries just added, over all `offset` keys."""
        return causal_mask(T, self.offset, window)

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def tokens_held(self) -> int:
        return self.offset

    def fill(self, keys: Stored, values: Stored, n: int) -> None:
        """Hold exactly positions 0..n-1, given in order as `[1, kv_heads, n, ...]` (views are
        fine: the first update grows into a buffer of its own)."""
        self.keys, self.values, self.offset = keys, values, n


class RotatingKVCache(_SingleSequence):
    """At most `max_size` tokens: the first `keep` ever seen (attention sinks) and the most recent
    `max_size - keep`. Query q sees key k iff k <= q and (k < keep or q - k < max_size - keep).

    Layout: slots [0, keep) hold the sinks; once full, slots [keep, max_size) are a ring whose
    oldest entry is at `_idx`, the next slot to overwrite. One-token updates write in place;
    a multi-token update (prefill chunk) returns the held keys in temporal order followed by the
    new ones, with a mask, and stores back only what the window keeps, in temporal order.
    Memory is `max_size` tokens once full (plus a chunk's worth transiently during prefill)."""

    step = 256

    def __init__(self, max_size: int, keep: int = 0, bits: int | None = None, group_size: int = 64):
        super().__init__(bits, group_size)
        if not 0 <= keep < max_size:
            raise ValueError(
                f"max_kv_size must be larger than the {keep} kept sink tokens, got {max_size}"
            )
        self.max_size = max_size
        self.keep = keep
        self.size = 0  # tokens held
        self._idx = 0  # next slot to write
        self._fetched_positions: mx.array | None = None  # of the keys last returned, if unordered

    @property
    def tokens_held(self) -> int:
        return self.size

    def fill(self, keys: Stored, values: Stored, n: int) -> None:
        """Hold exactly positions 0..n-1 (n <= max_size: nothing evicted), given in order."""
        if n > self.max_size:
            raise ValueError(f"a rotating cache of {self.max_size} cannot hold {n} tokens in order")
        self.keys, self.values, self.offset, self.size = keys, values, n, n
        self._idx = n if n < self.max_size else self.keep  # the ring's oldest slot, once full
        self._fetched_positions = None

    @property
    def recent(self) -> int:
        """How many of the latest tokens are held after the sinks."""
        return self.max_size - self.keep

    def _n_sinks(self) -> int:
        return min(self.keep, self.size)

    def positions(self) -> mx.array:
        """Absolute position of the token in each held slot (slot order), `[size]`."""
        n_sinks = self._n_sinks()
        n_recent = self.size - n_sinks
        sinks = mx.arange(n_sinks)
        if self.size < self.max_size or self._idx == self.keep:
            recent = mx.arange(self.offset - n_recent, self.offset)
        else:  # the ring: slot keep + j holds the token (j - oldest) mod R after the oldest
            j = mx.arange(n_recent)
            oldest = self._idx - self.keep
            recent = self.offset - n_recent + (j - oldest) % n_recent
        return mx.concatenate([sinks, recent])

    def _temporal(self, stored: Stored) -> Stored:
        """The held tokens in temporal order (sinks first, then oldest to newest)."""
        if self.size < self.max_size or self._idx == self.keep:
            return _slice(stored, 0, self.size)
        return _concat(
            [
                _slice(stored, 0, self.keep),
                _slice(stored, self._idx, self.size),
                _slice(stored, self.keep, self._idx),
            ]
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        k, v = self._encode(keys), self._encode(values)
        if keys.shape[2] == 1:
            return self._update_one(k, v)
        return self._update_many(k, v, keys.shape[2])

    def _update_one(self, k: Stored, v: Stored):
        if self.size < self.max_size:
            if self.keys is None or self.size == self.capacity:
                self._grow(k, v)
            slot = self.size
            self.size += 1
            self._idx = self.size if self.size < self.max_size else self.keep
        else:
            slot = self._idx
            self._idx = slot + 1 if slot + 1 < self.max_size else self.keep
        _write(self.keys, slot, k)
        _write(self.values, slot, v)
        self.offset += 1
        self._fetched_positions = None  # every held key is visible to the new token
        return self._fetch(self.keys, self.size), self._fetch(self.values, self.size)

    def _grow(self, k: Stored, v: Stored) -> None:
        capacity = min(self.max_size, self.capacity + self.step)
        new_k, new_v = _empty_like(k, capacity), _empty_like(v, capacity)
        if self.size:
            _write(new_k, 0, _slice(self.keys, 0, self.size))
            _write(new_v, 0, _slice(self.values, 0, self.size))
        self.keys, self.values = new_k, new_v

    def _update_many(self, k: Stored, v: Stored, T: int):
        n_sinks = self._n_sinks()
        held_positions = mx.concatenate(  # in temporal order, as _temporal returns them
            [mx.arange(n_sinks), mx.arange(self.offset - (self.size - n_sinks), self.offset)]
        )
        self._fetched_positions = mx.concatenate(
            [held_positions, mx.arange(self.offset, self.offset + T)]
        )
        held_k = self._temporal(self.keys) if self.size else None
        held_v = self._temporal(self.values) if self.size else None
        fetched_k = _concat([held_k, k]) if self.size else k
        fetched_v = _concat([held_v, v]) if self.size else v
        # What stays: the sinks and the latest `recent` tokens, sliced from the pieces rather than
        # from the fetched arrays, so those are freed as soon as attention has read them.
        total = self.size + T
        if total > self.max_size:
            self.keys = self._keep_window(held_k, k, total)
            self.values = self._keep_window(held_v, v, total)
            self.size = self.max_size
        else:
            self.keys, self.values = fetched_k, fetched_v
            self.size = total
        self.offset += T
        self._idx = self.size if self.size < self.max_size else self.keep
        # Store before attending: the old buffers are then freed layer by layer during the pass,
        # instead of all at its end.
        fetched = mx.depends([*fetched_k, *fetched_v], [*self.keys, *self.values])
        fetched_k, fetched_v = tuple(fetched[: len(k)]), tuple(fetched[len(k) :])
        return self._fetch(fetched_k, total), self._fetch(fetched_v, total)

    def _keep_window(self, held: Stored | None, new: Stored, total: int) -> Stored:
        """Sinks + the last `recent` of held ++ new, in temporal order."""
        T = new[0].shape[2]
        held_size = total - T
        n_sinks = min(self.keep, total)
        parts = []
        if n_sinks:  # the first tokens ever: from the held ones, then the new ones
            from_held = min(n_sinks, held_size)
            if from_held:
                parts.append(_slice(held, 0, from_held))
            if n_sinks > from_held:
                parts.append(_slice(new, 0, n_sinks - from_held))
        if T < self.recent:
            parts.append(_slice(held, held_size - (self.recent - T)))
            parts.append(new)
        else:
            parts.append(_slice(new, T - self.recent))
        return _concat(parts)

    def mask_key(self, T: int, window: int | None) -> tuple:
        fetched = None if self._fetched_positions is None else self._fetched_positions.shape[0]
        state = (self.max_size, self.keep, self.offset, self.size, self._idx, fetched)
        return ("rotating", *state, T, window)

    def make_mask(self, T: int, window: int | None = None) -> Mask:
        """The mask for the T queries just added over the keys just returned. A single token sees
        every held key (the ring holds exactly its sinks + window) unless the layer's own window
        is narrower than the ring."""
        if T == 1 and self._fetched_positions is None:
            if window is None or (window >= self.recent and self.keep == 0):
                return None
            k_positions = self.positions()
        else:
            k_positions = self._fetched_positions
            complete = k_positions.shape[0] == self.offset  # positions 0..offset-1, in order
            if complete and self.offset <= self.max_size:  # nothing evicted yet
                return causal_mask(T, self.offset, window)
        q_positions = mx.arange(self.offset - T, self.offset)
        mask = window_mask(q_positions, k_positions, self.recent, self.keep)
        if window is not None:
            mask = mask & window_mask(q_positions, k_positions, window)
        return mask

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens. Tokens the ring already evicted to make room for them do
        not come back: afterwards the cache holds fewer than `recent` recent tokens until it
        refills (exact for the tokens it holds; mlx-lm refuses to trim a full rotating cache)."""
        n = min(self.offset, n)
        if n == 0:
            return 0
        n_sinks = self._n_sinks()
        n_recent = self.size - n_sinks
        new_offset = self.offset - n
        kept_recent = max(0, n_recent - n)
        kept_sinks = min(n_sinks, new_offset)
        ordered_k, ordered_v = self._temporal(self.keys), self._temporal(self.values)
        self.keys = _concat(
            [_slice(ordered_k, 0, kept_sinks), _slice(ordered_k, n_sinks, n_sinks + kept_recent)]
        )
        self.values = _concat(
            [_slice(ordered_v, 0, kept_sinks), _slice(ordered_v, n_sinks, n_sinks + kept_recent)]
        )
        self.size = kept_sinks + kept_recent
        self.offset = new_offset
        self._idx = self.size if self.size < self.max_size else self.keep
        self._fetched_positions = None
        return n


@dataclass(frozen=True)
class CacheSpec:
    """Which KV cache a request gets, checked once when made: growing (`max_kv_size` None) or
    rotating, bounded to `max_kv_size` tokens per layer of which the first `kv_keep` stay (attention
    sinks); `kv_bits` (8 or 4) stores keys and values quantized in groups of `kv_group_size`.
    Sliding-window layers always get a ring of their window. Passed whole from the CLI, the bench
    grid and the dashboard to stream_generate, batch_generate and the Engine (`cache=`)."""

    max_kv_size: int | None = None
    kv_keep: int = 4
    kv_bits: int | None = None
    kv_group_size: int = 64

    def __post_init__(self) -> None:
        size, keep = self.max_kv_size, self.kv_keep
        if size is not None and (not _integer(size) or size < 1):
            raise ValueError(f"max_kv_size must be a positive integer or None, got {size!r}")
        if not _integer(keep) or keep < 0:
            raise ValueError(f"kv_keep must be an integer >= 0, got {keep!r}")
        if size is not None and not keep < size:
            raise ValueError(
                f"max_kv_size ({size}) must be larger than kv_keep ({keep}), the sink tokens it "
                "always keeps"
            )
        check_quantization(self.kv_bits, self.kv_group_size)

    def check(self, config) -> None:
        """What a model with `config` adds: the quantization group must divide its head_dim."""
        if self.kv_bits is not None and config.head_dim % self.kv_group_size:
            raise ValueError(
                f"kv_group_size {self.kv_group_size} does not divide the model's head_dim "
                f"{config.head_dim}"
            )

    def nbytes(
        self, config, tokens: int, batch: int = 1, itemsize: int = 4, ring_slack: int = 0
    ) -> int:
        """kv_cache_bytes for caches of this kind."""
        return kv_cache_bytes(
            config,
            tokens,
            batch,
            self.max_kv_size,
            self.kv_bits,
            self.kv_group_size,
            itemsize,
            ring_slack,
        )

    @property
    def label(self) -> str:
        """Short, for tables: "full", "q8", "rotating:256", "q4:rotating:256"."""
        parts = ([f"q{self.kv_bits}"] if self.kv_bits else []) + (
            [f"rotating:{self.max_kv_size}"] if self.max_kv_size else []
        )
        return ":".join(parts) or "full"


def cache_spec(cache: CacheSpec | None = None, **options) -> CacheSpec:
    """A CacheSpec given whole (`cache`) or by its fields as keywords (max_kv_size, kv_keep, kv_bits,
    kv_group_size), the public functions' two ways to say it; not both."""
    if cache is None:
        return CacheSpec(**options)
    if not isinstance(cache, CacheSpec):
        raise ValueError(f"cache must be a CacheSpec, got {type(cache).__name__}")
    if options:
        raise ValueError(f"give cache= or {', '.join(sorted(options))}, not both")
    return cache


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_cache(config, spec: CacheSpec | None = None) -> list[KVCache | RotatingKVCache]:
    """One cache per layer of a model with `config`: a rotating cache of the window for each
    sliding-window layer; for the other layers a growing cache, or a rotating one of `max_kv_size`
    tokens with `kv_keep` sinks when memory is to be bounded. `kv_bits` quantizes all of them."""
    spec = spec or CacheSpec()
    spec.check(config)
    bits, group = spec.kv_bits, spec.kv_group_size
    caches: list[KVCache | RotatingKVCache] = []
    for window in config.layer_windows:
        if window is not None:
            caches.append(RotatingKVCache(window, 0, bits, group))
        elif spec.max_kv_size is not None:
            caches.append(RotatingKVCache(spec.max_kv_size, spec.kv_keep, bits, group))
        else:
            caches.append(KVCache(bits, group))
    return caches


def kv_cache_bytes(
    config,
    tokens: int,
    batch: int = 1,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    itemsize: int = 4,
    ring_slack: int = 0,
) -> int:
    """Bytes of KV storage `batch` sequences of `tokens` tokens take, as the caches allocate it
    once decoding has begun (and the Engine's batch caches always): keys and values of every
    layer, in slots that grow 256 at a time, capped by each layer's window (sliding-window layers)
    or `max_kv_size` (plus `ring_slack` slots: a batch's rings, batch_cache.RING_SLACK);
    quantized ones hold `kv_bits`-bit values plus a scale and a bias (of `itemsize` bytes) per
    group of `kv_group_size`. (A rotating cache that has only been prefilled holds just its
    tokens until its first decoded one.)"""
    slots = -(-tokens // KVCache.step) * KVCache.step
    per_token = _head_bytes(config, kv_bits, kv_group_size, itemsize)
    total = 0
    for window in config.layer_windows:
        cap = window if window is not None else max_kv_size
        total += 2 * per_token * (slots if cap is None else min(slots, cap + ring_slack))
    return batch * total


def kv_bytes_per_token(
    config, kv_bits: int | None = None, kv_group_size: int = 64, itemsize: int = 4
) -> int:
    """Bytes one token's keys and values take in every layer (no slots around them): what a
    prefix-cache entry holds per token."""
    layers = len(config.layer_windows)
    return 2 * layers * _head_bytes(config, kv_bits, kv_group_size, itemsize)


def _head_bytes(config, kv_bits: int | None, kv_group_size: int, itemsize: int) -> int:
    """One token's keys (or values) in one layer."""
    return config.num_key_value_heads * (
        config.head_dim * itemsize
        if kv_bits is None
        else config.head_dim * kv_bits // 8 + 2 * itemsize * config.head_dim // kv_group_size
    )
