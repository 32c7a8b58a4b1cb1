"""Speculative decoding: propose a few tokens cheaply, check them all in one pass of the model.

Decoding reads every weight once per token, so a pass over a row's last token and k proposed
ones costs little more than a step, and each proposal the model agrees with is a token for free:

    history --Proposer.propose--> d_1..d_k      (prompt lookup: what followed the context's
                                                 latest n-gram where it appeared before; or a
                                                 draft model's greedy continuation)
    [last, d_1..d_k] --one forward pass--> logits at each of the k + 1 positions
    verify: accept d_1..d_m, then one token of the model's own at position m  (m + 1 tokens)

`verify` keeps the output exactly that of plain decoding: at each position it computes the token
plain decoding would pick there (the argmax after the penalties; or the draw of the whole
sampling chain with the key plain sampling would use for that token) and accepts a proposal when
it is that token. For a sampled row that is rejection sampling with a point-mass proposal (see
`verify`): the distribution is plain sampling's, and the tokens are plain sampling's own for the
same seed, so whether a pass checks proposals, and how many, never changes what a row generates.
If every proposal is accepted the pass's last position gives one more token.

The runner (runner.py) runs the pass for every batch row at once, rows without proposals included
(their one token is an ordinary decode step), and rolls the caches back to the accepted tokens
(batch_cache.py: a row's offset advances by m + 1; rings hold RING_SLACK extra slots so the pass
never overwrites a key its queries still see). The rows a draft model proposes for draft
together too (DraftBatch: the draft's caches as a batch of its own, one pass a proposal).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import mlx.core as mx
import numpy as np

from .batch_cache import RING_SLACK, BatchKVCache, SingleCache, make_batch_cache, remove_row
from .cache import KVCache, kv_bytes_per_token
from .model import Model
from .sampling import PROPOSERS, Sampler, invalid_logits
from .steps import DEFAULT_PREFILL_CHUNK, decode_step, prefill, prefill_chunk, verify_step


class Proposer(Protocol):
    """Proposes up to `k` tokens to follow `history` (a request's prompt and its tokens so far,
    the last one not yet through the model). Fewer, or none, when it has nothing to say."""

    def propose(self, history: Sequence[int], k: int) -> list[int]: ...


class PromptLookup:
    """Prompt lookup (n-gram) proposals: the longest suffix of the history, of `max_ngram` tokens
    down to `min_ngram`, found earlier in the history (its latest occurrence) proposes the k
    tokens that followed it there. No second model: it shines where the reply copies its prompt
    (editing, summarising, code, retrieval answers), and proposes nothing elsewhere."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        tokens = np.asarray(history, dtype=np.int64)
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            # every earlier window of n tokens that a continuation follows: starts 0..L-n-1
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: L - 1], n)
            hits = np.flatnonzero((windows == tokens[L - n :]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # what followed the latest occurrence
                return [int(t) for t in tokens[start : start + k]]
        return []


class DraftModel:
    """Proposals from a second, smaller model that shares the tokenizer: its greedy continuation
    of the history, k tokens. One per request, its caches a row of a `DraftBatch` (the runner's,
    shared by every row that drafts, so that their proposals come from one pass of the draft a
    token; or one of its own): growing whatever the target's, a rejected proposal forgotten by
    trimming the row back to what the history still shares with what the draft has seen, a
    sliding-window layer masking its window as the row grows.

    The proposals are point masses (the draft's argmax), checked as prompt lookup's are (`verify`):
    the target's output is exactly plain decoding's, and for a sampled row a proposal is accepted
    with the target's probability of it (rejection sampling against the draft's whole
    distribution would accept sum(min(p, q)), more where the target is unsure; its resample
    would no longer be plain sampling's own draw for the seed)."""

    def __init__(self, model: Model, vocab_size: int, batch: DraftBatch | None = None):
        self.model = model
        self.vocab_size = vocab_size  # the target's: a proposal past it is never checked
        self.batch = batch if batch is not None else DraftBatch(model)
        self.seen: list[int] = []  # the tokens in its row of the batch's caches, in order
        # before it has a row: the caches of its prompt, prefilled beside the target's prefill
        # (DraftBatch.prefill; then `seen` is what they hold)
        self.pending: list[KVCache] | None = None

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        return self.batch.propose([(self, history, k)])[0]


def draft_cache_bytes(model: Model, rows: int, length: int) -> int:
    """Bytes a DraftBatch of `model` holds for `rows` rows of `length` tokens: growing caches in
    every layer, windowed or not, in slots of 256 (the batch caches' step)."""
    slots = -(-length // BatchKVCache.step) * BatchKVCache.step
    return rows * slots * kv_bytes_per_token(model.config, itemsize=model.compute_dtype.size)


class DraftBatch:
    """A draft model's caches for the rows that draft with it, as a batch (batch_cache.py): the
    proposals of every asking row come from one pass of the draft that catches each row up on
    its new tokens (the target's accepted ones and its own), then one batched step a proposal,
    instead of a pass a row. A row joins at its first proposal (its history prefilled alone, then
    copied in), and leaves when its request goes (`retain`). Rows that do not ask this time ride
    along in the passes without advancing (what they compute is dropped)."""

    def __init__(self, model: Model, max_rows: int | None = None):
        self.model = model
        self.max_rows = max_rows
        self.members: list[DraftModel] = []  # members[r] owns row r
        # seconds a step of the batch took (a proposal for each of its `step_rows` rows; calls
        # that caught up on more than a pass's tokens, a prompt's prefill, not counted): see
        # Runner._draft_cost
        self.step_seconds: float | None = None
        self.step_rows = 0
        self._empty()

    def _empty(self) -> None:
        template: list[SingleCache] = [KVCache() for _ in self.model.model.layers]  # (growing)
        self.rows, self.caches = make_batch_cache(template, self.max_rows)
        self.members = []

    @property
    def held(self) -> tuple[int, int]:
        """The rows and slots its caches hold now (their padded storage)."""
        return max((c.n_rows for c in self.caches), default=0), max(
            (c.capacity for c in self.caches), default=0
        )

    def retain(self, alive: set[DraftModel]) -> None:
        """Drop the rows of the members not in `alive` (their requests are gone)."""
        gone = [row for row, member in enumerate(self.members) if member not in alive]
        for row in reversed(gone):
            remove_row(self.rows, self.caches, row)
            last = self.members.pop()
            if row < len(self.members):
                self.members[row] = last
        if gone and not self.members:
            self._empty()  # (its memory back)

    def clear(self) -> None:
        """Forget every row (a member asking again joins afresh)."""
        for member in self.members:
            member.seen = []
        self._empty()

    def prefill(self, member: DraftModel, tokens: Sequence[int]) -> None:
        """The draft's part of a prompt's prefill, run beside the target's (the runner passes it
        each chunk's tokens, in order): the member's row then joins at its first proposal with
        these caches, not with a prefill inside the batch's decode pass."""
        if member in self.members or not len(tokens):
            return
        if member.pending is None:
            member.pending, member.seen = [KVCache() for _ in self.model.model.layers], []
        for start in range(0, len(tokens), DEFAULT_PREFILL_CHUNK):
            ids = list(tokens[start : start + DEFAULT_PREFILL_CHUNK])
            prefill_chunk(self.model, mx.array([ids]), member.pending)
            member.seen = member.seen + ids

    def _join(self, member: DraftModel, history: list[int]) -> None:
        """A new row holding all of `history` but its last token (at least one token): what the
        member prefilled beside the target (`prefill`) when that is a start of it, and a prefill
        now of what it has not."""
        seen, single = member.seen, member.pending
        member.pending = None
        if single is None or not 0 < len(seen) < len(history) or history[: len(seen)] != seen:
            seen, single = [], [KVCache() for _ in self.model.model.layers]
        rest = history[len(seen) : max(1, len(history) - 1)]  # (what it has not prefilled)
        if rest:
            prefill(self.model, mx.array([rest]), single)
            seen = seen + rest
        self.rows.add(len(seen))
        for batch, cache in zip(self.caches, single, strict=True):
            batch.add_row(cache)
        self.members.append(member)
        member.seen = seen

    def propose(self, asks: Sequence[tuple[DraftModel, Sequence[int], int]]) -> list[list[int]]:
        """For each (member, history, k): the draft's greedy continuation of the history, k
        tokens (fewer where a token falls past the target's vocabulary; none for k <= 0)."""
        out: list[list[int]] = [[] for _ in asks]
        asking = [(i, m, list(h), k) for i, (m, h, k) in enumerate(asks) if k > 0 and len(h)]
        if not asking:
            return out
        try:
            for _, member, history, _ in asking:
                if member not in self.members:
                    self._join(member, history)
            return self._propose(asking, out)
        except Exception:  # (a pass failed: what the rows hold is unknown) every row starts again
            self.clear()
            raise

    def _propose(self, asking: list, out: list[list[int]]) -> list[list[int]]:
        started = time.perf_counter()
        rows = len(self.members)
        feed: list[list[int]] = [[] for _ in range(rows)]  # each row's tokens new to the draft
        want = [0] * rows
        for _, member, history, k in asking:
            row = self.members.index(member)
            shared = zip(member.seen, history[:-1], strict=False)  # (its last token is new)
            common = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], shared))
            self.rows.rewind(row, common)  # (rejected proposals forgotten)
            feed[row], want[row] = history[common:], k
        T = max(len(f) for f in feed)
        inputs = mx.array([f + [0] * (T - len(f)) for f in feed])  # [rows, T]
        logits = verify_step(self.model, inputs, self.caches)  # [rows, T, vocab]
        last = mx.array([max(len(f), 1) - 1 for f in feed])[:, None, None]
        token = mx.argmax(mx.take_along_axis(logits, last, axis=1)[:, 0], axis=-1)  # [rows]
        self.rows.advance([len(f) for f in feed])
        active = mx.array([w > 0 for w in want])
        drafts = [token]
        most = max(want)
        for _ in range(most - 1):  # built lazily: one evaluation for all the proposals
            step = decode_step(self.model, mx.where(active, token, 0), self.caches)
            token = mx.argmax(step, axis=-1)
            self.rows.advance([1 if w else 0 for w in want])
            drafts.append(token)
        proposed = cast(list[list[int]], mx.stack(drafts, axis=1).tolist())  # [rows, most]
        if T <= RING_SLACK + 1:  # (not a prompt's prefill: the joins were before `started`)
            seconds = (time.perf_counter() - started) / most
            known = self.step_seconds if self.step_rows == rows else None
            self.step_seconds = seconds if known is None else 0.7 * known + 0.3 * seconds
            self.step_rows = rows
        for i, member, history, k in asking:
            row = self.members.index(member)
            member.seen = history + proposed[row][: most - 1]  # the last is not through it
            mine = proposed[row][:k]
            past = (j for j, t in enumerate(mine) if t >= member.vocab_size)  # never checked
            out[i] = mine[: next(past, k)]
        return out


