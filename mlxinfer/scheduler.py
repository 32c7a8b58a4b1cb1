"""Continuous batching: many requests share the model, joining the running batch as soon as there
is room and leaving as they finish.

    waiting --admit--> prefilling --last prompt chunk, first token--> running (a batch row) --> done

Each `Scheduler.step()` does one unit of work, chosen by the policy:

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
                   in one step). Stalls are bounded by a chunk; prompts take several steps.

Admission: at most `max_batch` requests prefilling or running, and the KV memory they need (the
batch's storage is padded to its longest row, rows allocated in powers of two) within the budget.

One thread owns a scheduler (MLX streams belong to the thread that made them); the Engine runs it
on its own thread, batch_generate on the caller's. Prompts are prefilled into single-sequence
caches (exact, chunked; several short fresh prompts together in one padded pass), then copied into
a row of the batch caches (batch_cache.py); a decode step runs all rows through the model at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from .batch_cache import make_batch_cache, remove_row
from .cache import RotatingKVCache, kv_cache_bytes
from .metrics import RequestMetrics, request_metrics
from .model import Model
from .prefix_cache import PrefixCache
from .responses import GenerationResponse, TextStream, TokenLogprobs
from .sampling import Sampler, SamplingParams, invalid_logits, top_logprobs
from .tokenizer import Tokenizer

POLICIES = ("prefill-first", "decode-first", "chunked")
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per pass: bounds the attention scores' memory
MIN_CHUNK = 16  # a chunked step always advances a waiting prompt by at least this many tokens


def pipelines_decode() -> bool:
    """Whether decode steps are queued ahead of the host (on a GPU) or run one at a time (CPU).
    On the CPU the queued step competes with the host thread for the same cores: token n was read
    back only once step n+1 was mostly done, and end to end it bought nothing."""
    return mx.default_device() != mx.cpu


@dataclass(eq=False)  # identity: `in`, .index() and .remove() find this request, not an equal one
class Request:
    """One request's state, from submission to its last response. Built on the caller's thread
    (no MLX work); the scheduler's thread does the rest."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    # set by the scheduler
    cache: list | None = None  # single-sequence caches while prefilling
    prefilled: int = 0  # prompt tokens in the cache
    cached_prompt_tokens: int = 0  # of those, reused from the prefix cache
    progress: object = None  # prefill_progress(done, total) after each prefill chunk but the last
    sampler: Sampler | None = None
    stream: TextStream | None = None  # detokenizing, stop strings, EOS, the token budget
    last_token: int = -1
    peak_memory: int = 0
    kv_bytes: int = 0
    finished: bool = False


