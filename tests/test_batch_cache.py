"""Batched decoding through BatchKVCache: rows of different lengths, joining and leaving between
steps, in every cache kind.

Each row's logits are compared with transformers' full forward of that row's whole sequence
(growing caches, sliding windows, MoE, every family's attention); where transformers has no
counterpart (attention sinks, quantized storage) with the single-sequence cache, itself checked
against transformers and mlx-lm in test_cache.py. The masks are checked against the definition
of what each row's query sees, with keys that carry their own position."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer.batch_cache import BatchKVCache, Rows, make_batch_cache, remove_row
from mlxinfer.cache import KVCache, RotatingKVCache
from mlxinfer.generate import decode_step, prefill

from .reference import GEMMA3_ROPE, make_tiny_checkpoint, rel_err, torch_logits

pytestmark = pytest.mark.exactness  # CI runs these under each op set

TOL = 1e-4
TOL_QUANTIZED = 1e-3
WINDOW = 8

CASES = {
    "llama": ("llama", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=32)),
    "phi3-partial-rotary": ("phi3", dict(num_key_value_heads=4, partial_rotary_factor=0.5)),
    "mistral-window": ("mistral", dict(sliding_window=WINDOW, head_dim=32)),
    "qwen2-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "mixtral-moe": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gemma2-softcap": (
        "gemma2",
        dict(sliding_window=WINDOW, head_dim=32, attn_logit_softcapping=2.0),
    ),
    "gemma3-window": (
        "gemma3_text",
        dict(
            sliding_window=WINDOW,
            num_hidden_layers=3,
            head_dim=32,
            sliding_window_pattern=2,
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
    "qwen2-moe-shared": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny_checkpoint(path, family, **overrides)
    model, _ = mlxinfer.load(path)
    return ref, model


class Batch:
    """Sequences decoding together: prefill each alone, then one batched decode step at a time with
    teacher-forced tokens; rows join and leave between steps."""

    def __init__(self, model, **cache_options):
        self.model, self.options = model, cache_options
        self.rows, self.caches = make_batch_cache(model.make_cache(**cache_options), max_rows=8)
        self.seqs: list[list[int]] = []  # the tokens of each row, in row order

    def join(self, ids: list[int], chunk: int = 16) -> mx.array:
        single = self.model.make_cache(**self.options)
        logits = prefill(self.model, mx.array([ids]), single, chunk)
        self.rows.add(single[0].offset)
        for batch, one in zip(self.caches, single, strict=True):
            batch.add_row(one)
        self.seqs.append(list(ids))
        return logits

    def leave(self, row: int) -> None:
        remove_row(self.rows, self.caches, row)
        last = self.seqs.pop()
        if row < len(self.seqs):
            self.seqs[row] = last

    def step(self, tokens: list[int]) -> mx.array:
        """Feed one token per row; the logits after it `[rows, vocab]`."""
        logits = decode_step(self.model, mx.array(tokens), self.caches)
        self.rows.advance()
        for seq, token in zip(self.seqs, tokens, strict=True):
            seq.append(token)
        return logits


def run_schedule(batch: Batch, rng, reference, steps: int = 14) -> float:
    """Ragged rows; one leaves at step 4, one joins at step 7; returns the worst relative error of
    any row's logits against `reference(seq) -> last logits`."""
    for n in (5, 19, 11):
        batch.join(rng.integers(3, 128, n).tolist())
    worst = 0.0
    for step in range(steps):
        if step == 4:
            batch.leave(0)
        if step == 7:
            batch.join(rng.integers(3, 128, 23).tolist())
        logits = batch.step(rng.integers(3, 128, len(batch.seqs)).tolist())
        for row, seq in enumerate(batch.seqs):
            worst = max(worst, rel_err(logits[row], reference(seq)))
    return worst