def make_proposer(
    name: str,
    max_ngram: int,
    draft: Model | None = None,
    vocab: int = 0,
    drafts: DraftBatch | None = None,
) -> Proposer:
    """A request's proposer: "prompt-lookup", or "draft" (`draft`, the engine's draft model, its
    rows in `drafts` when given; `vocab` the target's vocabulary size)."""
    if name == "prompt-lookup":
        return PromptLookup(max_ngram, min(2, max_ngram))
    if name == "draft":
        if draft is None:
            raise ValueError(NO_DRAFT)
        return DraftModel(draft, vocab, drafts)
    raise ValueError(f"speculation must be one of {PROPOSERS}, got {name!r}")


NO_DRAFT = (
    "speculation='draft' needs a draft model: pass draft_model= to the engine (a loaded model "
    "that shares the tokenizer), or --draft-model PATH on the command line"
)


def check_draft(model: Model, draft: Model | None, tokens: int) -> None:
    """Refuse a draft model that cannot propose for `model`, whose tokenizer has `tokens` ids
    (ValueError saying why). Their embedding tables may differ in padding (Qwen2.5's 0.5B and 7B
    checkpoints: 151,936 and 152,064 rows for one tokenizer); the draft must hold every id the
    tokenizer gives. That the draft's tokenizer is the same one, only a caller that has both
    tokenizers can tell (`check_draft_pair`)."""
    if draft is None:
        return
    if not isinstance(draft, Model):
        raise ValueError(f"draft_model must be a loaded model, got {type(draft).__name__}")
    if draft.config.vocab_size < tokens:
        raise ValueError(
            f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is smaller than "
            f"the tokenizer's ({tokens}): a draft must share the model's tokenizer"
        )
    if model.ranks is not None or draft.ranks is not None:
        raise ValueError("a draft model with a model split over ranks is not supported yet")


