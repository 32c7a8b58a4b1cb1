"""The runner: executes what the scheduler planned, on the model, and hands back what it sampled.

    Plan (scheduler.py) --> Runner.prefill(requests, chunk) --> Sampled | None (not the last chunk)
                        --> Runner.decode(requests)         --> Sampled
    Sampled --> Scheduler.update (responses, statuses, batch rows)

It owns everything on the device: the batch caches (a row per running request, batch_cache.py),
the prefix cache's keys and values, and a decode step queued ahead (on a GPU). Every pass goes
through steps.py's prefill_pass / prefill_chunk / decode_step, as generate_tokens and inspect do.
It decides nothing: which request prefills which chunk, and when rows decode, is the scheduler's.

Prompts are prefilled into single-sequence caches (exact, chunked; several short fresh prompts
together in one padded pass), then copied into a row of the batch caches (`join`); a decode step
runs all rows through the model at once. Its results come back to the host as plain values: row r
of a `Sampled` is requests[r]'s token, logprobs, or the reason it failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from .batch_cache import RING_SLACK, make_batch_cache, remove_row
from .cache import CacheSpec, RotatingKVCache, make_cache
from .model import Model
from .prefix_cache import PrefixCache
from .request import Request
from .responses import TokenLogprobs
from .sampling import Sampler, invalid_logits, top_logprobs
from .speculative import (
    DraftBatch,
    DraftModel,
    PassCost,
    Verdict,
    acceptance,
    affordable,
    decayed,
    draft_length,
    make_proposer,
    verify,
    width,
    worth,
)
from .steps import decode_step, pipelines_decode, prefill_chunk, prefill_pass, verify_step

logger = logging.getLogger(__name__)


@dataclass
class Sampled:
    """What one pass produced, on the host: row r belongs to requests[r]."""

    requests: list[Request]
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: dict[int, str] = field(default_factory=dict)  # rows that failed, and why
    at: float = field(default_factory=time.perf_counter)  # when the tokens reached the host
    more: dict[int, list[int]] = field(default_factory=dict)  # a verify pass's further tokens
    more_logprobs: dict[int, list[TokenLogprobs | None]] = field(default_factory=dict)  # theirs

    def tokens_of(self, row: int) -> list[int]:
        """Row `row`'s tokens in order: one, or (speculative decoding) the accepted proposals
        and the model's own token after them."""
        return [self.tokens[row], *self.more.get(row, ())]

    def logprobs_of(self, row: int) -> list[TokenLogprobs | None]:
        """The logprobs of each of `tokens_of(row)` (None where none were asked for)."""
        more = self.more_logprobs.get(row) or [None] * len(self.more.get(row, ()))
        return [self.logprobs[row], *more]

    @classmethod
    def failed(cls, requests: list[Request], reason: str) -> Sampled:
        n = len(requests)
        return cls(requests, [-1] * n, [None] * n, dict.fromkeys(range(n), reason))


