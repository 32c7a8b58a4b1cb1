"""Continuous batching: many requests share the model, joining the running batch as soon as there
is room and leaving as they finish. The scheduler decides; the runner (runner.py) runs:

    step():  plan = schedule()          admission, and this step's work, by the policy
             sampled = runner.<plan>    the prefill pass or decode step, on the model
             update(sampled)            responses, statuses, batch rows joining and leaving

A request's status (request.py) says where it is: WAITING -> PREFILLING -> RUNNING -> FINISHED.

The policies, and what each trades:

    prefill-first  any admitted prompt is prefilled (a chunk at a time, back to back) before the next
                   decode step. Best time to first token; running requests stall while prompts
                   are prefilled, so their inter-token latency has spikes.
    decode-first   new requests are admitted only when nothing is running; then all admitted are
                   prefilled and decode together until the last one finishes (static batching).
                   Once the batch decodes, no prompt interrupts it: the best inter-token latency
                   (while the batch is being filled, a request whose prompt was prefilled first
                   waits for the others' before its second token). A request that arrives
                   meanwhile waits for the whole batch: the worst time to first token.
    chunked        each step is one decode step for the running rows plus one prefill chunk of
                   `step_tokens - rows` prompt tokens (vLLM's chunked prefill, here as two passes
                   in one step; with a speculating row, every row counts the widest row's
                   positions, its last token and up to num_draft proposals: a verify pass).
                   Stalls are bounded by a chunk; prompts take several steps.

Admission: at most `max_batch` requests prefilling or running, and the KV memory they need (the
batch's storage is padded to its longest row, rows allocated in powers of two) within the budget.

One thread owns a scheduler (MLX streams belong to the thread that made them); the Engine runs it
on its own thread, stream_generate and batch_generate on the caller's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from .batch_cache import RING_SLACK
from .cache import CacheSpec, kv_bytes_per_token
from .metrics import RequestMetrics, request_metrics
from .model import Model
from .prefix_cache import PrefixCache
from .request import Request, Status
from .responses import GenerationResponse, TextStream
from .runner import Runner, Sampled
from .speculative import NO_DRAFT, DraftModel, check_draft, draft_cache_bytes
from .steps import DEFAULT_PREFILL_CHUNK
from .tokenizer import Tokenizer

__all__ = ["POLICIES", "EngineOptions", "Plan", "Request", "Scheduler", "Status", "token_budget"]

POLICIES = ("prefill-first", "decode-first", "chunked")
MIN_CHUNK = 16  # a chunked step always advances a waiting prompt by at least this many tokens

Event = tuple[Request, GenerationResponse]


@dataclass
class Plan:
    """One step's work, as the scheduler decided it."""

    decode: bool = False  # one decode step for every running row, first
    prefill: list[Request] = field(default_factory=list)  # one request's chunk, or fresh prompts
    chunk: int = 0  # prompt tokens for a lone request's prefill
    failed: list[tuple[Request, str]] = field(default_factory=list)  # could not start, and why


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs, checked once when made, passed whole (Engine, batch_generate and
    stream_generate build one from their keywords): at most `max_batch` requests at once, the
    `policy` (see above), `kv_budget_mb` bounding their KV cache (None: no bound), `prefill_chunk`
    prompt tokens per pass (None: 512, or 128 a step under "chunked"), `prefix_cache_mb` for the
    prefix cache (0: off), the KV cache kind (`cache`), and a draft model for speculative
    decoding (`draft_model`, a loaded model sharing the tokenizer; requests ask for it with
    SamplingParams(speculation="draft"))."""

    max_batch: int = 8
    policy: str = "prefill-first"
    kv_budget_mb: float | None = None
    prefill_chunk: int | None = None
    prefix_cache_mb: float = 0
    cache: CacheSpec = field(default_factory=CacheSpec)
    draft_model: Model | None = None

    def __post_init__(self) -> None:
        check_engine_options(
            self.max_batch, self.policy, self.kv_budget_mb, self.prefill_chunk, self.prefix_cache_mb
        )
        if not isinstance(self.cache, CacheSpec):
            raise ValueError(f"cache must be a CacheSpec, got {type(self.cache).__name__}")

    @property
    def chunk(self) -> int:
        """Prompt tokens per prefill pass (a step's tokens under "chunked")."""
        default = 128 if self.policy == "chunked" else DEFAULT_PREFILL_CHUNK
        return self.prefill_chunk or default


class Scheduler:
    """Runs requests to completion in batches. Not thread-safe: one thread calls add/cancel/step."""

    def __init__(self, model: Model, tokenizer: Tokenizer, options: EngineOptions | None = None):
        options = options or EngineOptions()
        self.options = options
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = options.max_batch
        self.policy = options.policy
        budget = options.kv_budget_mb
        self.kv_budget = None if budget is None else budget * 2**20
        self.prefill_chunk = options.chunk
        mb = options.prefix_cache_mb
        per_token = None
        if model.ranks is not None:  # every rank must keep and evict the same entries: count
            spec = options.cache  # them in the whole model's bytes, not this rank's part
            itemsize = model.compute_dtype.size
            per_token = kv_bytes_per_token(
                model.whole_config, spec.kv_bits, spec.kv_group_size, itemsize
            )
        prefix_cache = PrefixCache(int(mb * 2**20), per_token) if mb else None
        check_draft(model, options.draft_model, tokenizer.vocab_size)
        self.runner = Runner(
            model, options.cache, self.max_batch, prefix_cache, options.draft_model
        )
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []  # running[r] owns batch row r
        self.partial_prefill = False  # the last step only advanced a prompt, more chunks to come

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.runner.prefix_cache

    # -- admission -------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuse a request that can never run (ValueError saying why), and clip its max_tokens
        to the context its prompt leaves: the one rule every entry point (stream_generate,
        batch_generate, Engine.submit) gets by coming here."""
        request.params.check_vocab(self.model.config.vocab_size)
        if request.params.speculation == "draft" and self.options.draft_model is None:
            raise ValueError(NO_DRAFT)
        request.max_tokens = token_budget(self.model, request.prompt_ids, request.max_tokens)
        need = len(request.prompt_ids) + request.max_tokens
        rows = self.model.config.vocab_size
        if past := [t for t in request.prompt_ids if t >= rows]:
            raise ValueError(
                f"prompt holds token {past[0]} ({self.tokenizer.decode([past[0]])!r}), an added "
                f"token of the tokenizer past the model's {rows} embedding rows"
            )
        alone = self.kv_bytes(1, need) + self.kv_bytes(1, len(request.prompt_ids))
        draft = 0
        if _drafts(request):  # its row of the draft's batch, and its prompt before it joins
            draft = self.draft_bytes(1, need + request.params.num_draft)
            draft += self.draft_bytes(1, len(request.prompt_ids))  # (as _drafts_fit counts)
        if self.kv_budget is not None and alone + draft > self.kv_budget:
            mine = f", the draft model's {draft / 2**20:.1f} MB of it" if draft else ""
            error = DraftBudgetError if alone <= self.kv_budget else ValueError
            raise error(
                f"the request needs {(alone + draft) / 2**20:.1f} MB of KV cache (prompt "
                f"{len(request.prompt_ids)} + max_tokens {request.max_tokens} tokens{mine}), "
                f"more than kv_budget_mb={self.kv_budget / 2**20:g}"
            )

    def kv_bytes(self, rows: int, length: int) -> int:
        """Bytes of KV storage for `rows` rows of `length` tokens, as the caches allocate it; for a
        model split over ranks, the whole model's (all ranks together: every rank then admits
        the same requests)."""
        itemsize = self.model.compute_dtype.size
        config = self.model.whole_config
        return self.options.cache.nbytes(config, length, rows, itemsize, RING_SLACK)

    def draft_bytes(self, rows: int, length: int) -> int:
        """Bytes of the draft model's caches for `rows` rows of `length` tokens, as its batch
        (speculative.DraftBatch) allocates them: growing in every layer, windowed or not, in
        slots of 256."""
        draft = self.options.draft_model
        return 0 if draft is None else draft_cache_bytes(draft, rows, length)

    def _drafts_fit(self, active: list[Request]) -> int:
        """The draft's bytes for the `active` requests that draft: its batch padded as the
        target's is (rows in powers of two, every row the longest's slots, never less than it
        holds now), and the prompts of those not in it yet, prefilled alone first."""
        drafting = [r for r in active if _drafts(r)]
        if not drafting:
            return 0
        drafts = self.runner.drafts
        held_rows, held_slots = (0, 0) if drafts is None else drafts.held
        rows = max(held_rows, min(self.max_batch, 1 << (len(drafting) - 1).bit_length()))
        longest = max(len(r.prompt_ids) + r.max_tokens + r.params.num_draft for r in drafting)
        joining = [
            len(r.prompt_ids)
            for r in drafting
            if drafts is None or r.proposer not in drafts.members
        ]
        return self.draft_bytes(rows, max(held_slots, longest)) + sum(
            self.draft_bytes(1, n) for n in joining
        )

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def _admit(self) -> None:
        if self.policy == "decode-first" and (self.running or self.prefilling):
            return
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
            request = self.waiting[0]
            if not self._fits(request):
                break  # first come, first served: no overtaking
            self.waiting.popleft()
            request.admitted = time.perf_counter()
            request.status = Status.PREFILLING
            self.prefilling.append(request)

    def _fits(self, request: Request) -> bool:
        if self.kv_budget is None:
            return True
        active = self.running + self.prefilling + [request]
        longest = max(len(r.prompt_ids) + r.max_tokens for r in active)
        rows = max(self.batch_rows, min(self.max_batch, 1 << (len(active) - 1).bit_length()))
        slots = max(self.batch_slots, longest)
        prefills = sum(self.kv_bytes(1, len(r.prompt_ids)) for r in active if not r.started)
        drafts = self._drafts_fit(active)
        return self.kv_bytes(rows, slots) + prefills + drafts <= self.kv_budget

    @property
    def batch(self) -> list:
        """The batch caches, a row per running request (the runner's)."""
        return self.runner.batch

    @property
    def batch_rows(self) -> int:
        return self.runner.batch_rows

    @property
    def batch_slots(self) -> int:
        return self.runner.batch_slots

    # -- deciding --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def schedule(self) -> Plan:
        """Admit what fits, then decide this step's work by the policy. Prompts about to be
        prefilled are started here (caches made, the prefix cache consulted), since what the
        prefix cache holds decides whether a prompt goes with others."""
        self._admit()
        plan = Plan()
        if self.policy == "chunked":
            budget = self.prefill_chunk
            if self.running:
                plan.decode = True
                # (a verify pass pads every row to the widest's positions)
                budget -= len(self.running) * max(_pass_tokens(r) for r in self.running)
            if self.prefilling:
                self._start(self.prefilling[0], plan)
                plan.prefill, plan.chunk = self._prefill_group(plan), max(budget, MIN_CHUNK)
        elif self.prefilling:  # prefill-first, or decode-first filling its batch
            plan.prefill = self._together(plan)
            if not plan.prefill:
                self._start(self.prefilling[0], plan)
                plan.prefill, plan.chunk = self._prefill_group(plan), self.prefill_chunk
        elif self.running:
            plan.decode = True
        return plan

    def _start(self, request: Request, plan: Plan) -> None:
        if request.started:
            return
        try:
            self.runner.start(request)
        except Exception as e:  # this request fails; the others are untouched
            if self.model.ranks is not None:  # over ranks, unless it failed on this rank alone
                raise  # (the engine stops: see Runner._stop_if_split)
            plan.failed.append((request, f"prefill failed: {e}"))
        request.stream = TextStream(self.tokenizer, request.params, request.max_tokens)

    def _prefill_group(self, plan: Plan) -> list[Request]:
        """The first prefilling request, unless it failed to start."""
        failed = {id(r) for r, _ in plan.failed}
        return [r for r in self.prefilling[:1] if id(r) not in failed]

    def _together(self, plan: Plan) -> list[Request]:
        """Several fresh prompts for one padded pass, when they fit in one chunk: no prefix-cache
        hit among them (a hit goes alone, for what the cache did not hold). Empty when fewer than
        two qualify."""
        limit = self.prefill_chunk // 2
        if (ring := self.runner.ring_size) is not None:
            limit = min(limit, ring)
        group: list[Request] = []
        longest = 0
        for request in self.prefilling:
            n = len(request.prompt_ids)
            if request.prefilled or n > limit:  # a prompt under way goes on alone
                continue
            if (len(group) + 1) * max(longest, n) > self.prefill_chunk:
                break
            group.append(request)
            longest = max(longest, n)
        if len(group) < 2:
            return []
        for request in group:
            self._start(request, plan)
        failed = {id(r) for r, _ in plan.failed}
        group = [r for r in group if id(r) not in failed and not r.prefilled]
        return group if len(group) >= 2 else []

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """One unit of work; returns the responses it produced, in order."""
        plan = self.schedule()
        mx.reset_peak_memory()  # process-wide: each step's peak is charged to its requests
        events = []
        for request, reason in plan.failed:
            self.prefilling.remove(request)
            events.append(self._leave(request, "error", reason))
            request.cache = None
        if plan.decode:
            events += self._update_decode(self.runner.decode(self.running))
        self.partial_prefill = False
        if plan.prefill:
            sampled = self.runner.prefill(plan.prefill, plan.chunk)
            self.partial_prefill = sampled is None and not plan.decode
            if sampled is None:  # a chunk that was not its prompt's last
                request = plan.prefill[0]
                if request.progress is not None:
                    request.progress(request.prefilled, len(request.prompt_ids))
            else:
                events += self._update_prefilled(sampled)
        peak = mx.get_peak_memory()
        for request in self.running + self.prefilling:
            request.peak_memory = max(request.peak_memory, peak)
        return events

    def _update_prefilled(self, sampled: Sampled) -> list[Event]:
        """Prefilled requests got their first tokens: answer them; the unfinished join the batch."""
        events = []
        for row, request in enumerate(sampled.requests):
            self.prefilling.remove(request)
            if row in sampled.errors:
                events.append(self._leave(request, "error", sampled.errors[row]))
                request.cache = None
                continue
            if request.cache is not None:
                self.runner.remember(request.prompt_ids, request.cache)
            at = sampled.at
            events.append(self._emit(request, sampled.tokens[row], sampled.logprobs[row], at))
            if not request.finished:
                self.runner.join(request)
                request.status = Status.RUNNING
                self.running.append(request)
            request.cache = None  # the batch holds its keys and values now
        return events

    def _update_decode(self, sampled: Sampled) -> list[Event]:
        """A decode step's tokens: answer each row's request; the finished leave the batch."""
        events = []
        for row, request in enumerate(sampled.requests):
            if request.finished:  # cancelled, or done, after the step was queued
                continue
            if row in sampled.errors:
                events.append(self._leave(request, "error", sampled.errors[row]))
                continue
            tokens = sampled.tokens_of(row)  # (several: speculative decoding)
            for token, logprobs in zip(tokens, sampled.logprobs_of(row), strict=True):
                events.append(self._emit(request, token, logprobs, sampled.at))
                if request.finished:  # the tokens after its last are dropped
                    break
        for request, _ in events:
            if request.finished and request in self.running:
                self._remove_row(request)
        return events

    # -- responses -------------------------------------------------------------------------------

    def _emit(self, request: Request, token: int, logprobs, at: float) -> Event:
        """Host-side work for one new token (reaching the host at `at`): EOS, detokenizing, stop
        strings, the token budget."""
        request.last_token = token
        try:
            if request.stream is None:
                raise RuntimeError("the request has no text stream: it was never started")
            text, reason = request.stream.add(token, at)
        except Exception as e:
            return self._finish(request, token, "", logprobs, "error", f"detokenizing failed: {e}")
        if reason is not None:
            return self._finish(request, token, text, logprobs, reason)
        return request, GenerationResponse(text, token, logprobs)

    def _finish(self, request, token, text, logprobs, reason, error=None) -> Event:
        request.status = Status.FINISHED
        request.proposer = None  # (a draft model's proposer holds caches of its own)
        if request in self.running:  # its share of the batch: the slots its row fills
            row = self.running.index(request)
            request.kv_bytes = self.runner.row_kv_bytes(row)
            if reason != "error":
                tokens = request.prompt_ids + request.stream.tokens
                self.runner.store_conversation(tokens, row)
        elif request.cache is not None:  # finished at its first token: the slots it fills
            request.kv_bytes = sum(c.held_nbytes for c in request.cache)
        metrics = self.metrics(request)
        response = GenerationResponse(
            text, -1 if token is None else token, logprobs, reason, metrics, error
        )
        return request, response

    def metrics(self, request: Request) -> RequestMetrics:
        start = request.submitted
        queue = (request.admitted or time.perf_counter()) - start
        return request_metrics(
            start,
            request.stream.token_times if request.stream else [],
            prompt_tokens=len(request.prompt_ids),
            cached_prompt_tokens=request.cached_prompt_tokens,
            queue_s=queue,
            # alone, a decode step reads the weights for this request only
            weight_bytes_per_step=self.model.decode_weight_bytes if self.max_batch == 1 else 0,
            peak_memory_bytes=max(request.peak_memory, mx.get_peak_memory()),  # incl. this step
            active_memory_bytes=mx.get_active_memory(),
            kv_cache_bytes=request.kv_bytes,
            draft_tokens=request.draft_tokens,
            accepted_draft_tokens=request.accepted_draft_tokens,
            draft_positions=(request.draft_reached, request.draft_accepted_at),
        )

    def _leave(self, request: Request, reason: str, error: str | None = None) -> Event:
        """End a request early, cancelled (the text still held back goes with it) or failed
        (`error` says why), wherever it is: waiting, prefilling or in a batch row."""
        text = ""
        if request.stream is not None and reason == "cancelled":
            text = request.stream.flush()
        event = self._finish(request, None, text, None, reason, error)
        if request in self.running:
            self._remove_row(request)
        return event

    def cancel(self, request: Request) -> list[Event]:
        """Stop `request` wherever it is; its last response says 'cancelled'."""
        if request.finished:
            return []
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.prefilling:
            self.prefilling.remove(request)
            request.cache = None
        return [self._leave(request, "cancelled")]

    def _remove_row(self, request: Request) -> None:
        row = self.running.index(request)
        self.runner.leave(row)
        last = self.running.pop()
        if row < len(self.running):
            self.running[row] = last


class DraftBudgetError(ValueError):
    """A request fits the KV budget, but not with the draft model's caches beside it (the
    server then runs a request that did not ask for the draft without it)."""


def _drafts(request: Request) -> bool:
    """Whether `request` drafts with the draft model (or will, once started)."""
    if request.params.speculation != "draft":
        return False
    return not request.started or isinstance(request.proposer, DraftModel)


def _pass_tokens(request: Request) -> int:
    """The most tokens a decode pass runs for `request`'s row: its last token, and with
    speculative decoding up to num_draft proposals (the runner checks as many or fewer)."""
    return 1 + (request.params.num_draft if request.proposer is not None else 0)


def token_budget(model: Model, prompt_ids: list[int], max_tokens: int) -> int:
    """How many tokens can be generated: max_tokens, clipped to the context left after the prompt.
    A prompt longer than the context is an error."""
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if len(prompt_ids) >= context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, which leaves no room in the model's context of "
            f"{context} tokens"
        )
    return min(max_tokens, context - len(prompt_ids))


def check_engine_options(max_batch, policy, kv_budget_mb, prefill_chunk, prefix_cache_mb) -> None:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if kv_budget_mb is not None and not (
        isinstance(kv_budget_mb, (int, float))
        and not isinstance(kv_budget_mb, bool)
        and kv_budget_mb > 0
        and math.isfinite(kv_budget_mb)
    ):
        raise ValueError(f"kv_budget_mb must be a positive number or None, got {kv_budget_mb!r}")
    if prefill_chunk is not None and (
        not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1
    ):
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    if not (
        isinstance(prefix_cache_mb, (int, float))
        and not isinstance(prefix_cache_mb, bool)
        and prefix_cache_mb >= 0
    ):
        raise ValueError(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}")