DRAFT_PROBE = "Speculative decoding, 2026: the quick brown fox -> 12,345 naïve tokens!"


def check_draft_pair(model: Model, tokenizer, draft: Model, draft_tokenizer) -> None:
    """`check_draft`, then refuse a draft whose tokenizer encodes a probe text differently from
    the model's: what --draft-model, the bench's spec axis and the dashboard's chat check."""
    check_draft(model, draft, tokenizer.vocab_size)
    if draft_tokenizer.encode(DRAFT_PROBE) != tokenizer.encode(DRAFT_PROBE):
        raise ValueError("its tokenizer encodes text differently from the model's")


# Each row decides alone how many proposals to check, from its own record (never from the batch
# or the clock: a seeded request must draw the same tokens alone and batched): the j-th proposal
# is checked when its chance of being reached and accepted, alpha ** j, is at least WORTH. The
# record decays each step, so a row that stopped proposing probes again (alpha drifts to 1/2).
DECAY = 0.9


def worth() -> float:
    """The least chance of acceptance a proposal is checked for. On a CPU a pass costs nearly in
    proportion to the tokens it checks (bench_speculative.py: a batch of 8 checking 6 proposals
    a row ran at 0.47x of plain decoding with a quarter of them accepted), so a proposal must
    more likely than not be accepted; on a GPU a pass costs about one step (not measured here:
    a guess, to revisit with a device)."""
    return 0.5 if mx.default_device() == mx.cpu else 0.2