class Runner:
    """The model's side of a scheduler. Not thread-safe: the scheduler's thread calls it."""

    def __init__(
        self,
        model: Model,
        cache: CacheSpec,
        max_batch: int,
        prefix_cache: PrefixCache | None = None,
        draft: Model | None = None,
    ):
        self.model = model
        self.draft = draft  # speculative decoding's draft model (speculation="draft"), if any
        # its caches for the rows that draft, one batch: their proposals in one pass a token
        self.drafts = DraftBatch(draft, max_batch) if draft is not None else None
        self.cache = cache
        self.max_batch = max_batch
        self.prefix_cache = prefix_cache
        self.template = model.make_cache(cache)  # checks it against the model
        # What decides a plan comes from the whole model's layers: over ranks, a pipeline stage
        # may hold only windowed layers, or none, and every rank must decide alike.
        self.split = model.ranks is not None
        self.whole = make_cache(model.whole_config, cache)  # (empty: never filled)
        if prefix_cache is not None and self.split:
            prefix_cache.max_tokens = self.ring_size  # (see PrefixCache.store)
        self.run_ahead = pipelines_decode()  # queue decode step n+1 before reading step n (GPU)
        self.pass_cost = PassCost()  # how long decode passes take, by their size
        self.step_seconds: float | None = None  # the last timed plain step's
        self.last_pass: tuple[int, float] | None = None  # the last verify pass: (positions, s)
        self._ahead: _Step | None = None
        self._new_batch()

    # -- prefill ---------------------------------------------------------------------------------

    def start(self, request: Request) -> None:
        """Before a request's first prefill chunk: its caches, whatever the prefix cache holds of
        its prompt, and its sampler."""
        request.cache = self.model.make_cache(self.cache)
        if self.prefix_cache is not None:
            matched, key = self.prefix_cache.lookup(request.prompt_ids)
            if matched and key is not None:
                self.prefix_cache.restore(key, matched, request.cache)
                request.prefilled = request.cached_prompt_tokens = matched
        request.sampler = Sampler(request.params, self.model.config.vocab_size, request.prompt_ids)
        params = request.params
        if params.speculation is not None:
            request.proposer = make_proposer(
                params.speculation,
                params.lookup_ngram,
                self.draft,
                self.model.config.vocab_size,
                self.drafts,
            )

    def prefill(self, requests: list[Request], chunk: int) -> Sampled | None:
        """One request's next `chunk` prompt tokens (None unless they were its last), or several
        fresh prompts in one padded pass; for each prompt that is done, its first token."""
        if len(requests) > 1:
            return self._prefill_together(requests)
        request = requests[0]
        try:
            cache = _caches(request)
            ids = request.prompt_ids[request.prefilled : request.prefilled + chunk]
            if request.prefilled + len(ids) < len(request.prompt_ids):
                prefill_chunk(self.model, mx.array([ids]), cache)
                request.prefilled += len(ids)
                self._draft_prefill(request)
                return None
            logits = prefill_pass(self.model, mx.array([ids]), cache)  # [1, vocab]
            request.prefilled += len(ids)
        except Exception as e:  # this request fails; the others are untouched
            self._stop_if_split()
            return Sampled.failed(requests, f"prefill failed: {e}")
        self._draft_prefill(request)
        return self._first_tokens(requests, logits, [cache])

    def _prefill_together(self, group: list[Request]) -> Sampled:
        """Rows `[k, T]` padded at the end (causal attention keeps a row's real tokens from seeing
        its padding, so each row is exact), the last real position's logits of each; then each
        row's first positions become that request's single caches (views, no copies)."""
        longest = max(len(r.prompt_ids) for r in group)
        padded = [r.prompt_ids + [0] * (longest - len(r.prompt_ids)) for r in group]
        try:
            cache = self.model.make_cache(self.cache)
            last = [len(r.prompt_ids) - 1 for r in group]
            logits = prefill_pass(self.model, mx.array(padded), cache, last)  # [k, vocab]
        except Exception as e:
            self._stop_if_split()
            return Sampled.failed(group, f"prefill failed: {e}")
        for request in group:
            request.prefilled = len(request.prompt_ids)
            self._draft_prefill(request)
        caches = [self._row_caches(cache, row, len(r.prompt_ids)) for row, r in enumerate(group)]
        return self._first_tokens(group, logits, caches)

    def _draft_prefill(self, request: Request) -> None:
        """A request that drafts with the engine's draft model, where drafting pays: the draft
        prefills the prompt tokens the target just has (DraftBatch.prefill), so that its first
        proposal does not stall the batch's decode pass with them. Where it does not (yet), a
        row's draft prefills when it first drafts, if it ever does: a draft nearly as slow as
        the model doubled every prefill on a CPU for nothing (bench_draft.py, batch of 8)."""
        member = request.proposer
        if not isinstance(member, DraftModel) or member.batch is not self.drafts:
            return
        if member.pending is None and not self._drafting_pays():
            return
        try:
            member.batch.prefill(member, request.prompt_ids[len(member.seen) : request.prefilled])
        except Exception as e:  # (the draft's pass failed): this request decodes plainly
            request.proposer = None
            logger.warning(
                "request %s stops speculating: its draft model failed: %s", request.id, e
            )

    def _first_tokens(self, requests: list[Request], logits: mx.array, caches: list) -> Sampled:
        """Sample prefilled requests' first tokens (row r of `logits` is requests[r]'s, `caches[r]`
        its single caches, which it keeps until it joins the batch)."""
        tokens, lps, checks = [], [], []
        errors: dict[int, str] = {}
        for row, request in enumerate(requests):
            request.cache = caches[row]
            token, lp, check, error = _sample(request, logits[row : row + 1])
            tokens.append(token)
            lps.append(lp)
            checks.append(check)
            if error is not None:
                errors[row] = error
        bad = _bad_logits(logits, checks)
        states = [c.state for cache in caches for c in cache]
        try:
            mx.eval(tokens, lps, bad, states)
            values = _ints(mx.concatenate(tokens))
            host = [_to_host(lp) for lp in lps]
        except Exception as e:
            self._stop_if_split()
            return Sampled.failed(requests, f"prefill failed: {e}")
        _bad_rows(_ints(bad), errors)
        return Sampled(requests, values, host, errors)

    def _stop_if_split(self) -> None:
        """Called in an `except` whose pass failed: alone, its requests fail and the engine goes
        on; over ranks, the ranks are out of step (a transfer failed, or one rank's pass did),
        so the exception stops the engine (engine.py) on this rank."""
        if self.model.ranks is not None:
            raise

    @property
    def ring_size(self) -> int | None:
        """The smallest rotating cache's size (None without one): the longest prompt a padded
        pass of several may hold, since padding must not evict real tokens."""
        return min((c.max_size for c in self.whole if isinstance(c, RotatingKVCache)), default=None)

    # -- the batch -------------------------------------------------------------------------------

    def join(self, request: Request) -> None:
        """A prefilled request takes the next batch row; its single caches are copied in and go."""
        cache = _caches(request)
        if not len(self.rows):  # the first row decides whether the rings get slack
            self._new_batch(speculating=request.proposer is not None)
        self.rows.add(cache[0].offset)
        for batch, single in zip(self.batch, cache, strict=True):
            batch.add_row(single)
        request.cache = None

    def leave(self, row: int) -> None:
        """Drop a batch row (the last row moves into its place); an empty batch gives its memory
        back."""
        remove_row(self.rows, self.batch, row)
        if not len(self.rows):
            self._new_batch()
            if self.drafts is not None:
                self.drafts.clear()  # (every drafting request has gone too)

    def row_kv_bytes(self, row: int) -> int:
        """A row's share of the batch caches: the slots it fills."""
        return sum(c.row_nbytes(self.rows.offsets[row]) for c in self.batch)

    @property
    def batch_rows(self) -> int:
        return max((c.n_rows for c in self.batch), default=0)

    @property
    def batch_slots(self) -> int:
        """Slots the batch holds (0 over ranks: a stage of windowed layers holds fewer than the
        whole model's, and admission must not depend on the stage)."""
        if self.split:
            return 0
        return max((c.capacity for c in self.batch), default=0)

    def _new_batch(self, speculating: bool = False) -> None:
        """Empty batch caches. Their rings hold RING_SLACK more slots when the batch starts with
        a speculating row: a verify pass must not overwrite keys it reads. Only then, since the
        slack's older keys need a mask every step, which keeps a decode step off the CPU's
        prefix-mask kernel (batch_cache.py). A batch without it checks no proposals while it
        has rings (`verifiable`): its rows decode plainly, which generates the same tokens."""
        slack = RING_SLACK if speculating else 0
        self.rows, self.batch = make_batch_cache(self.template, self.max_batch, slack)
        self.verifiable = slack > 0 or all(c.max_size is None for c in self.batch)
        self._ahead = None  # a step queued for rows that have all gone

    # -- decode ----------------------------------------------------------------------------------

    def decode(self, requests: list[Request]) -> Sampled:
        """One token for every batch row (`requests[r]` owns row r). On a GPU (`run_ahead`) the
        next step is queued before this one's tokens are read back, so the device never waits for
        the host; its rows are the ones running then, and a row that finishes meanwhile has
        computed one token too many, which the scheduler drops (its request is finished)."""
        proposals = self._proposals(requests) if self._ahead is None and self.verifiable else {}
        for request in requests:  # each speculating row's record decays a step (to nothing)
            if request.proposer is not None:
                request.spec_accepted = decayed(request.spec_accepted)
                request.spec_rejected = decayed(request.spec_rejected)
        if proposals and not self.split:  # (over ranks no clock decides: they must agree)
            proposals = self._worth_a_pass(requests, proposals)
        if proposals:
            return self._verify(requests, proposals)
        started = time.perf_counter()
        timed = self._ahead is None  # a step queued before this call: not its own time
        try:
            if self._ahead is not None:
                step, self._ahead = self._ahead, None
            else:
                step = self._queue(requests, mx.array([r.last_token for r in requests]))
            if self.run_ahead and not any(r.proposer is not None for r in requests):
                self._ahead = self._queue(requests, self._inputs_after(step, requests))
                timed = False  # (the next step overlaps this one)
            values, bad = _ints(step.tokens), _ints(step.bad)  # waits for the step
            lps = [_to_host(lp) for lp in step.lps]
        except Exception as e:  # the whole step failed: every running request ends
            self._stop_if_split()
            self._ahead = None
            return Sampled.failed(list(requests), f"decode step failed: {e}")
        if timed:
            self.step_seconds = time.perf_counter() - started
            self.pass_cost.observe(len(step.requests), self.step_seconds)
        _bad_rows(bad, step.failed)
        return Sampled(step.requests, values, lps, step.failed)

    # -- speculative decoding (speculative.py) ----------------------------------------------------

    def _proposals(self, requests: list[Request]) -> dict[int, list[int]]:
        """Each speculating row's proposals (rows with none are left out): as many as its record
        says are worth checking (speculative.draft_length), at most its num_draft, and fewer
        than the tokens its budget has left (the last one is the model's own); for a row a draft
        model proposes for, only those worth what drafting them costs (`_draft_cost`); and for
        a row not in the draft's batch yet, which would first prefill its whole history there,
        none unless drafting pays at all (`_drafting_pays`)."""
        proposals = {}
        least = worth()
        wanted: list[tuple[int, Request, int, list[int]]] = []  # (row, request, k, history)
        for row, request in enumerate(requests):
            if request.proposer is None or request.stream is None:
                continue
            generated = request.stream.tokens
            k = draft_length(
                request.params.num_draft, request.spec_accepted, request.spec_rejected, least
            )
            k = min(k, request.max_tokens - len(generated) - 1)
            if k > 0:
                wanted.append((row, request, k, [*request.prompt_ids, *generated]))
        drafters = sum(isinstance(r.proposer, DraftModel) for _, r, _, _ in wanted)
        step = self._step_estimate(len(requests)) if drafters else None
        untimed = False  # a draft not timed yet ran this pass: the others wait for its figure
        pays: bool | None = None  # whether drafting pays here at all (asked once, if needed)
        drafting: list[tuple[int, Request, list[int], int]] = []  # asked of the draft below
        for row, request, k, history in wanted:
            draft = request.proposer if isinstance(request.proposer, DraftModel) else None
            if draft is not None:  # proposals that cost passes of a draft model
                cost = self._draft_cost(draft.batch, len(requests), drafters)
                joined = draft in draft.batch.members or draft.pending is not None
                if cost is None or step is None:  # one row a pass until both are known: one
                    if untimed or not (joined or not draft.batch.members):  # that joined, if any
                        continue
                    untimed = True
                else:
                    pays = self._drafting_pays() if pays is None else pays
                    if not (pays or joined):
                        continue  # (it would first prefill its history in the draft, for nothing)
                    alpha = acceptance(request.spec_accepted, request.spec_rejected)
                    k = affordable(k, alpha, step, len(requests), cost)
                    if k <= 0:
                        continue
            if draft is not None and draft.batch is self.drafts:
                drafting.append((row, request, history, k))  # (all of them at once, below)
                continue
            try:
                found = request.proposer.propose(history, k)  # type: ignore[attr-defined]
            except Exception as e:  # (a proposer of a test's failed): this row decodes plainly
                request.proposer = None
                logger.warning(
                    "request %s stops speculating: its proposer failed: %s", request.id, e
                )
                continue
            if found:
                proposals[row] = found
        if self.drafts is not None:
            proposals |= self._drafted(requests, drafting)
        return proposals

    def _drafting_pays(self) -> bool:
        """Whether a proposal sure to be accepted is worth drafting in a batch like the present
        one, every row drafting (known once the draft and the passes have been timed)."""
        rows = max(1, len(self.rows))
        step = self._step_estimate(rows)
        cost = None if self.drafts is None else self._draft_cost(self.drafts, rows, rows, True)
        return step is not None and cost is not None and affordable(1, 1.0, step, rows, cost) > 0

    def _draft_cost(
        self, drafts: DraftBatch, rows: int, drafters: int, strict: bool = False
    ) -> float | None:
        """What one more proposal costs each of `drafters` rows of a batch of `rows`: a step of
        the draft's batch of those rows, and the position it adds to the verify pass (every
        row's: on a CPU about a step of the batch, on a GPU little), shared between them. The
        draft's step was timed at some number of rows; at others it is taken to grow as the
        model's own steps do (the timed passes: on a CPU nearly with the rows, on a GPU
        little). Until passes of two sizes are timed, as on a CPU: the draft's step in
        proportion to the rows, and the extra position a plain step (which stops the drafting,
        so that plain steps teach the passes' costs); or None with `strict`. None until the
        draft has been timed."""
        predict = self.pass_cost.predict
        at, timed = predict(drafters), predict(drafts.step_rows)
        one, two = predict(rows), predict(2 * rows)
        known = None not in (at, timed, one, two)
        if drafts.step_seconds is None or (strict and not known):
            return None
        if known:
            step = drafts.step_seconds * cast(float, at) / cast(float, timed)
            wider = max(0.0, cast(float, two) - cast(float, one))
        else:
            plain = self._step_estimate(rows)
            if plain is None:
                return None
            step = drafts.step_seconds * drafters / max(1, drafts.step_rows)
            wider = plain
        return (step + wider) / max(1, drafters)

    def _drafted(
        self, requests: list[Request], drafting: list[tuple[int, Request, list[int], int]]
    ) -> dict[int, list[int]]:
        """The draft model's proposals for the rows asking it, from one batch (DraftBatch); the
        rows of requests no longer drafting leave it first."""
        drafts = cast(DraftBatch, self.drafts)
        drafts.retain({r.proposer for r in requests if isinstance(r.proposer, DraftModel)})
        if not drafting:
            return {}
        asks = [(cast(DraftModel, r.proposer), history, k) for _, r, history, k in drafting]
        try:
            found = drafts.propose(asks)
        except Exception as e:  # (the draft's pass failed): these rows decode plainly
            drafts.clear()
            for _, request, _, _ in drafting:
                request.proposer = None
                logger.warning(
                    "request %s stops speculating: its draft model failed: %s", request.id, e
                )
            return {}
        return {row: d for (row, _, _, _), d in zip(drafting, found, strict=True) if d}

    def _step_estimate(self, rows: int) -> float | None:
        """Seconds a plain step of `rows` rows takes: from the timed passes' fit, else the last
        plain step, else the last verify pass per position (a CPU's passes cost about that much
        a position; on a GPU it is an underestimate, so drafting starts cautiously)."""
        estimate = self.pass_cost.predict(rows) or self.step_seconds
        if estimate is None and self.last_pass is not None:
            positions, seconds = self.last_pass
            estimate = seconds / positions
        return estimate

    def _worth_a_pass(
        self, requests: list[Request], proposals: dict[int, list[int]]
    ) -> dict[int, list[int]]:
        """The proposals this step checks: each row's cut to the width that is expected to keep
        the most tokens a second (speculative.width, from the timed passes); none when a plain
        step does better. What the rows generate is the same either way (up to the float
        rounding between a wide pass and a one-token step, at near ties, as with batching)."""
        alphas = {
            row: acceptance(requests[row].spec_accepted, requests[row].spec_rejected)
            for row in proposals
        }
        t = width(self.pass_cost, len(requests), proposals, alphas)
        return {row: d[: t - 1] for row, d in proposals.items()} if t > 1 else {}

    def _verify(self, requests: list[Request], proposals: dict[int, list[int]]) -> Sampled:
        """One pass over every row's last token and its proposals (rows without any: an ordinary
        decode step, padded), then each row's tokens: the accepted proposals and one of the
        model's own. The caches keep exactly those (Rows.advance by each row's count)."""
        requests = list(requests)
        positions = 1 + max(len(d) for d in proposals.values())
        inputs = []
        for row, request in enumerate(requests):
            d = proposals.get(row, [])
            inputs.append([request.last_token, *d] + [0] * (positions - 1 - len(d)))
        failed: dict[int, str] = {}
        started = time.perf_counter()
        try:
            logits = verify_step(self.model, mx.array(inputs), self.batch)  # [rows, T, vocab]
            verdicts: dict[int, Verdict] = {}
            raw_bad: dict[int, mx.array] = {}
            plain: dict[int, tuple] = {}  # rows without proposals: (token, logprobs)
            checks: list[mx.array | None] = [None] * len(requests)
            for row, request in enumerate(requests):
                if row not in proposals:
                    token, lp, checks[row], error = _sample(request, logits[row, :1])
                    plain[row] = (token, lp)
                    if error is not None:
                        failed[row] = error
                    continue
                d = proposals[row]
                try:
                    sampler = cast(Sampler, request.sampler)
                    verdicts[row] = verify(sampler, logits[row, : len(d) + 1], d)
                    raw_bad[row] = invalid_logits(logits[row, : len(d) + 1])  # the model's own
                except Exception as e:
                    failed[row] = f"sampling failed: {e}"
            # every row's first position, as a decode step checks it (a verified row's further
            # positions below)
            bad = _bad_logits(logits[:, 0], checks)
            mx.eval(
                [v.arrays() for v in verdicts.values()],
                list(raw_bad.values()),
                [[a for a in p if a is not None] for p in plain.values()],
                bad,
                [c.state for c in self.batch],
            )
            _bad_rows(_ints(bad), failed)
            tokens: list[int] = []
            lps: list = []
            more: dict[int, list[int]] = {}
            more_lps: dict[int, list[TokenLogprobs | None]] = {}
            counts = []
            for row, request in enumerate(requests):
                if row in plain:
                    token, lp = plain[row]
                    tokens.append(int(token.item()))
                    lps.append(_to_host(lp))
                    counts.append(1)
                    continue
                if row not in verdicts:  # its sampler failed
                    lps.append(None)
                    tokens.append(-1)
                    counts.append(1)
                    continue
                kept, invalid = verdicts[row].tokens()
                if any(cast(list[bool], raw_bad[row].tolist())[: len(kept)]):
                    failed.setdefault(row, BAD_LOGITS[1])  # (as a decode step says it)
                elif invalid:
                    failed.setdefault(row, BAD_LOGITS[2])
                sampler = cast(Sampler, request.sampler)
                sampler.record(kept)
                if (key := verdicts[row].key_after(len(kept))) is not None:
                    sampler.key = key
                request.draft_tokens += len(proposals[row])
                request.accepted_draft_tokens += len(kept) - 1
                _count_positions(request, len(proposals[row]), len(kept) - 1)
                request.spec_accepted += len(kept) - 1
                request.spec_rejected += len(kept) - 1 < len(proposals[row])
                tokens.append(kept[0])
                more[row] = kept[1:]
                # each kept token's logprobs from its own position's logits (a decode step's)
                lp = _logprobs(request, logits[row, : len(kept)], mx.array(kept))
                kept_lps = [_to_host(_at(lp, i)) for i in range(len(kept))]
                lps.append(kept_lps[0])
                more_lps[row] = kept_lps[1:]
                counts.append(len(kept))
            self.rows.advance(counts)
        except Exception as e:  # the whole pass failed: every running request ends
            self._stop_if_split()
            return Sampled.failed(requests, f"decode step failed: {e}")
        seconds = time.perf_counter() - started
        self.pass_cost.observe(len(requests) * positions, seconds)
        self.last_pass = (positions, seconds)
        return Sampled(requests, tokens, lps, failed, more=more, more_logprobs=more_lps)

    def _queue(self, requests: list[Request], inputs: mx.array) -> _Step:
        """Build (lazily) and start one decode step for the batch rows, fed `inputs` `[rows]`."""
        requests = list(requests)
        logits = decode_step(self.model, inputs, self.batch)  # [rows, vocab]
        self.rows.advance()
        plain = [r.params.plain_greedy for r in requests]
        argmax = mx.argmax(logits, axis=-1) if any(plain) else None
        failed: dict[int, str] = {}
        lps: list = [None] * len(requests)
        checks: list[mx.array | None] = [None] * len(requests)
        if argmax is not None and all(plain):  # greedy rows never run the sampling chain
            tokens = argmax.astype(mx.uint32)
        else:
            picked = []
            for row, request in enumerate(requests):
                if argmax is not None and plain[row]:
                    picked.append(argmax[row : row + 1].astype(mx.uint32))
                    continue
                token, lps[row], checks[row], error = _sample(request, logits[row : row + 1])
                picked.append(token)
                if error is not None:  # a sampler that fails stops its own request only
                    failed[row] = error
            tokens = mx.concatenate(picked) if len(picked) > 1 else picked[0]
        bad = _bad_logits(logits, checks)
        mx.async_eval(
            tokens, bad, [lp for lp in lps if lp is not None], [c.state for c in self.batch]
        )
        return _Step(requests, tokens, lps, bad, failed)

    def _inputs_after(self, step: _Step, requests: list[Request]) -> mx.array:
        """The batch rows' next inputs: `step`'s tokens (still on the device) for the rows it
        computed, the last token for rows that joined since."""
        position = {id(r): i for i, r in enumerate(step.requests)}
        joined = [r.last_token for r in requests if id(r) not in position]
        index, extra = [], len(step.requests)
        for request in requests:
            if id(request) in position:
                index.append(position[id(request)])
            else:
                index.append(extra)
                extra += 1
        if not joined and index == list(range(len(step.requests))):
            return step.tokens
        tokens = step.tokens
        if joined:
            tokens = mx.concatenate([tokens, mx.array(joined, dtype=tokens.dtype)])
        return tokens[mx.array(index)]

    # -- the prefix cache ------------------------------------------------------------------------

    def remember(self, token_ids: list[int], caches: list) -> None:
        """Keep an entry in the prefix cache. It is only a speed-up: if keeping it fails, the
        request and the engine go on without it."""
        if self.prefix_cache is None:
            return
        try:
            self.prefix_cache.store(token_ids, caches)
        except Exception:
            self._stop_if_split()  # (over ranks, the others kept it: they would plan otherwise)

    def store_conversation(self, token_ids: list[int], row: int) -> None:
        """Keep the KV of a finished request's prompt and reply (`token_ids`): the next turn of a
        chat starts with both. The row holds the first `offset` of them (the last one generated,
        unless a step ran ahead, was never fed to the model; a verify pass may have fed it tokens
        past the one the request finished at, which are not kept)."""
        n = min(self.rows.offsets[row], len(token_ids))
        ring = self.ring_size  # (the whole model's: see __init__)
        if self.prefix_cache is None or (ring is not None and n > ring):
            return  # a ring has overwritten the start
        self.remember(token_ids[:n], self._row_caches(self.batch, row, n))

    def _row_caches(self, caches: list, row: int, n: int) -> list:
        """Single-sequence caches holding the first `n` positions of row `row` of `caches` (a
        batch's, or a padded group prefill's): views, no copies."""
        views = self.model.make_cache(self.cache)
        for view, cache in zip(views, caches, strict=True):
            view.fill(_row(cache.keys, row, n), _row(cache.values, row, n), n)
        return views


