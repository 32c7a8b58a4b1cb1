"""Batched KV caches: many sequences of different lengths decoding together.

Each layer keeps one `BatchKVCache`: keys and values `[rows, kv_heads, capacity, head_dim]` where
row r belongs to one sequence and the token at position p sits in slot `slot(p)` of its row:

    growing cache                 slot(p) = p
    rotating cache (max M, keep)  slot(p) = p for p < keep (sinks), else keep + (p - keep) mod (M - keep)

so a row needs no padding in front and no realignment: the positions are data (`Rows.offsets`,
one per row, shared by all layers of the model), RoPE rotates each row by its own position, and
the attention mask `[rows, 1, 1, S]` hides each row's empty or overwritten slots.

Prompts are prefilled one sequence at a time into the single-sequence caches of cache.py (exact,
chunked, with sliding windows and sinks), then `add_row` copies that cache into the next free row.
`remove_row` moves the last row into the hole, so a sequence leaving copies one other row's
history once; the rest stay where they are. Rows are always 0..n-1, so the decode step reads a
plain slice of the storage.

Decode steps run through a batch cache: one new token per row, or (speculative decoding's
verify pass, speculative.py) T tokens per row at once, each row's own positions. A ring that takes
T tokens at once needs `slack` slots beyond its window: writing them in place must not overwrite
keys that the pass's earlier queries still see. Rolling back rejected tokens is `Rows.advance`
by fewer than were written: a slot past a row's offset is never visible, and is written again.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache, RotatingKVCache, Stored, StoredKV, check_quantization
from .masks import Mask

SingleCache = KVCache | RotatingKVCache

# Slots a batch's rings hold beyond their window: a verify pass of speculative decoding writes a
# row's last token and up to this many proposed ones at once (see the module's note).
RING_SLACK = 8


class Rows:
    """The sequences of a batch, shared by every layer's cache: the position of each row's next
    token. `positions` is one array per step, so the layers' RoPE tables and masks are built once
    for all layers."""

    def __init__(self, max_rows: int | None = None):
        self.max_rows = max_rows  # storage is never allocated for more rows than this
        self.offsets: list[int] = []  # tokens seen by each row = position of its next token
        self._positions: mx.array | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def positions(self) -> mx.array:
        """int32 `[rows]`: the position of each row's next token."""
        if self._positions is None:
            self._positions = mx.array(self.offsets, dtype=mx.int32)
        return self._positions

    def advance(self, counts: list[int] | None = None) -> None:
        """After a decode step: every row has one token more, or row r `counts[r]` more (a verify
        pass keeps each row's accepted tokens; the slots of its rejected ones are forgotten)."""
        if counts is None:
            self.offsets = [o + 1 for o in self.offsets]
        else:
            self.offsets = [o + n for o, n in zip(self.offsets, counts, strict=True)]
        self._positions = None

    def rewind(self, row: int, offset: int) -> None:
        """Row `row` back to its first `offset` tokens: the slots after them are never visible
        again, and are written again (a draft model's rejected proposals, speculative.py)."""
        if not 0 <= offset <= self.offsets[row]:
            raise ValueError(f"row {row} holds {self.offsets[row]} tokens, not {offset}")
        self.offsets[row] = offset
        self._positions = None

    def add(self, offset: int) -> None:
        self.offsets.append(offset)
        self._positions = None

    def remove(self, row: int) -> None:
        """Row `row` leaves; the last row takes its place (as in every layer's cache)."""
        last = self.offsets.pop()
        if row < len(self.offsets):
            self.offsets[row] = last
        self._positions = None


