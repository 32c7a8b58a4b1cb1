"""The ASGI app (Starlette, served by uvicorn): routes, authentication, limits, streaming.

One Engine serves every request; the event loop never waits on it. A request is tokenized and
submitted in a worker thread (a long prompt takes a while to tokenize), and its responses are
read from its handle in worker threads a short wait at a time, so the loop notices a client that
went away and cancels the request at once (its batch row freed). While a prompt prefills, a
streamed reply gets a keep-alive comment every few seconds.

The model loads after the server starts: GET /health answers 503 until it is ready, 200 then.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import Engine, RequestHandle
from ..metrics import RequestMetrics
from ..responses import GenerationResponse
from ..scheduler import DraftBudgetError
from . import openai_responses, protocol
from .prometheus import ServerMetrics
from .protocol import ApiError, Choice, Job
from .tools import ToolCallStream

log = logging.getLogger("mlxinfer.server")

POLL_S = 0.25  # how long a worker thread waits for a response before the loop looks around
KEEP_ALIVE_S = 5.0  # a comment on a silent stream (a long prefill) this often
WORKER_THREADS = 512  # requests waiting on their handles at once


@dataclass
class ServerOptions:
    """What `mlxinfer serve` decides besides the engine."""

    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_waiting: int = 64  # requests queued before new ones get 429


class Server:
    """The loaded model and its engine (once ready), and what the routes share."""

    def __init__(self, options: ServerOptions, load: Callable[[], Engine]):
        self.options = options
        self._load = load
        self.engine: Engine | None = None
        self.error: str | None = None
        self.limiter = anyio.CapacityLimiter(WORKER_THREADS)
        self.metrics = ServerMetrics(self._gauges)
        self.on_load_failure: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._closing = False
        self._loader: threading.Thread | None = None

    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._loading, name="mlxinfer-load", daemon=True)
        self._loader.start()

    def _loading(self) -> None:
        try:
            engine = self._load()
            with self._lock:
                if self._closing:  # shut down while it loaded: nothing will serve it
                    engine.close(cancel=True)
                    return
                self.engine = engine
        except Exception as e:  # the model cannot be served: say why and stop the server
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            log.error("mlxinfer serve: the model did not load: %s", self.error)
            self.on_load_failure()

    def close(self) -> None:
        """Cancel what runs (each reply ends with an error saying the server shut down) and
        stop the engine's thread."""
        with self._lock:
            self._closing = True
        if self.engine is not None:
            self.engine.close(cancel=True)
        if self._loader is not None:  # (a load in progress ends, then closes its engine)
            self._loader.join(timeout=60)

    def _gauges(self) -> dict[str, float]:
        if self.engine is None:
            return {"ready": 0}
        stats = self.engine.stats
        return {
            "ready": 1,
            "requests_running": stats["running"] + stats["prefilling"],
            "requests_waiting": stats["waiting"],
            "prefix_cache_bytes": stats["prefix_cache_mb"] * 2**20,
            "prefix_cache_hits_total": stats["prefix_cache_hits"],
        }


# -- requests in -----------------------------------------------------------------------------------