@dataclass
class _Step:
    """A decode step, queued on the device: row r's results belong to requests[r]."""

    requests: list[Request]
    tokens: mx.array  # [rows]
    lps: list  # per row: (chosen logprob, top ids, top logprobs) arrays, or None
    bad: mx.array  # [rows] uint8: 0, or the key in BAD_LOGITS of what went wrong
    failed: dict[int, str]  # rows whose sampler raised, and why


BAD_LOGITS = {
    1: "the model produced NaN or infinite logits",
    2: "sampling produced NaN or infinite logits (after the penalties, filters and temperature)",
}


def _bad_logits(logits: mx.array, checks: list) -> mx.array:
    """Per row `[rows]` uint8: 1 if the model's logits cannot be sampled from (NaN, +inf, or
    every token -inf), 2 if a sampling stage made them so (`checks[r]` is row r's sampler's own
    check, `[1]` bool, or None where no sampler ran), else 0. Either ends the request with an
    error: the draw would be garbage."""
    model_bad = invalid_logits(logits)
    if all(c is None for c in checks):
        return model_bad.astype(mx.uint8)
    stage_bad = mx.concatenate([mx.zeros((1,), mx.bool_) if c is None else c for c in checks])
    return mx.where(model_bad, 1, mx.where(stage_bad, 2, 0)).astype(mx.uint8)