class BatchKVCache(StoredKV):
    """One layer's keys and values for all rows of a batch. `max_size=None` grows; otherwise a
    ring keeping `keep` sinks and the latest `max_size - keep` tokens (like RotatingKVCache, which
    a sliding-window layer uses with keep=0 and max_size = its window), in `max_size + slack`
    slots: `slack` more than a pass of several tokens per row writes (see the module's note)."""

    step = 256

    def __init__(
        self,
        rows: Rows,
        max_size: int | None = None,
        keep: int = 0,
        bits: int | None = None,
        group_size: int = 64,
        slack: int = 0,
    ):
        check_quantization(bits, group_size)
        self.bits = bits
        self.group_size = group_size
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.rows = rows
        self.max_size = max_size
        self.keep = keep
        self.slack = slack if max_size is not None else 0
        # the ring's slots: its window plus the slack
        self.slots = None if max_size is None else max_size + self.slack

    @classmethod
    def like(cls, cache: SingleCache, rows: Rows, slack: int = 0) -> BatchKVCache:
        """The batch cache holding the same kind of cache as a single-sequence `cache`."""
        if isinstance(cache, RotatingKVCache):
            return cls(rows, cache.max_size, cache.keep, cache.bits, cache.group_size, slack)
        return cls(rows, None, 0, cache.bits, cache.group_size)

    # -- positions and slots -------------------------------------------------------------------

    def slot(self, position: int) -> int:
        if self.slots is None or position < self.slots:
            return position
        return self.keep + (position - self.keep) % (self.slots - self.keep)

    def held(self, offset: int) -> int:
        """Slots in use by a row that has seen `offset` tokens."""
        return offset if self.slots is None else min(offset, self.slots)

    @property
    def offset(self) -> mx.array:
        """The position of each row's new token, `[rows]` (Attention rotates by it)."""
        return self.rows.positions

    # -- storage -------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[0]

    def _reserve(self, rows: int, slots: int, like: Stored, like_v: Stored) -> None:
        """Make room for `rows` rows of `slots` slots, keeping what is stored. Rows double (up to
        `Rows.max_rows`) and slots grow `step` at a time, so growing copies rarely."""
        have_rows, have_slots = self.n_rows, self.capacity
        if rows <= have_rows and slots <= have_slots:
            return
        new_rows = have_rows  # only the slots need to grow
        if rows > have_rows:
            new_rows = max(rows, 2 * have_rows)
            if self.rows.max_rows is not None:
                new_rows = max(rows, min(new_rows, self.rows.max_rows))
        new_slots = max(have_slots, -(-slots // self.step) * self.step)
        if self.slots is not None:
            new_slots = min(new_slots, self.slots)
        k = _empty(like, new_rows, new_slots)
        v = _empty(like_v, new_rows, new_slots)
        if self.keys is not None:
            used = min(have_rows, len(self.rows))
            for dst, src in zip((*k, *v), (*self.keys, *self.values), strict=True):
                dst[:used, :, :have_slots] = src[:used]
        self.keys, self.values = k, v

    def add_row(self, cache: SingleCache) -> None:
        """Copy a prefilled single-sequence cache (batch 1) into row `len(rows) - 1`, the row the
        caller has just added to `rows` (with `rows.add(cache.offset)`)."""
        row = len(self.rows) - 1
        keys, values = _held_in_slot_order(cache, self)
        n = keys[0].shape[2]
        self._reserve(row + 1, max(self.held(o) for o in self.rows.offsets), keys, values)
        for dst, src in zip((*self.keys, *self.values), (*keys, *values), strict=True):
            dst[row : row + 1, :, :n] = src
            # A row's unused slots are masked out, but a masked weight of 0 times a NaN left by a
            # request that failed there is still NaN: they must hold zeros.
            dst[row : row + 1, :, n:] = 0

    def remove_row(self, row: int) -> None:
        """Drop `row`: the last row moves into it. Call before `rows.remove(row)`."""
        last = len(self.rows) - 1
        if row != last:
            end = self.held(self.rows.offsets[last])
            for a in (*self.keys, *self.values):
                a[row : row + 1, :, :end] = a[last : last + 1, :, :end]
                a[row : row + 1, :, end:] = 0  # what the row held before (see add_row)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write T new tokens per row, `[rows, kv_heads, T, head_dim]`, at each row's slots;
        return the slots in use `[rows, kv_heads, S, ...]` (S = the longest row's)."""
        n, T = len(self.rows), keys.shape[2]
        if T > 1 and self.slots is not None and T - 1 > self.slack:
            raise ValueError(
                f"a batch ring cache with {self.slack} slack slots takes at most "
                f"{self.slack + 1} tokens a row at once, got {T}"
            )
        k, v = self._encode(keys), self._encode(values)
        offsets = self.rows.offsets
        end = max(self.held(o + T) for o in offsets)
        self._reserve(n, end, k, v)
        slots = [[self.slot(o + t) for t in range(T)] for o in offsets]
        first = slots[0][0]
        if all(row == list(range(first, first + T)) for row in slots):
            # every row writes the same slots (one row, or equal lengths)
            for dst, src in zip((*self.keys, *self.values), (*k, *v), strict=True):
                dst[:n, :, first : first + T] = src
        else:
            index = mx.array(slots, dtype=mx.int32)[:, None, :, None]
            self.keys = _put_rows(self.keys, index, k, n)
            self.values = _put_rows(self.values, index, v, n)
        return self._fetch_rows(self.keys, n, end), self._fetch_rows(self.values, n, end)

    def _fetch_rows(self, stored: Stored, n: int, end: int):
        parts = tuple(a[:n, :, :end] for a in stored)
        return parts[0] if self.bits is None else parts

    @property
    def held_nbytes(self) -> int:
        """Bytes of the slots the rows fill (each row's share, not the padding around it)."""
        return sum(self.row_nbytes(offset) for offset in self.rows.offsets)

    def row_nbytes(self, offset: int) -> int:
        """Bytes of the slots one row of `offset` tokens fills (its share, not the padding)."""
        if self.keys is None or not self.capacity:
            return 0
        per_slot = self.nbytes / (self.n_rows * self.capacity)
        return int(per_slot * self.held(offset))

    # -- masks ---------------------------------------------------------------------------------

    def mask_key(self, T: int, window: int | None) -> tuple:
        state = (tuple(self.rows.offsets), self.max_size, self.keep, self.slack)
        return ("batch", id(self.rows), *state, T, window)

    def make_mask(self, T: int, window: int | None = None) -> Mask:
        """`[rows, 1, T, S]` bool for the T new tokens of each row over the slots just returned;
        None when every row's token sees every slot (one token a row)."""
        offsets = [o + T for o in self.rows.offsets]  # including the new tokens
        end = max(self.held(o) for o in offsets)
        if T == 1:
            every_slot = all(self.held(o) == end for o in offsets)
            hides = window is not None and any(self._window_hides(o, window) for o in offsets)
            hides = hides or (self.slack and any(self._ring_hides(o) for o in offsets))
            if every_slot and not hides:
                return None
        # each new token's position, [rows, T, 1]
        q = (mx.array(self.rows.offsets, dtype=mx.int32)[:, None] + mx.arange(T))[:, :, None]
        s = mx.arange(end, dtype=mx.int32)[None, None, :]  # [1, 1, S]
        if self.slots is None:
            position = mx.broadcast_to(s, (len(offsets), T, end))
        else:
            # the latest position <= q stored in slot s (rows past the ring: it has wrapped)
            ring = self.slots - self.keep
            wrapped = q - ((q - s) % ring)
            position = mx.where((s < self.keep) | (q < self.slots), s, wrapped)
        visible = position <= q  # also hides the slots a shorter row has not filled
        if self.slack:  # the ring holds slack older tokens than its window: hidden
            recent = self.max_size - self.keep
            visible = visible & ((position < self.keep) | (q - position < recent))
        if window is not None:
            visible = visible & (q - position < window)
        return visible[:, None, :, :]

    def _window_hides(self, offset: int, window: int) -> bool:
        """Whether a row that has seen `offset` tokens holds a key outside the layer's window."""
        wrapped = self.slots is not None and offset > self.slots
        oldest = offset - self.slots if wrapped and not self.keep else 0
        return offset - 1 - oldest >= window

    def _ring_hides(self, offset: int) -> bool:
        """Whether a ring with slack holds, for a row that has seen `offset` tokens, a non-sink key
        older than its window (`max_size - keep` latest tokens)."""
        return offset > self.max_size


def _empty(like: Stored, rows: int, slots: int) -> Stored:
    return tuple(mx.zeros((rows, a.shape[1], slots, a.shape[3]), a.dtype) for a in like)


def _put_rows(stored: Stored, index: mx.array, new: Stored, n: int) -> Stored:
    """Each row r < n of `new` `[n, H, T, d]` written at slots index[r] of `stored`. Rows past n
    (allocated, unused) get zeros in slot 0: harmless, and it lets the scatter update the whole
    buffer in place instead of copying a slice of it."""
    out = []
    spare = stored[0].shape[0] - n
    if spare:
        index = mx.concatenate([index, mx.zeros((spare, *index.shape[1:]), index.dtype)])
    for dst, src in zip(stored, new, strict=True):
        if spare:
            src = mx.concatenate([src, mx.zeros((spare, *src.shape[1:]), src.dtype)])
        out.append(mx.put_along_axis(dst, mx.broadcast_to(index, src.shape), src, axis=2))
    return tuple(out)


def _held_in_slot_order(cache: SingleCache, batch: BatchKVCache) -> tuple[Stored, Stored]:
    """The keys/values a single cache holds laid out as the batch's slots: index i is batch slot
    i. A ring with slack has more slots than the cache holds tokens: the slots of tokens older
    than the window stay zeros (the mask hides them)."""
    if cache.keys is None:
        raise ValueError("add_row needs a prefilled cache")
    if isinstance(cache, RotatingKVCache):
        n = cache.size
        keys = tuple(a[..., :n, :] for a in cache.keys)
        values = tuple(a[..., :n, :] for a in cache.values)
        slots = [batch.slot(p) for p in cache.positions().tolist()]
        if slots != list(range(n)):
            index = mx.array(slots, dtype=mx.int32)[None, None, :, None]
            width = max(slots) + 1
            keys, values = (
                tuple(
                    mx.put_along_axis(
                        mx.zeros((*a.shape[:2], width, a.shape[3]), a.dtype),
                        mx.broadcast_to(index, a.shape),
                        a,
                        axis=2,
                    )
                    for a in stored
                )
                for stored in (keys, values)
            )
        return keys, values
    n = cache.offset
    return tuple(a[..., :n, :] for a in cache.keys), tuple(a[..., :n, :] for a in cache.values)


def remove_row(rows: Rows, caches: list[BatchKVCache], row: int) -> None:
    """Drop `row` from every layer's cache and from `rows`: the last row moves into its place."""
    for cache in caches:
        cache.remove_row(row)
    rows.remove(row)


def make_batch_cache(
    template: list[SingleCache], max_rows: int | None = None, slack: int = 0
) -> tuple[Rows, list[BatchKVCache]]:
    """Batch caches matching a model's single-sequence caches (`model.make_cache(...)`), one per
    layer, sharing one `Rows`; rings with `slack` slots for passes of up to slack + 1 tokens."""
    rows = Rows(max_rows)
    return rows, [BatchKVCache.like(c, rows, slack) for c in template]