def test_batched_decode_matches_transformers(tiny):
    """Growing caches (and each family's sliding windows through its rotating caches): every row
    as transformers computes its whole sequence, across lengths crossing the window."""
    ref, model = tiny
    rng = np.random.default_rng(0)
    worst = run_schedule(Batch(model), rng, lambda seq: torch_logits(ref, np.array([seq]))[0, -1])
    assert worst < TOL


class Shadows:
    """The single-sequence caches (the path test_cache.py checks against transformers and mlx-lm)
    fed exactly what each batch row is fed: prefill, then the same tokens one at a time."""

    def __init__(self, model, **options):
        self.model, self.options = model, options
        self.caches: dict[int, list] = {}  # by the sequence's first-token identity: its length

    def __call__(self, seq):
        key = id_of(seq)
        if key not in self.caches:  # a new row: prefill what it was prefilled with
            cache = self.model.make_cache(**self.options)
            prefill(self.model, mx.array([seq[:-1]]), cache, 16)
            self.caches[key] = [cache, len(seq) - 1]
        cache, done = self.caches[key]
        for token in seq[done:-1]:
            decode_step(self.model, mx.array([token]), cache)
        logits = decode_step(self.model, mx.array([seq[-1]]), cache)[0]
        self.caches[key][1] = len(seq)
        return logits


def id_of(seq: list[int]) -> tuple:
    return tuple(seq[:5])  # the random prompts differ in their first tokens


@pytest.mark.parametrize(
    "options",
    [
        dict(max_kv_size=12, kv_keep=3),  # sinks + ring, wrapping rows of different ages
        dict(max_kv_size=10, kv_keep=0),
        dict(kv_bits=8, kv_group_size=32),
        dict(kv_bits=4, kv_group_size=32, max_kv_size=16, kv_keep=2),
    ],
    ids=["sinks", "ring", "q8", "q4-sinks"],
)
def test_batched_decode_matches_single_caches(tiny, options):
    _, model = tiny
    if "kv_bits" in options and model.config.head_dim % 32:
        pytest.skip("head_dim not a multiple of the group size")
    rng = np.random.default_rng(1)
    worst = run_schedule(Batch(model, **options), rng, Shadows(model, **options))
    # A key computed in a [rows, D] product can round to the other side of a quantization step
    # than in a [1, D] one: measured 1.8e-4 once (qwen3, 8 bits, "mlx" op set), ~1e-6 otherwise.
    assert worst < (TOL_QUANTIZED if "kv_bits" in options else TOL)


# -- masks against the definition ----------------------------------------------------------------


def position_cache(cache_cls, offset: int, **kwargs):
    """A single cache holding `offset` tokens whose keys are their own positions."""
    cache = cache_cls(**kwargs)
    done = 0
    while done < offset:
        n = min(5, offset - done)
        keys = mx.broadcast_to(
            mx.arange(done, done + n, dtype=mx.float32)[None, None, :, None], (1, 1, n, 32)
        )
        cache.update_and_fetch(keys, keys)
        done += n
    return cache


@pytest.mark.parametrize("max_size,keep", [(None, 0), (8, 0), (8, 3), (6, 5)])
@pytest.mark.parametrize("window", [None, 4])
def test_each_row_sees_exactly_its_window(max_size, keep, window):
    """Rows of lengths 1..20 decode 15 steps: the positions each new token sees are those <= its
    own, inside the ring's sinks + recent tokens and inside the layer's window."""
    rng = np.random.default_rng(7)
    rows = Rows()
    batch = BatchKVCache(rows, max_size, keep)
    offsets = [1, 4, 9, 13, 20]
    for offset in offsets:
        if max_size is None:
            single = position_cache(KVCache, offset)
        else:
            single = position_cache(RotatingKVCache, offset, max_size=max_size, keep=keep)
        rows.add(offset)
        batch.add_row(single)
    for _ in range(15):
        new = mx.broadcast_to(
            rows.positions.astype(mx.float32)[:, None, None, None], (len(rows), 1, 1, 32)
        )
        keys, _ = batch.update_and_fetch(new, new)
        mask = batch.make_mask(1, window)
        held = np.array(keys[:, 0, :, 0]).astype(int)
        visible = np.ones(held.shape, bool) if mask is None else np.array(mask[:, 0, 0, :])
        for row, q in enumerate(rows.offsets):
            seen = set(held[row][visible[row]].tolist())
            recent = np.inf if max_size is None else max_size - keep
            expected = {
                k
                for k in range(q + 1)
                if (k < keep or q - k < recent) and (window is None or q - k < window)
            }
            assert seen == expected, (row, q)
        rows.advance()
        if len(rows) > 2 and rng.random() < 0.3:  # a row leaves now and then
            row = int(rng.integers(len(rows)))
            batch.remove_row(row)
            rows.remove(row)