def _bad_rows(bad: list[int], errors: dict[int, str]) -> None:
    """Rows whose logits could not be sampled from join `errors` (a failed sampler says why
    first)."""
    for row, code in enumerate(bad):
        if code and row not in errors:
            errors[row] = BAD_LOGITS[code]


def _sample(
    request: Request, logits: mx.array
) -> tuple[mx.array, object, mx.array | None, str | None]:
    """One row's logits `[1, vocab]` through its request's sampler: (token `[1]` uint32, its
    logprobs arrays or None, the sampler's own check of its logits, None); a sampler that raises
    gives a placeholder token, no check, and the reason instead of None."""
    sampler = request.sampler
    if sampler is None:
        raise RuntimeError(f"request {request.id} was sampled before it started")
    try:
        token = sampler(logits)
        return token.astype(mx.uint32), _logprobs(request, logits, token), sampler.invalid, None
    except Exception as e:
        return mx.zeros((1,), mx.uint32), None, None, f"sampling failed: {e}"


def _caches(request: Request) -> list:
    """A prefilling request's single-sequence caches (Runner.start made them)."""
    if request.cache is None:
        raise RuntimeError(f"request {request.id} has no caches: it was never started")
    return request.cache


def _ints(a: mx.array) -> list[int]:
    """A 1-d integer array's values on the host (waits for it)."""
    return cast(list[int], a.tolist())


