"""The engine: many conversations at once, from any thread.

    engine = Engine(model, tokenizer, max_batch=8, policy="prefill-first")
    handle = engine.submit("Hello", sampling=SamplingParams(temperature=0.7))   # any thread
    for response in handle: print(response.text, end="")                       # streams
    engine.close()

One thread, started by the engine, owns all MLX work (MLX streams belong to the thread that made
them): it runs a Scheduler (scheduler.py) and hands each response to its request's handle. Callers
only exchange messages with it: `submit` checks the request on the caller's thread (tokenizing,
settings, context and memory limits: a ValueError there), then queues it; `cancel` and `close`
are messages too.

`batch_generate` runs the same scheduler on the caller's thread for a fixed list of prompts.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .cache import CacheSpec, cache_spec
from .engine_ranks import (
    FIRST_TURN_ALLOWANCE,
    STALL_TIMEOUT_ENV,
    RankLink,
    stall_timeout,
    wait_for_leader,
)
from .generate import GenerationResponse, Prompt, check_max_tokens, encode_prompt
from .metrics import RequestMetrics
from .model import Model
from .sampling import SamplingParams
from .scheduler import EngineOptions, Request, Scheduler
from .streams import own_streams, track_engine
from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """A finished request: its text, token ids, why it ended (eos, stop, length, cancelled,
    error), the error's reason, and its metrics."""

    text: str
    tokens: list[int]
    finish_reason: str
    metrics: RequestMetrics | None
    error: str | None = None


class RequestHandle:
    """A submitted request. Iterate it for its GenerationResponses as they come (the last one has
    a finish_reason); `result()` waits for the end; `cancel()` stops it."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._request = request
        self._responses: queue.Queue[GenerationResponse] = queue.Queue()
        self._seen: list[GenerationResponse] = []
        self._done = False
        self._listener: Callable[[], None] | None = None

    @property
    def id(self) -> int:
        return self._request.id

    @property
    def max_tokens(self) -> int:
        """The most tokens this request generates: max_tokens, clipped to the context."""
        return self._request.max_tokens

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    def __iter__(self) -> Iterator[GenerationResponse]:
        while not self._done:
            yield self._next(None)

    def next(self, timeout: float | None = None) -> GenerationResponse | None:
        """The next response, waiting at most `timeout` seconds (None: until it comes); None
        when none came in time. For a caller that must do something else while it waits (a
        server noticing that its client went away)."""
        try:
            return self._next(timeout)  # (timeout 0: what is there, without waiting)
        except queue.Empty:
            return None

    def on_response(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the engine's thread: it must only hand over, e.g. wake an event
        loop) each time a response arrives, and once now if some are waiting: an asynchronous
        caller then reads them with `next(0)` instead of holding a thread per request."""
        self._listener = listener
        if not self._responses.empty():
            listener()

    def _next(self, timeout: float | None) -> GenerationResponse:
        response = self._responses.get(timeout=timeout)
        self._seen.append(response)
        self._done = response.finish_reason is not None
        return response

    def cancel(self) -> None:
        """Stop generating; the last response says 'cancelled' (unless it had already ended)."""
        self._engine.cancel(self._request)

    def put(self, response: GenerationResponse) -> None:
        """The engine's worker hands this request's next response over (any thread may iterate)."""
        self._responses.put(response)
        if self._listener is not None:
            self._listener()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to end (TimeoutError after `timeout` seconds) and return it whole,
        including the responses already iterated."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._done:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._next(left)
        except queue.Empty:
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s") from None
        return _result(self._seen)

    @property
    def done(self) -> bool:
        return self._done


def _result(responses: Sequence[GenerationResponse]) -> GenerationResult:
    last = responses[-1]
    tokens = [r.token for r in responses if r.token >= 0]
    text = "".join(r.text for r in responses)
    reason = last.finish_reason or "error"  # a last response always has one
    return GenerationResult(text, tokens, reason, last.metrics, last.error)