def test_rows_leaving_copy_one_row():
    """Removing a row moves the last row into it and leaves the rows before untouched."""
    rows = Rows()
    batch = BatchKVCache(rows)
    for offset in (3, 5, 7):
        rows.add(offset)
        batch.add_row(position_cache(KVCache, offset))
    before = np.array(batch.keys[0][0, 0, :3, 0])
    batch.remove_row(1)
    rows.remove(1)
    assert rows.offsets == [3, 7]
    assert np.array(batch.keys[0][1, 0, :7, 0]).tolist() == list(range(7))
    assert np.array(batch.keys[0][0, 0, :3, 0]).tolist() == before.tolist()


def test_storage_grows_slots_without_adding_rows():
    """One row decoding past several 256-slot blocks keeps one row of storage (it doubled to the
    whole max_rows once, holding 8x the memory)."""
    rows = Rows(max_rows=8)
    batch = BatchKVCache(rows)
    rows.add(3)
    batch.add_row(position_cache(KVCache, 3))
    for _ in range(600):
        new = mx.zeros((1, 1, 1, 32))
        batch.update_and_fetch(new, new)
        rows.advance()
    assert batch.keys[0].shape[:3] == (1, 1, 768)


@pytest.mark.parametrize("max_size", [None, 5])
def test_held_bytes_are_the_rows_filled_slots(max_size):
    """held_nbytes (which request metrics read for single caches) on a batch cache: the slots its
    rows fill, not its capacity. It was inherited from the single-sequence caches and read a
    `tokens_held` the batch cache does not have: AttributeError."""
    rows = Rows()
    batch = BatchKVCache(rows, max_size)
    for offset in (3, 7):
        rows.add(offset)
        if max_size is None:
            batch.add_row(position_cache(KVCache, offset))
        else:
            batch.add_row(position_cache(RotatingKVCache, offset, max_size=max_size))
    per_slot = 2 * 1 * 32 * 4  # keys and values, 1 head of 32 float32 dims
    held = [offset if max_size is None else min(offset, max_size) for offset in (3, 7)]
    assert batch.held_nbytes == per_slot * sum(held) < batch.nbytes


def test_a_row_that_held_nan_cannot_reach_the_others(tiny):
    """Masked slots get weight 0, but 0 x NaN is NaN: what a failed row leaves behind (in the
    hole it vacates, or in a row given to a new sequence) must not be read as NaN."""
    _, model = tiny
    rng = np.random.default_rng(3)
    batch = Batch(model)
    for n in (30, 5, 12):
        batch.join(rng.integers(3, 128, n).tolist())

    def poison(row: int) -> None:
        for cache in batch.caches:
            for a in (*cache.keys, *cache.values):
                a[row : row + 1] = float("nan")

    poison(0)
    batch.leave(0)  # the last row (12 tokens) moves into the 30-token row's place
    logits = batch.step(rng.integers(3, 128, len(batch.seqs)).tolist())
    assert np.isfinite(np.array(logits)).all()
    poison(1)
    batch.leave(1)  # the last row leaves: its storage keeps the NaN
    batch.join(rng.integers(3, 128, 4).tolist())  # a new sequence takes that row
    logits = batch.step(rng.integers(3, 128, len(batch.seqs)).tolist())
    assert np.isfinite(np.array(logits)).all()