def _logprobs(request: Request, logits: mx.array, token: mx.array):
    n = request.params.logprobs
    if not n:
        return None
    all_lp, top_ids, top_lp = top_logprobs(logits, n)
    return mx.take_along_axis(all_lp, token[:, None], axis=-1), top_ids, top_lp


def _at(lp, i: int):
    """Position i of `_logprobs` over several positions (None stays None)."""
    return None if lp is None else tuple(a[i : i + 1] for a in lp)


def _row(stored: tuple, row: int, n: int) -> tuple:
    """The first n slots of one row, `[1, kv_heads, n, ...]`."""
    return tuple(a[row : row + 1, :, :n] for a in stored)


def _to_host(lp) -> TokenLogprobs | None:
    if lp is None:
        return None
    chosen, ids, values = lp
    return TokenLogprobs(chosen.item(), list(zip(ids[0].tolist(), values[0].tolist(), strict=True)))


def _count_positions(request: Request, proposed: int, accepted: int) -> None:
    """A pass's proposals by position: the first `accepted` were accepted, and the one after them
    (if any was proposed) reached and rejected."""
    reached = min(accepted + 1, proposed)
    for counts in (request.draft_reached, request.draft_accepted_at):
        counts.extend([0] * (proposed - len(counts)))
    for j in range(reached):
        request.draft_reached[j] += 1
    for j in range(accepted):
        request.draft_accepted_at[j] += 1