def decayed(count: float) -> float:
    """A row's record one step older: DECAY of it, and nothing once under 0.05 (so that a row
    that gave up proposing gets back to its prior and probes again, ~30 steps after a
    rejection)."""
    count *= DECAY
    return count if count >= 0.05 else 0.0


def acceptance(accepted: float, rejected: float) -> float:
    """A row's estimated chance that a proposal is accepted, given the one before it was: its
    decayed count of accepted proposals and of passes ended by a rejection, with a prior of one
    of each."""
    return (accepted + 1.0) / (accepted + rejected + 2.0)


def affordable(k: int, alpha: float, step_seconds: float, rows: int, token_seconds: float) -> int:
    """How many of k proposals are worth drafting when each costs this row `token_seconds` (its
    share of a draft model's step and of the verify pass's extra position: Runner._draft_cost):
    the j-th while its chance of being reached and accepted, alpha ** j, times what an accepted
    token saves (a plain step of the batch makes `rows` tokens in `step_seconds`) is at least its
    cost. A draft as slow as the model is never worth it; on a GPU a small draft costs a tenth of
    a step or less, and a wider pass little more than a step."""
    return _reached(k, alpha, token_seconds * rows / step_seconds)


def draft_length(num_draft: int, accepted: float, rejected: float, least: float) -> int:
    """Proposals worth checking: the largest j <= num_draft with alpha ** j >= least."""
    return _reached(num_draft, acceptance(accepted, rejected), least)


def _reached(k: int, alpha: float, least: float) -> int:
    """The largest j <= k whose chance of being reached and accepted, alpha ** j, is >= least."""
    j = 0
    while j < k and alpha ** (j + 1) >= least:
        j += 1
    return j


class PassCost:
    """Seconds a decode pass takes as a + b * tokens (its rows x positions), fitted to the passes
    a runner times, the older weighing less (DECAY_COST a pass). On a GPU b is small (a pass reads
    the weights once, whatever it checks); on a CPU it is most of the cost. Whether and how much a
    batch checks is decided from it (`width`): that changes how fast the rows go, never what they
    generate (`verify`)."""

    DECAY_COST = 0.95

    def __init__(self) -> None:
        self.sums = [0.0] * 5  # weights, x, x^2, y, x y

    def observe(self, tokens: int, seconds: float) -> None:
        w, x, xx, y, xy = (v * self.DECAY_COST for v in self.sums)
        self.sums = [w + 1, x + tokens, xx + tokens * tokens, y + seconds, xy + tokens * seconds]

    def predict(self, tokens: int) -> float | None:
        """None until passes of different sizes were timed."""
        w, x, xx, y, xy = self.sums
        if w == 0:
            return None
        spread = xx / w - (x / w) ** 2
        if spread < 0.25:  # (one size of pass so far)
            return None
        b = max(0.0, (xy / w - (x / w) * (y / w)) / spread)
        a = max(1e-6, y / w - b * x / w)
        return a + b * tokens