def _authorized(request: Request, key: str | None) -> bool:
    if key is None:
        return True
    given = request.headers.get("x-api-key")
    bearer = request.headers.get("authorization", "")
    if given is None and bearer.lower().startswith("bearer "):
        given = bearer[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


async def _body(request: Request, limit: int) -> Any:
    """The request's JSON body, read up to `limit` bytes (413 past it)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body is {int(length)} bytes; this server takes up to {limit}")
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise ApiError(413, f"the body is over {limit} bytes, the most this server takes")
        chunks.append(piece)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's depth
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ApiError(400, f"the body is not valid JSON: {reason}") from None


def _error(api: str, error: ApiError) -> JSONResponse:
    body = error.anthropic() if api == "messages" else error.openai()
    headers = {"retry-after": "1"} if error.status in (429, 503) else None
    return JSONResponse(body, status_code=error.status, headers=headers)


# a prompt past the context, a template that refuses the messages, text that is not UTF-8 (a
# lone surrogate: the tokenizer's TypeError)
PROMPT_ERRORS = (ValueError, TypeError, UnicodeError)


def _prompt_refused(error: Exception, param: str) -> ApiError:
    reason = str(error) if isinstance(error, ValueError) else "the prompt is not valid UTF-8 text"
    return ApiError(400, reason, param)


# -- the engine's side -----------------------------------------------------------------------------


async def _submit(server: Server, job: Job) -> list[RequestHandle]:
    """Submit the job's n choices (tokenizing in a worker thread); a refusal is a 400."""
    engine = server.engine
    assert engine is not None
    if engine.stats["waiting"] >= server.options.max_waiting:
        raise ApiError(429, f"{server.options.max_waiting} requests are waiting: try again soon")
    handles: list[RequestHandle] = []
    # no max_tokens: the rest of the context (the engine clips it), not SamplingParams' default
    max_tokens = job.max_tokens or engine.model.config.max_position_embeddings
    try:
        prompt, chat = job.prompt, job.chat
        if job.api in ("chat", "responses"):  # rendered here: it may take the request's tools
            options: dict[str, Any] = {"tools": job.tools} if job.tools else {}
            render = functools.partial(engine.tokenizer.apply_chat_template, prompt, **options)
            prompt, chat = await anyio.to_thread.run_sync(render, limiter=server.limiter), False
        has_draft = engine.options.draft_model is not None
        if job.params.speculation == "draft" and not has_draft:
            raise ApiError(400, "draft: this server has no draft model (--draft-model)", "draft")
        for index in range(job.n):
            params = job.params_for(index)
            if job.draft_default and has_draft:
                params = replace(params, speculation="draft")  # (unless it said draft: false)
            submit = functools.partial(engine.submit, prompt, params, max_tokens, chat=chat)
            try:
                handle = await anyio.to_thread.run_sync(submit, limiter=server.limiter)
            except DraftBudgetError:
                if not job.draft_default:  # it asked for the draft: it is told why not
                    raise
                # the draft's caches would not fit beside it: it runs without the draft
                plain = replace(params, speculation=None)
                submit = functools.partial(engine.submit, prompt, plain, max_tokens, chat=chat)
                handle = await anyio.to_thread.run_sync(submit, limiter=server.limiter)
            handles.append(handle)
    except PROMPT_ERRORS as e:
        for handle in handles:
            handle.cancel()
        param = "input" if job.api == "responses" else "messages" if job.chat else "prompt"
        raise _prompt_refused(e, param) from None
    except RuntimeError as e:  # the engine stopped (shutting down, or failed)
        for handle in handles:
            handle.cancel()
        raise ApiError(503, f"the engine is not running: {engine.error or e}") from None
    return handles


async def _responses(
    server: Server, handles: list[RequestHandle]
) -> AsyncGenerator[tuple[int, GenerationResponse | None], None]:
    """(choice index, response) as they come from every handle; (-1, None) at least every POLL_S
    (the caller looks at its client then). Ends when every choice has ended; closed early, it
    cancels the choices still running.

    The engine's thread wakes this loop when a response is handed over (`on_response`); the
    loop then takes what is there without waiting. No thread waits per request: with many
    streams, threads waking at every token took the cores OpenBLAS's threads were using."""
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()

    def wake() -> None:  # on the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(arrived.set)

    for handle in handles:
        handle.on_response(wake)
    open_ = sum(not h.done for h in handles)
    looked = time.monotonic()
    try:
        while open_:
            arrived.clear()  # before taking: a response handed over after this sets it again
            for index, handle in enumerate(handles):
                while not handle.done:
                    response = handle.next(0)
                    if response is None:
                        break
                    if response.finish_reason is not None:
                        open_ -= 1
                    yield index, response
            if not open_:
                return
            if time.monotonic() - looked > POLL_S:  # tokens flowing: look around anyway
                looked = time.monotonic()
                yield -1, None
            if not await _wait(arrived, POLL_S):
                looked = time.monotonic()
                yield -1, None
    finally:
        for handle in handles:  # ended ones ignore it; the others stop now (client gone)
            if not handle.done:
                handle.cancel()


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` was set within `seconds`. (asyncio.wait_for in 3.10-3.11 can swallow a
    cancellation that lands as the event is set; asyncio.timeout does not.)"""
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(seconds):
                await event.wait()
        else:
            await asyncio.wait_for(event.wait(), seconds)
        return True
    except (asyncio.TimeoutError, TimeoutError):
        return False


SHUT_DOWN = "the server shut down before the reply finished"


def _failed(response: GenerationResponse) -> ApiError | None:
    """The error a last response means: the engine failed, or cancelled the request (the server
    is shutting down: a client that went away is not answered at all)."""
    if response.finish_reason == "error":
        log.error("a request failed: %s", response.error)
        return ApiError(500, "the request failed in the engine; the server log says why")
    if response.finish_reason == "cancelled":
        return ApiError(503, SHUT_DOWN)
    return None


# -- routes ----------------------------------------------------------------------------------------


def create_app(server: Server) -> Starlette:
    """The Starlette app serving `server`."""
    opts = server.options

    async def checked_body(request: Request) -> tuple[Any, Engine]:
        """What every POST route checks first: the key, the body (JSON, within the size), a
        model ready to serve (ApiError otherwise)."""
        if not _authorized(request, opts.api_key):
            raise ApiError(401, "a valid API key is required")
        body = await _body(request, opts.max_body_bytes)
        if server.engine is None:
            raise ApiError(503, server.error or "the model is still loading")
        return body, server.engine

    async def health(request: Request) -> Response:
        if server.engine is None:
            status = "failed" if server.error else "loading"
            return JSONResponse({"status": status, "error": server.error}, status_code=503)
        if server.engine.closed:  # its thread stopped (shutting down, or an error)
            error = server.engine.error  # None when it was closed (shutting down)
            return JSONResponse({"status": "stopped", "error": error}, status_code=503)
        return JSONResponse({"status": "ok", "model": opts.model_id})

    async def models(request: Request) -> Response:
        if not _authorized(request, opts.api_key):
            return _error("chat", ApiError(401, "a valid API key is required"))
        context = server.engine.model.config.max_position_embeddings if server.engine else None
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": opts.model_id,
                        "object": "model",
                        "type": "model",
                        "display_name": opts.model_id,
                        "created": 0,
                        "created_at": "1970-01-01T00:00:00Z",
                        "owned_by": "mlxinfer",
                        "context_length": context,
                    }
                ],
                "has_more": False,
                "first_id": opts.model_id,
                "last_id": opts.model_id,
            }
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(
            server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def endpoint(api: str, parse: Callable[[Any, str, Any], Job]):
        async def handler(request: Request) -> Response:
            response = await _handle(request, api, parse)
            server.metrics.request(request.url.path, response.status_code)
            return response

        return handler

    async def _handle(request: Request, api: str, parse) -> Response:
        try:
            body, engine = await checked_body(request)
            job = parse(body, opts.model_id, engine.tokenizer)
            handles = await _submit(server, job)
        except ApiError as e:
            return _error(api, e)
        if job.stream:
            return StreamingResponse(
                _stream(server, job, handles),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        try:
            choices = await _collect(server, request, handles)
        except ApiError as e:
            return _error(api, e)
        if choices is None:  # the client went away: nobody to answer
            return Response(status_code=499)
        if job.api == "responses":
            first = choices[0]
            body = openai_responses.response_body(
                job,
                first.result.text,
                first.result.finish_reason,
                first.prompt_tokens,
                len(first.result.tokens),
                first.result.metrics,
            )
            return JSONResponse(body)
        body = await anyio.to_thread.run_sync(  # (decodes every token: not on the loop)
            protocol.response_body, job, choices, engine.tokenizer, limiter=server.limiter
        )
        return JSONResponse(body)

    async def count_tokens(request: Request) -> Response:
        try:
            body, engine = await checked_body(request)
            tokenizer = engine.tokenizer
            if not isinstance(body, dict):
                raise protocol.bad("the body must be a JSON object")
            protocol._take(body, {"model", "messages", "system"}, "/v1/messages/count_tokens")
            protocol.check_model(body, opts.model_id)
            messages = protocol.anthropic_messages(body, tokenizer, "count_tokens")
            ids = await anyio.to_thread.run_sync(
                lambda: tokenizer.apply_chat_template(messages), limiter=server.limiter
            )
        except ApiError as e:
            return _error("messages", e)
        except PROMPT_ERRORS as e:
            return _error("messages", _prompt_refused(e, "messages"))
        return JSONResponse({"input_tokens": len(ids)})

    async def not_found(request: Request, exc: Exception) -> Response:
        api = "messages" if request.url.path.startswith("/v1/messages") else "chat"
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _error(
                api, ApiError(405, f"{request.method} is not allowed on {request.url.path}")
            )
        return _error(api, ApiError(404, f"no route {request.method} {request.url.path}"))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return _error("chat", ApiError(500, "internal error; the server log says why"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start_loading()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(server.close)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/metrics", metrics),
            Route("/v1/chat/completions", endpoint("chat", protocol.parse_chat), methods=["POST"]),
            Route(
                "/v1/completions",
                endpoint("completions", protocol.parse_completion),
                methods=["POST"],
            ),
            Route("/v1/messages", endpoint("messages", protocol.parse_messages), methods=["POST"]),
            Route("/v1/responses", endpoint("responses", openai_responses.parse), methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_found, 500: server_error},
        lifespan=lifespan,
    )


async def _collect(
    server: Server, request: Request, handles: list[RequestHandle]
) -> list[Choice] | None:
    """Every choice whole, or None if the client disconnected first (the choices cancelled)."""
    seen: list[list[GenerationResponse]] = [[] for _ in handles]
    async with contextlib.aclosing(_responses(server, handles)) as arriving:
        async for index, response in arriving:
            if response is None:
                if await request.is_disconnected():  # closing _responses cancels the rest
                    for handle in handles:
                        if not handle.done:
                            server.metrics.cancelled()
                    return None
                continue
            seen[index].append(response)
            failure = _failed(response) if response.finish_reason else None
            if failure is not None:
                raise failure
    choices = []
    for handle, responses in zip(handles, seen, strict=True):
        result = handle.result()  # (every response is in; this only assembles them)
        server.metrics.finished(result.metrics, handle.prompt_tokens, len(result.tokens))
        choices.append(Choice(responses, result, handle.prompt_tokens))
    return choices


def _sse(data: dict | str, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


async def _stream(
    server: Server, job: Job, handles: list[RequestHandle]
) -> AsyncGenerator[str, None]:
    """A streamed reply as server-sent events (_events). A client that disconnects cancels the
    stream's task, wherever it was: the choices not ended are cancelled on the way out."""
    try:
        async with contextlib.aclosing(_events(server, job, handles)) as events:
            async for event in events:
                yield event
    finally:
        for handle in handles:
            if not handle.done:
                handle.cancel()
                server.metrics.cancelled()


async def _events(
    server: Server, job: Job, handles: list[RequestHandle]
) -> AsyncGenerator[str, None]:
    """OpenAI's chunks then `data: [DONE]`, Anthropic's event sequence, or Responses' events."""
    assert server.engine is not None
    tokenizer = server.engine.tokenizer
    if job.api == "responses":
        async for line in _responses_events(server, job, handles):
            yield line
        return
    anthropic = job.api == "messages"
    counts = [0] * len(handles)
    metrics: list[RequestMetrics | None] = [None] * len(handles)
    if anthropic:
        start: dict[str, Any] = {"id": f"msg_{job.id}", "type": "message", "role": "assistant"}
        start["model"] = job.model
        start |= {"content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {"input_tokens": handles[0].prompt_tokens, "output_tokens": 0}
        yield _sse({"type": "message_start", "message": start}, "message_start")
        block: dict[str, Any] = {"type": "content_block_start", "index": 0}
        block["content_block"] = {"type": "text", "text": ""}
        yield _sse(block, "content_block_start")
    elif job.api == "chat":
        roles = [protocol.delta(job, i, None, tokenizer, role=True) for i in range(len(handles))]
        yield _sse(protocol.chunk(job, roles))
    sent = [0] * len(handles)  # characters of each completion so far (logprobs' text_offset)
    if job.echo:  # the prompt first, as the reply's start
        echoed = [protocol.delta(job, i, None, tokenizer, text=job.prompt) for i in range(job.n)]
        yield _sse(protocol.chunk(job, echoed))
        sent = [len(job.prompt)] * len(handles)
    last: GenerationResponse | None = None
    tokens: list[int] = []  # choice 0's: which stop string ended it
    readers = [ToolCallStream() for _ in handles] if job.tools else None
    quiet_since = time.monotonic()
    async with contextlib.aclosing(_responses(server, handles)) as responses:
        async for index, response in responses:
            if response is None:
                if time.monotonic() - quiet_since > KEEP_ALIVE_S:
                    quiet_since = time.monotonic()
                    yield _sse({"type": "ping"}, "ping") if anthropic else ": keep-alive\n\n"
                continue
            quiet_since = time.monotonic()
            counts[index] += response.token >= 0
            if index == 0 and response.token >= 0:
                tokens.append(response.token)
            if response.finish_reason is not None:
                metrics[index] = response.metrics
                prompt = handles[index].prompt_tokens
                server.metrics.finished(response.metrics, prompt, counts[index])
                error = _failed(response)
                if error is not None:  # the stream ends with an error event the clients raise
                    yield _sse(error.anthropic(), "error") if anthropic else _sse(error.openai())
                    return
            if anthropic:
                last = response
                if response.text:
                    delta = {"type": "text_delta", "text": response.text}
                    event = {"type": "content_block_delta", "index": 0, "delta": delta}
                    yield _sse(event, "content_block_delta")
                continue
            part = _part(job, index, response, tokenizer, readers, sent[index])
            sent[index] += len(response.text)
            if part is not None:
                yield _sse(protocol.chunk(job, [part]))
    first = metrics[0]
    cached = first.cached_prompt_tokens if first is not None else 0
    if anthropic:
        reason = last.finish_reason if last is not None else "eos"
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        ending = {
            "stop_reason": protocol.STOP_REASON.get(reason or "", "end_turn"),
            "stop_sequence": protocol.matched_stop(tokenizer, job, tokens, reason),
        }
        usage = protocol.anthropic_usage(handles[0].prompt_tokens, counts[0], cached)
        event = {"type": "message_delta", "delta": ending, "usage": usage}
        event["metrics"] = protocol.metrics_extension(first)
        yield _sse(event, "message_delta")
        yield _sse({"type": "message_stop"}, "message_stop")
        return
    if job.include_usage:
        usage = protocol.usage(handles[0].prompt_tokens, sum(counts), cached)
        body = protocol.chunk(job, [], usage)
        body["metrics"] = protocol.metrics_extension(first)
        yield _sse(body)
    yield _sse("[DONE]")


async def _responses_events(
    server: Server, job: Job, handles: list[RequestHandle]
) -> AsyncGenerator[str, None]:
    """/v1/responses streamed: openai_responses.EventWriter's events, as the engine answers."""
    writer = openai_responses.EventWriter(job)
    for event in writer.start():
        yield _sse(event, event["type"])
    count, quiet_since = 0, time.monotonic()
    async with contextlib.aclosing(_responses(server, handles)) as responses:
        async for _, response in responses:
            if response is None:
                if time.monotonic() - quiet_since > KEEP_ALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            quiet_since = time.monotonic()
            count += response.token >= 0
            finished = response.finish_reason is not None
            if finished:
                server.metrics.finished(response.metrics, handles[0].prompt_tokens, count)
                error = _failed(response)
                if error is not None:
                    event = writer.failed(error)
                    yield _sse(event, event["type"])
                    return
            for event in writer.delta(response.text, finished):
                yield _sse(event, event["type"])
            if finished:
                ending = writer.finish(
                    response.finish_reason, handles[0].prompt_tokens, count, response.metrics
                )
                for event in ending:
                    yield _sse(event, event["type"])


def _part(job, index, response, tokenizer, readers, offset) -> dict | None:
    """One choice's part of an OpenAI stream event for `response` (None: nothing to send yet),
    tool calls read out of the text when the request offered tools."""
    if readers is None:
        if response.text or response.finish_reason is not None or job.logprobs is not None:
            return protocol.delta(job, index, response, tokenizer, offset=offset)
        return None
    reader = readers[index]
    text, calls = reader.feed(response.text)
    if response.finish_reason is not None:
        more, more_calls = reader.finish()
        text, calls = text + more, calls + more_calls
    if not (text or calls or response.finish_reason is not None or job.logprobs is not None):
        return None
    first_new = len(reader.calls) - len(calls)
    return protocol.delta(
        job,
        index,
        response,
        tokenizer,
        offset=offset,
        text=text,
        tool_calls=[c.openai(first_new + k) for k, c in enumerate(calls)],
        made_calls=bool(reader.calls),
    )