class Scheduler:
    """Runs requests to completion in batches. Not thread-safe: one thread calls add/cancel/step."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        policy: str = "prefill-first",
        kv_budget_mb: float | None = None,
        prefill_chunk: int | None = None,
        prefix_cache_mb: float = 0,
        max_kv_size: int | None = None,
        kv_keep: int = 4,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ):
        check_engine_options(max_batch, policy, kv_budget_mb, prefill_chunk, prefix_cache_mb)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.policy = policy
        self.kv_budget = None if kv_budget_mb is None else kv_budget_mb * 2**20
        self.prefill_chunk = prefill_chunk or (
            128 if policy == "chunked" else DEFAULT_PREFILL_CHUNK
        )
        self.cache_options = dict(
            max_kv_size=max_kv_size, keep=kv_keep, kv_bits=kv_bits, kv_group_size=kv_group_size
        )
        self.template = model.make_cache(**self.cache_options)  # validates the options
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []  # running[r] owns batch row r
        self.run_ahead = pipelines_decode()  # queue decode step n+1 before reading step n (GPU)
        self._ahead: _Step | None = None
        self._new_batch()

    # -- admission -------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuse a request that can never run (ValueError saying why), and clip its max_tokens
        to the context its prompt leaves: the one rule every entry point (stream_generate,
        batch_generate, Engine.submit) gets by coming here."""
        request.params.check_vocab(self.model.config.vocab_size)
        request.max_tokens = token_budget(self.model, request.prompt_ids, request.max_tokens)
        need = len(request.prompt_ids) + request.max_tokens
        rows = self.model.config.vocab_size
        if past := [t for t in request.prompt_ids if t >= rows]:
            raise ValueError(
                f"prompt holds token {past[0]} ({self.tokenizer.decode([past[0]])!r}), an added "
                f"token of the tokenizer past the model's {rows} embedding rows"
            )
        alone = self.kv_bytes(1, need) + self.kv_bytes(1, len(request.prompt_ids))
        if self.kv_budget is not None and alone > self.kv_budget:
            raise ValueError(
                f"the request needs {alone / 2**20:.1f} MB of KV cache (prompt "
                f"{len(request.prompt_ids)} + max_tokens {request.max_tokens} tokens), more than "
                f"kv_budget_mb={self.kv_budget / 2**20:g}"
            )

    def kv_bytes(self, rows: int, length: int) -> int:
        """Bytes of KV storage for `rows` rows of `length` tokens, as the caches allocate it."""
        options = self.cache_options
        return kv_cache_bytes(
            self.model.config,
            length,
            rows,
            options["max_kv_size"],
            options["kv_bits"],
            options["kv_group_size"],
            self.model.compute_dtype.size,
        )

    def add(self, request: Request) -> None:
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
            self.prefilling.append(request)

    def _fits(self, request: Request) -> bool:
        if self.kv_budget is None:
            return True
        active = self.running + self.prefilling + [request]
        longest = max(len(r.prompt_ids) + r.max_tokens for r in active)
        rows = max(self.batch_rows, min(self.max_batch, 1 << (len(active) - 1).bit_length()))
        slots = max(self.batch_slots, longest)
        prefills = sum(self.kv_bytes(1, len(r.prompt_ids)) for r in active if r.sampler is None)
        return self.kv_bytes(rows, slots) + prefills <= self.kv_budget

    @property
    def batch_rows(self) -> int:
        return max((c.n_rows for c in self.batch), default=0)

    @property
    def batch_slots(self) -> int:
        return max((c.capacity for c in self.batch), default=0)

    # -- the work --------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def step(self) -> list[tuple[Request, GenerationResponse]]:
        """One unit of work; returns the responses it produced, in order."""
        self._admit()
        events: list[tuple[Request, GenerationResponse]] = []
        mx.reset_peak_memory()  # process-wide: each step's peak is charged to its requests
        if self.policy == "chunked":
            budget = self.prefill_chunk
            if self.running:
                events += self._decode()
                budget -= len(self.running)
            if self.prefilling:
                events += self._prefill(self.prefilling[0], max(budget, MIN_CHUNK))
        elif self.prefilling:  # prefill-first, or decode-first filling its batch
            together = self._prefill_together()
            if together is not None:
                events += together
            else:
                events += self._prefill(self.prefilling[0], self.prefill_chunk)
        elif self.running:
            events += self._decode()
        peak = mx.get_peak_memory()
        for request in self.running + self.prefilling:
            request.peak_memory = max(request.peak_memory, peak)
        return events

    def _start(self, request: Request) -> None:
        """The first prefill chunk: caches, sampler, and whatever the prefix cache holds."""
        request.cache = self.model.make_cache(**self.cache_options)
        if self.prefix_cache is not None:
            matched, key = self.prefix_cache.lookup(request.prompt_ids)
            if matched:
                self.prefix_cache.restore(key, matched, request.cache)
                request.prefilled = request.cached_prompt_tokens = matched
        request.sampler = Sampler(request.params, self.model.config.vocab_size, request.prompt_ids)
        request.stream = TextStream(self.tokenizer, request.params, request.max_tokens)

    def _prefill(self, request: Request, chunk: int) -> list:
        """Up to `chunk` more prompt tokens of `request`; after the last one, its first token."""
        try:
            if request.sampler is None:
                self._start(request)
            ids = request.prompt_ids[request.prefilled : request.prefilled + chunk]
            h = self.model.hidden_states(mx.array([ids]), request.cache)
            request.prefilled += len(ids)
            if request.prefilled < len(request.prompt_ids):
                mx.eval([c.state for c in request.cache])
                if request.progress is not None:
                    request.progress(request.prefilled, len(request.prompt_ids))
                return []
            logits = self.model.logits(h[:, -1:, :])[:, -1, :]  # [1, vocab]
        except Exception as e:  # this request fails; the others are untouched
            self.prefilling.remove(request)
            return [self._leave(request, "error", f"prefill failed: {e}")]
        return self._first_tokens([request], logits, [request.cache])

    def _prefill_together(self) -> list | None:
        """Several fresh prompts in one pass, when they fit in one chunk: rows `[k, T]` padded at
        the end (causal attention keeps a row's real tokens from seeing its padding, so each row
        is exact), the last real position's logits of each. None when fewer than two qualify."""
        group, longest = [], 0
        for request in self.prefilling:
            n = len(request.prompt_ids)
            if request.sampler is not None or n > self.together_limit:
                continue
            if (len(group) + 1) * max(longest, n) > self.prefill_chunk:
                break
            group.append(request)
            longest = max(longest, n)
        if len(group) < 2:
            return None
        started, events = [], []
        for request in group:
            try:
                self._start(request)
                started.append(request)
            except Exception as e:  # this request fails; the others are untouched
                self.prefilling.remove(request)
                events.append(self._leave(request, "error", f"prefill failed: {e}"))
        if events:
            return events  # the others go next step
        # prefix-cache hits go alone, for what the cache did not hold
        group = [r for r in started if not r.prefilled]
        if len(group) < 2:
            return None
        longest = max(len(r.prompt_ids) for r in group)
        padded = [r.prompt_ids + [0] * (longest - len(r.prompt_ids)) for r in group]
        try:
            cache = self.model.make_cache(**self.cache_options)
            h = self.model.hidden_states(mx.array(padded), cache)  # [k, T, D]
            last = mx.array([len(r.prompt_ids) - 1 for r in group])
            h = mx.take_along_axis(h, last[:, None, None], axis=1)  # [k, 1, D]
            logits = self.model.logits(h)[:, -1, :]  # [k, vocab]
        except Exception as e:
            for request in group:
                self.prefilling.remove(request)
            return [self._leave(r, "error", f"prefill failed: {e}") for r in group]
        caches = [self._row_caches(cache, row, len(r.prompt_ids)) for row, r in enumerate(group)]
        return self._first_tokens(group, logits, caches)

    @property
    def together_limit(self) -> int:
        """The longest prompt prefilled with others: one chunk, and never more than a rotating
        cache holds (padding must not evict real tokens)."""
        limit = self.prefill_chunk // 2
        for cache in self.template:
            if isinstance(cache, RotatingKVCache):
                limit = min(limit, cache.max_size)
        return limit

    def _first_tokens(self, requests: list[Request], logits: mx.array, caches: list) -> list:
        """Prefilled requests (row r of `logits` is request r's, `caches[r]` its single caches):
        sample their first tokens, answer them, and give the unfinished ones a batch row."""
        tokens, lps, checks = [], [], []
        for row, request in enumerate(requests):
            self.prefilling.remove(request)
            request.cache = caches[row]
            try:
                token = request.sampler(logits[row : row + 1])
                lps.append(self._logprobs(request, logits[row : row + 1], token))
            except Exception as e:
                tokens.append(e)
                lps.append(None)
                checks.append(None)
                continue
            tokens.append(token)
            checks.append(request.sampler.invalid)
        bad = _bad_logits(logits, checks)
        states = [c.state for cache in caches for c in cache]
        try:
            mx.eval([t for t in tokens if isinstance(t, mx.array)], lps, bad, states)
        except Exception as e:
            return [self._leave(r, "error", f"prefill failed: {e}") for r in requests]
        now = time.perf_counter()
        bad = bad.tolist()
        events = []
        for row, request in enumerate(requests):
            token = tokens[row]
            if not isinstance(token, mx.array):
                events.append(self._leave(request, "error", f"sampling failed: {token}"))
            elif bad[row]:
                events.append(self._leave(request, "error", BAD_LOGITS[bad[row]]))
            else:
                if self.prefix_cache is not None:
                    self._remember(request.prompt_ids, request.cache)
                events.append(self._emit(request, token.item(), _to_host(lps[row]), now))
                if not request.finished:
                    self.rows.add(request.cache[0].offset)
                    for batch, single in zip(self.batch, request.cache, strict=True):
                        batch.add_row(single)
                    self.running.append(request)
            request.cache = None  # the batch holds its keys and values now
        return events

    def _decode(self) -> list:
        """One token for every running request. On a GPU (`run_ahead`) the next step is queued
        before this one's tokens are read back, so the device never waits for the host; a row
        that finishes meanwhile has computed one token too many, which is dropped."""
        try:
            if self._ahead is not None:
                step, self._ahead = self._ahead, None
            else:
                step = self._queue(mx.array([r.last_token for r in self.running]))
            if self.run_ahead:
                self._ahead = self._queue(self._inputs_after(step))
            values, bad = step.tokens.tolist(), step.bad.tolist()  # waits for the step
            lps = [_to_host(lp) for lp in step.lps]
        except Exception as e:  # the whole step failed: every running request ends
            self._ahead = None
            return [self._leave(r, "error", f"decode step failed: {e}") for r in list(self.running)]
        now = time.perf_counter()
        events = []
        for row, request in enumerate(step.requests):
            if request.finished:  # cancelled, or done, after the step was queued
                continue
            if row in step.failed or bad[row]:
                reason = step.failed.get(row) or BAD_LOGITS[bad[row]]
                events.append(self._leave(request, "error", reason))
                continue
            events.append(self._emit(request, values[row], lps[row], now))
        for request, _ in events:
            if request.finished and request in self.running:
                self._remove_row(request)
        return events

    def _queue(self, inputs: mx.array) -> _Step:
        """Build (lazily) and start one decode step for the running rows, fed `inputs` `[rows]`."""
        requests = list(self.running)
        logits = self.model(inputs[:, None], self.batch)[:, -1, :]  # [rows, vocab]
        self.rows.advance()
        plain = [r.params.plain_greedy for r in requests]
        argmax = mx.argmax(logits, axis=-1) if any(plain) else None
        failed: dict[int, str] = {}
        picked, lps, checks = [], [], []
        for row, request in enumerate(requests):
            if plain[row]:
                picked.append(None if all(plain) else argmax[row : row + 1])
                lps.append(None)
                checks.append(None)
                continue
            try:  # a sampler that fails stops its own request only
                token = request.sampler(logits[row : row + 1])
                lps.append(self._logprobs(request, logits[row : row + 1], token))
                checks.append(request.sampler.invalid)
            except Exception as e:
                failed[row] = f"sampling failed: {e}"
                token = mx.zeros((1,), mx.uint32)
                lps.append(None)
                checks.append(None)
            picked.append(token.astype(mx.uint32))
        if all(plain):
            tokens = argmax.astype(mx.uint32)
        else:
            tokens = mx.concatenate(picked) if len(picked) > 1 else picked[0]
        bad = _bad_logits(logits, checks)
        mx.async_eval(
            tokens, bad, [lp for lp in lps if lp is not None], [c.state for c in self.batch]
        )
        return _Step(requests, tokens, lps, bad, failed)

    def _inputs_after(self, step: _Step) -> mx.array:
        """The running rows' next inputs: `step`'s tokens (still on the device) for the rows it
        computed, the last token for rows that joined since."""
        position = {id(r): i for i, r in enumerate(step.requests)}
        joined = [r.last_token for r in self.running if id(r) not in position]
        index, extra = [], len(step.requests)
        for request in self.running:
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

    def _logprobs(self, request: Request, logits: mx.array, token: mx.array):
        n = request.params.logprobs
        if not n:
            return None
        all_lp, top_ids, top_lp = top_logprobs(logits, n)
        return mx.take_along_axis(all_lp, token[:, None], axis=-1), top_ids, top_lp

    # -- responses -------------------------------------------------------------------------------

    def _emit(self, request: Request, token: int, logprobs, now: float):
        """Host-side work for one new token: EOS, detokenizing, stop strings, the token budget."""
        request.last_token = token
        try:
            text, reason = request.stream.add(token, now)
        except Exception as e:
            return self._finish(request, token, "", logprobs, "error", f"detokenizing failed: {e}")
        if reason is not None:
            return self._finish(request, token, text, logprobs, reason)
        return request, GenerationResponse(text, token, logprobs)

    def _finish(self, request, token, text, logprobs, reason, error=None):
        request.finished = True
        if request in self.running:  # its share of the batch: the slots its row fills
            row = self.running.index(request)
            request.kv_bytes = sum(c.row_nbytes(self.rows.offsets[row]) for c in self.batch)
            if self.prefix_cache is not None and reason != "error":
                self._store_conversation(request, row)
        elif request.cache is not None:  # finished at its first token: the slots it fills
            request.kv_bytes = sum(c.held_nbytes for c in request.cache)
        metrics = self.metrics(request)
        response = GenerationResponse(
            text, -1 if token is None else token, logprobs, reason, metrics, error
        )
        return request, response

    def _remember(self, token_ids: list[int], caches: list) -> None:
        """Keep an entry in the prefix cache. It is only a speed-up: if keeping it fails, the
        request and the engine go on without it."""
        try:
            self.prefix_cache.store(token_ids, caches)
        except Exception:
            pass

    def _row_caches(self, caches: list, row: int, n: int) -> list:
        """Single-sequence caches holding the first `n` positions of row `row` of `caches` (a
        batch's, or a padded group prefill's): views, no copies."""
        views = self.model.make_cache(**self.cache_options)
        for view, cache in zip(views, caches, strict=True):
            view.fill(_row(cache.keys, row, n), _row(cache.values, row, n), n)
        return views

    def _store_conversation(self, request: Request, row: int) -> None:
        """Keep the KV of a finished request's prompt and reply: the next turn of a chat starts
        with both. The row holds the first `offset` of prompt + generated tokens (the last one
        generated, unless a step ran ahead, was never fed to the model)."""
        n = self.rows.offsets[row]
        if any(c.max_size is not None and n > c.max_size for c in self.batch):
            return  # a ring has overwritten the start
        views = self._row_caches(self.batch, row, n)
        self._remember((request.prompt_ids + request.stream.tokens)[:n], views)

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
        )

    def _leave(self, request: Request, reason: str, error: str | None = None):
        """End a request early, cancelled (the text still held back goes with it) or failed
        (`error` says why), wherever it is: waiting, prefilling or in a batch row."""
        text = ""
        if request.stream is not None and reason == "cancelled":
            text = request.stream.flush()
        event = self._finish(request, None, text, None, reason, error)
        if request in self.running:
            self._remove_row(request)
        return event

    def cancel(self, request: Request) -> list:
        """Stop `request` wherever it is; its last response says 'cancelled'."""
        if request.finished:
            return []
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.prefilling:
            self.prefilling.remove(request)
            request.cache = None
        return [self._leave(request, "cancelled")]

    # -- the batch -------------------------------------------------------------------------------

    def _new_batch(self) -> None:
        self.rows, self.batch = make_batch_cache(self.template, self.max_batch)
        self._ahead = None  # a step queued for rows that have all gone

    def _remove_row(self, request: Request) -> None:
        row = self.running.index(request)
        remove_row(self.rows, self.batch, row)
        last = self.running.pop()
        if row < len(self.running):
            self.running[row] = last
        if not self.running:  # give the memory back
            self._new_batch()


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


def _row(stored: tuple, row: int, n: int) -> tuple:
    """The first n slots of one row, `[1, kv_heads, n, ...]`."""
    return tuple(a[row : row + 1, :, :n] for a in stored)


def _to_host(lp) -> TokenLogprobs | None:
    if lp is None:
        return None
    chosen, ids, values = lp
    return TokenLogprobs(chosen.item(), list(zip(ids[0].tolist(), values[0].tolist(), strict=True)))


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