def width(
    cost: PassCost, rows: int, proposals: dict[int, list[int]], alphas: dict[int, float]
) -> int:
    """The positions a batch's pass should have (1: a plain step): the one that maximises the
    tokens the rows are expected to keep per second. Row r keeps 1 + sum of alpha_r ** j over
    the proposals it checks (proposal j is reached and accepted with that chance); every row
    pays for the widest. Full width while the cost is not known yet (those passes teach it)."""
    widest = 1 + max(len(d) for d in proposals.values())
    costs = [cost.predict(rows * t) for t in range(1, widest + 1)]
    if any(c is None for c in costs):
        return widest
    best, best_rate = 1, 0.0
    for t, seconds in zip(range(1, widest + 1), costs, strict=True):
        kept = rows + sum(
            sum(alphas[row] ** j for j in range(1, min(len(d), t - 1) + 1))
            for row, d in proposals.items()
        )
        rate = kept / cast(float, seconds)
        if rate > best_rate:
            best, best_rate = t, rate
    return best


@dataclass
class Verdict:
    """One row's verify pass, lazy on the device until `tokens` reads it: the model's token at
    each position (`picked`, `[k + 1]`: the argmax for a greedy row, the sampler's own draw for a
    sampled one), which proposals it accepts (`accepted`, `[k]` bool: equal to the pick), whether
    each position's distribution was invalid (NaN/inf), and for a sampled row the sampler's key
    after each position (`keys`)."""

    proposals: list[int]
    picked: mx.array
    accepted: mx.array
    invalid: mx.array
    keys: list[mx.array] | None = None

    def arrays(self) -> list[mx.array]:
        return [self.picked, self.accepted, self.invalid]

    def tokens(self) -> tuple[list[int], bool]:
        """(the row's tokens: accepted proposals, then the model's own; whether a distribution
        they came from was invalid). Waits for the pass."""
        accepted = cast(list[bool], self.accepted.tolist())
        m = next((i for i, ok in enumerate(accepted) if not ok), len(self.proposals))
        picked = cast(list[int], self.picked.tolist())
        invalid = any(cast(list[bool], self.invalid.tolist())[: m + 1])
        return [*self.proposals[:m], int(picked[m])], invalid

    def key_after(self, kept: int) -> mx.array | None:
        """A sampled row's key once `kept` tokens were drawn (None for a greedy row)."""
        return None if self.keys is None else self.keys[kept - 1]


def verify(sampler: Sampler, logits: mx.array, proposals: list[int]) -> Verdict:
    """The verify step of one row: `logits` `[k + 1, V]` at the row's last token and its k
    `proposals`. Position j is processed as plain sampling would process it once proposals
    0..j-1 had been generated (`Sampler.process_ahead`), and its token is the one plain sampling
    would pick there: the argmax, or the draw with the key plain sampling would use for that
    token (`Sampler.step_keys`). A proposal is accepted when it is that token.

    For a sampled row this is rejection sampling with a proposal q that is a point mass on d:
    the draw equals d with probability p(d), which is min(1, p(d) / q(d)), the most any exact
    scheme accepts; and when it is not d it is a draw from p without d, renormalised, which is
    the residual max(0, p - q). So the tokens follow plain sampling's distribution, and more:
    they are plain sampling's own tokens for the same seed (up to the float rounding between a
    verify pass and a decode step), whether a pass checks proposals or not. Records nothing: the
    caller records the tokens it keeps (`Sampler.record`) and moves the key (`key_after`)."""
    k = len(proposals)
    processed = sampler.process_ahead(logits[: k + 1], proposals)  # [k + 1, V]
    d = mx.array(proposals, dtype=mx.uint32)
    if sampler.params.greedy:
        picked = mx.argmax(processed, axis=-1).astype(mx.uint32)
        return Verdict(proposals, picked, picked[:k] == d, invalid_logits(processed))
    keys = sampler.step_keys(k + 1)
    draws = [sampler.draw_processed(processed[j : j + 1], keys[j][1]) for j in range(k + 1)]
    picked = mx.concatenate([token.astype(mx.uint32) for token, _ in draws])
    invalid = mx.concatenate([bad for _, bad in draws])
    return Verdict(proposals, picked, picked[:k] == d, invalid, [key for key, _ in keys])