class Engine:
    """A continuous-batching server in-process: requests join the running batch as soon as there is
    room and leave as they finish.

    `max_batch` requests run at once; `kv_budget_mb` bounds their KV cache (others wait, and their
    wait is `queue_ms`); `policy` is "prefill-first", "decode-first" or "chunked" (scheduler.py
    says what each trades); `prefill_chunk` is the prompt tokens per prefill pass (the per-step
    token budget under "chunked"); `prefix_cache_mb` bounds the cache of prompt prefixes
    (0 turns it off). The KV cache kind is `cache` (a CacheSpec) or its fields as keywords, as
    stream_generate takes them. `draft_model` (a loaded model that shares the tokenizer) proposes
    for requests with SamplingParams(speculation="draft"). `engine.options` holds all of them,
    checked, as one EngineOptions.

    The engine's thread holds only its `_Worker` (never the Engine), so an engine dropped without
    `close()` is collected like any object: its finalizer closes it, cancelling what it ran (its
    handles keep it alive while anyone iterates one), and the thread ends."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        policy: str = "prefill-first",
        kv_budget_mb: float | None = None,
        prefill_chunk: int | None = None,
        prefix_cache_mb: float = 256,
        cache: CacheSpec | None = None,
        draft_model: Model | None = None,
        **cache_options,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.options = EngineOptions(
            max_batch,
            policy,
            kv_budget_mb,
            prefill_chunk,
            prefix_cache_mb,
            cache_spec(cache, **cache_options),
            draft_model,
        )
        self.scheduler = Scheduler(model, tokenizer, self.options)
        self._ids = itertools.count()
        group = model.ranks
        link = None
        if group is not None and group.size() > 1:
            stall_timeout()  # a bad $MLXINFER_PARALLEL_TIMEOUT: ValueError here, not in a thread
            link = RankLink(group, pipeline=model.pipeline is not None)
        self._worker = _Worker(self.scheduler, link)
        # dropped unclosed: cancel and stop the thread, without waiting (this may run in any
        # thread's garbage collection); at exit, track_engine waits for it
        weakref.finalize(self, self._worker.close, True, 0).atexit = False
        track_engine(self._worker)  # closed at exit if still open: its thread must end before MLX's

    # -- the callers' side -----------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        max_tokens: int | None = None,
        chat: bool = False,
    ) -> RequestHandle:
        """Queue a request (text, token ids or chat messages, as stream_generate takes) and return
        its handle. `max_tokens` (else the sampling's) is clipped to the context the prompt leaves,
        as stream_generate and batch_generate clip it: the reply then ends with finish_reason
        "length". A request that can never run (a prompt that leaves no room, a KV budget it
        cannot fit, parameters the model cannot take) is refused here with a ValueError."""
        if (link := self._worker.link) is not None and not link.leader:
            raise RuntimeError(
                f"this is rank {link.rank} of {link.size}: rank 0 takes the requests (here, "
                "engine.wait() runs the steps rank 0 plans until it closes the engine)"
            )
        params = sampling or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(params).__name__}")
        max_tokens = params.max_tokens if max_tokens is None else max_tokens
        check_max_tokens(max_tokens)
        prompt_ids = encode_prompt(self.tokenizer, prompt, chat)
        request = Request(next(self._ids), prompt_ids, params, max_tokens)
        self.scheduler.check(request)  # reads only the model's config and the options; clips
        handle = RequestHandle(self, request)
        self._worker.submit(request, handle)
        return handle

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; finish those accepted (or with `cancel=True` cancel them), then
        stop the engine's thread and free the prefix cache. On a rank other than 0 of a split
        model, wait (at most `timeout` seconds) for rank 0 to close it."""
        self._worker.close(cancel, timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the engine's thread ends (TimeoutError after `timeout` seconds); raise
        RuntimeError if it stopped on an error. On the ranks other than 0 of a model split over
        several (`load(..., parallel=...)`), this is their whole part: their engine runs the
        steps rank 0 plans (its requests, cancellations and seeds) until rank 0 closes it."""
        if not self._worker.ended.wait(timeout):
            raise TimeoutError(f"the engine still runs after {timeout} s")
        if not self._worker.stalled:
            self._worker.thread.join()  # (its last lines, after it set `ended`)
        if self._worker.error is not None:
            raise RuntimeError(self._worker.error)

    @property
    def error(self) -> str | None:
        """Why the engine's thread stopped, if it failed (e.g. a rank of a split model was lost);
        None while it runs or after close()."""
        return self._worker.error

    @property
    def closed(self) -> bool:
        """Whether it takes no more requests (closed, or its thread stopped on an error)."""
        return self._worker.closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def cancel(self, request: Request) -> None:
        """Cancel a submitted request (its handle's `cancel()`): the worker ends it between steps.
        After close() nothing is left to cancel (every request got its last response), so this
        never raises."""
        self._worker.inbox.put(("cancel", request))

    def call(self, function, *args, timeout: float | None = None, **kwargs):
        """Run `function(*args, **kwargs)` on the engine's thread, between two generation steps,
        and return its result (or raise its exception): other MLX work on the model (a trace, a
        forward pass to look inside) without a second thread using MLX."""
        if self._worker.link is not None:  # the other ranks would not run it: their halves of
            raise RuntimeError(  # the model's collectives would never pair up
                f"Engine.call: the model is split over {self._worker.link.size} ranks, and a "
                "function run on rank 0 alone cannot use it"
            )
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._worker.post(("call", (lambda: function(*args, **kwargs), future)))
        return future.result(timeout)

    @property
    def stats(self) -> dict:
        """A snapshot: requests waiting, prefilling and running, and the prefix cache's use."""
        s = self.scheduler
        prefix = s.prefix_cache
        return {
            "waiting": len(s.waiting),
            "prefilling": len(s.prefilling),
            "running": len(s.running),
            "prefix_cache_mb": prefix.nbytes / 2**20 if prefix else 0.0,
            "prefix_cache_hits": prefix.hits if prefix else 0,
        }


class _Worker:
    """The engine's thread and what it shares with the callers: the inbox of messages, the handles
    of requests in flight, and the scheduler it alone steps. With a `link` (a model split over
    ranks, engine_ranks.py) rank 0 shares each turn's messages and the other ranks take theirs
    from it instead of an inbox."""

    def __init__(self, scheduler: Scheduler, link: RankLink | None = None):
        self.scheduler = scheduler
        self.link = link
        self.inbox: queue.Queue = queue.Queue()
        self.handles: dict[int, RequestHandle] = {}
        self.lock = threading.RLock()  # a finalizer's close may run on a thread that holds it
        self.closed = False
        self.error: str | None = None  # why the thread stopped, if it failed
        self.ended = threading.Event()  # the thread ended, or (over ranks) stalled for good
        self.stalled = False  # over ranks: it waits for a rank that is gone (_watch), forever
        self.beat = time.monotonic()  # when the thread last finished a turn or a step
        self.thread = threading.Thread(target=self._run, name="mlxinfer-engine", daemon=True)
        self.thread.start()
        if link is not None:
            threading.Thread(target=self._watch, name="mlxinfer-engine-watch", daemon=True).start()

    def post(self, message: tuple) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.inbox.put(message)

    def submit(self, request: Request, handle: RequestHandle) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.handles[request.id] = handle
            self.inbox.put(("submit", request))

    def close(self, cancel: bool, timeout: float | None = None) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.inbox.put(("close", cancel))  # (on ranks other than 0, rank 0 closes)
        if threading.current_thread() is not self.thread:
            # (`ended`, not a join: the watchdog may give up on a thread stuck in MLX meanwhile)
            if self.ended.wait(timeout) and not self.stalled:
                self.thread.join()  # its last lines, after it set `ended`

    def _watch(self) -> None:
        """Over ranks, while the thread runs: MLX's ring backend waits forever for a rank that
        died or hung (after a connection error its pending transfers never complete, and
        nothing raises), so a thread that has not finished a turn or a step in the group's
        timeout (engine_ranks.stall_timeout) is given up: every request ends with an error
        saying so, the engine closes, and wait() raises."""
        timeout = stall_timeout()
        first = FIRST_TURN_ALLOWANCE * timeout  # the ranks may finish loading far apart
        while not self.ended.wait(min(1.0, timeout / 4)):
            allowed = timeout if self.link is not None and self.link.turns else first
            if time.monotonic() - self.beat > allowed:
                link = self.link
                assert link is not None
                self.error = (
                    f"engine stopped: rank {link.rank} of {link.size} had no reply from the other "
                    f"ranks for {allowed:g} s (a rank stopped, or the connection between them "
                    f"failed; ${STALL_TIMEOUT_ENV} sets the wait, which must exceed a step)"
                )
                self.stalled = True
                print(f"mlxinfer: {self.error}", file=sys.stderr, flush=True)
                self._fail_all(self.error)
                self.ended.set()
                return

    def _run(self) -> None:
        scheduler, closing = self.scheduler, False
        try:
            while True:
                self.beat = time.monotonic()
                block = not scheduler.has_work()
                if (closing and block) or self.ended.is_set():  # (set: given up on, see _watch)
                    return
                for message in self._turn(block):
                    kind, arg = message
                    if kind == "submit":
                        scheduler.add(arg)
                    elif kind == "cancel":
                        self._deliver(scheduler.cancel(arg))
                    elif kind == "call":  # other work on the model, between two steps
                        function, future = arg
                        if future.set_running_or_notify_cancel():
                            try:
                                future.set_result(function())
                            except BaseException as e:  # SystemExit too: the caller's, not ours
                                future.set_exception(e)
                    elif kind == "close":
                        closing = True
                        if arg:
                            for request in _active(scheduler):
                                self._deliver(scheduler.cancel(request))
                if scheduler.has_work():
                    events = scheduler.step()
                    if self.link is not None:
                        self.link.stepped(events)
                    self._deliver(events)
        except BaseException as e:  # nothing is lost: every accepted request gets its last response
            if not self.stalled:  # (the watchdog's reason stands)
                self.error = f"engine stopped: {type(e).__name__}: {e}"
                self._fail_all(self.error)
            raise
        finally:
            if scheduler.prefix_cache is not None:  # nothing can use it once the thread ends
                scheduler.prefix_cache.clear()
            # MLX 0.32 aborts the process at exit if a thread ends with work queued or with its
            # streams alive ("terminate called without an active exception"): MLX's advice is to
            # clear a thread's streams at its end.
            mx.synchronize()
            mx.clear_streams()
            self.ended.set()  # last: a caller of wait() may exit the process next

    def _turn(self, block: bool) -> list[tuple]:
        """This turn's messages: the inbox's; over ranks, rank 0 shares them (engine_ranks.py)."""
        link = self.link
        if link is None:
            return self._messages(block)
        if link.pipeline and self.scheduler.partial_prefill:  # chunks back to back: see
            return []  # engine_ranks.py (the same on every rank: their schedulers agree)
        if not link.leader:
            messages, idle_s = link.receive()
            wait_for_leader(idle_s)
            return messages
        messages = self._messages(block, link.wait_s)  # (what the last header said)
        link.send(messages, idle=block and not messages)  # (no "call": refused when split)
        return messages

    def _messages(self, block: bool, timeout: float | None = None) -> list[tuple]:
        messages = []
        if block:
            try:
                messages.append(self.inbox.get(timeout=timeout))
            except queue.Empty:
                return messages
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    def _deliver(self, events) -> None:
        if self.link is not None:
            self.link.forget(events)
        for request, response in events:
            handle = self.handles.get(request.id)
            if handle is None:  # (or the watchdog's _fail_all took them all meanwhile)
                continue
            handle.put(response)
            if response.finish_reason is not None:
                self.handles.pop(request.id, None)

    def _fail_all(self, reason: str) -> None:
        with self.lock:
            self.closed = True
            handles = list(self.handles.values())
            self.handles.clear()
        for handle in handles:
            handle.put(GenerationResponse("", -1, None, "error", None, reason))


def _active(scheduler: Scheduler) -> list[Request]:
    return [*scheduler.waiting, *scheduler.prefilling, *scheduler.running]


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: int | None = None,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    chat: bool = False,
    max_batch: int | None = None,
    prefill_chunk: int | None = None,
    cache: CacheSpec | None = None,
    draft_model: Model | None = None,
    **cache_options,
) -> list[GenerationResult]:
    """Generate for every prompt at once (continuous batching on the calling thread); one result
    per prompt, in order. `sampling` is one SamplingParams for all or one per prompt; each prompt
    is text, token ids or chat messages as in stream_generate. At most `max_batch` run together
    (default: all). `cache` and `cache_options` are stream_generate's (a CacheSpec, or max_kv_size,
    kv_keep, kv_bits, kv_group_size); `draft_model` is the Engine's."""
    own_streams()  # this thread's MLX streams are cleared as it ends (streams.py)
    if isinstance(prompts, (str, dict)):
        raise ValueError("prompts must be a list of prompts; for one prompt use generate()")
    prompts = list(prompts)
    if not prompts:
        return []
    if sampling is None or isinstance(sampling, SamplingParams):
        params = [sampling or SamplingParams()] * len(prompts)
    else:
        params = list(sampling)
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling has {len(params)} SamplingParams for {len(prompts)} prompts"
            )
    options = EngineOptions(
        max_batch=max_batch or len(prompts),
        prefill_chunk=prefill_chunk,
        cache=cache_spec(cache, **cache_options),
        draft_model=draft_model,
    )
    scheduler = Scheduler(model, tokenizer, options)
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        n = p.max_tokens if max_tokens is None else max_tokens
        try:
            ids = encode_prompt(tokenizer, prompt, chat)
            request = Request(i, ids, p, check_max_tokens(n))
            scheduler.check(request)  # clips max_tokens to the context left after the prompt
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        requests.append(request)
    responses: dict[int, list[GenerationResponse]] = {r.id: [] for r in requests}
    for request in requests:
        scheduler.add(request)
    try:
        while scheduler.has_work():
            for request, response in scheduler.step():
                responses[request.id].append(response)
    finally:
        mx.synchronize()
    return [_result(responses[r.id]) for r in requests]
