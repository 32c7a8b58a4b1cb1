"""Measuring a server over HTTP: streamed `/v1/completions` requests, timed by the client.

    target = Target("http://127.0.0.1:8080", api_key=None)   # any OpenAI-compatible server
    target.model_id                                      # what its /v1/models lists first
    results = target.wave([body, body, ...])             # sent at once, one thread each
    metrics = results[0].metrics()                       # mlxinfer's definitions (metrics.py)

A request's clock starts when the client sends it; a token "arrives" when the server-sent event
carrying it is read. TTFT is the time to the first event with text, the gaps are between events
with text, and the token count is the server's `usage.completion_tokens` (a server that sends
several tokens in one event has fewer gaps than tokens; the decode speed divides by the tokens).
Memory is the server's own business and is not measured here (None, not 0).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TIMEOUT_S = 600.0  # one request, from its send to its last byte


RETRIES = 6  # a connection reset before any reply (a full listen queue) is tried again


class HttpError(RuntimeError):
    """A request the server refused or broke off: its status and the message it gave.
    `reset`: the connection was reset before any reply (the server's listen queue was full:
    Python's http.server, which mlx_lm.server is, queues 5), which may be tried again."""

    def __init__(self, message: str, reset: bool = False):
        super().__init__(message)
        self.reset = reset


def normalized_url(url: str) -> str:
    """`http(s)://host[:port]` of an OpenAI-compatible server, given with or without `/v1`
    (ValueError for anything else: the flag's or field's message)."""
    parsed = urllib.parse.urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL of a server")
    path = parsed.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{parsed.scheme}://{parsed.netloc}{path}"


@dataclass
class Streamed:
    """One streamed completion as the client saw it (perf_counter seconds)."""

    start: float
    times: list[float] = field(default_factory=list)  # events that carried text
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0

    def metrics(self) -> dict:
        """RequestMetrics.to_dict() by mlxinfer's definitions from what the client saw; the
        memory figures, which a client cannot see, are None."""
        from ..metrics import request_metrics

        tokens = self.completion_tokens if self.completion_tokens is not None else len(self.times)
        m = request_metrics(
            self.start,
            self.times,
            self.prompt_tokens or 0,
            cached_prompt_tokens=self.cached_tokens,
        ).to_dict()
        m["generated_tokens"] = tokens
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
        m["decode_tps"] = (tokens - 1) / span if span > 0 and tokens > 1 else 0.0
        m["tpot_ms"] = span / (tokens - 1) * 1e3 if tokens > 1 else 0.0
        for name in ("peak_memory_mb", "active_memory_mb", "kv_cache_mb", "bandwidth_gbs"):
            m[name] = None
        return m


class Target:
    """An OpenAI-compatible server at `url` (normalized_url's forms)."""

    def __init__(self, url: str, api_key: str | None = None, model_id: str | None = None):
        self.url = normalized_url(url)
        self.api_key = api_key
        self._model_id = model_id

    def _headers(self) -> dict:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, path: str, body: Mapping | None = None, timeout: float = TIMEOUT_S):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, self._headers())
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise HttpError(f"{self.url}{path}: HTTP {e.code}: {_message(e)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            reset = isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected))
            raise HttpError(f"{self.url}{path}: cannot connect: {reason}", reset) from None

    @property
    def model_id(self) -> str:
        """The first model the server lists (GET /v1/models): what requests name."""
        if self._model_id is None:
            with self._open("/v1/models", timeout=30) as response:
                try:
                    listed = json.load(response)["data"]
                    self._model_id = str(listed[0]["id"])
                except (ValueError, KeyError, IndexError, TypeError):
                    raise HttpError(
                        f"{self.url}/v1/models: not an OpenAI model list (no data[0].id)"
                    ) from None
        return self._model_id

    def complete(self, body: Mapping) -> Streamed:
        """POST one streamed /v1/completions request (`body` without model and stream) and
        read it to its end."""
        body = {
            **body,
            "model": self.model_id,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        out = Streamed(start=time.perf_counter())  # a retry's wait is part of its TTFT
        with self._open_retrying("/v1/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # keep-alive comments, event names, blank lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise HttpError(f"{self.url}/v1/completions: {_error_text(event['error'])}")
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        out.times.append(now)
                        out.text += choice["text"]
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                usage = event.get("usage")
                if usage:
                    out.prompt_tokens = usage.get("prompt_tokens")
                    out.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens = details.get("cached_tokens") or 0
        return out

    def _open_retrying(self, path: str, body: Mapping):
        """_open, again after a connection reset before any reply (RETRIES times, waiting 50 ms
        more each time): a server whose listen queue is shorter than the requests in flight."""
        for attempt in range(RETRIES + 1):
            try:
                return self._open(path, body)
            except HttpError as e:
                if not e.reset or attempt == RETRIES:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def wave(self, bodies: Sequence[Mapping]) -> list[Streamed]:
        """Every request at once, one thread each (concurrency = requests in flight); the first
        failure is raised once all have ended."""
        results: list = [None] * len(bodies)

        def send(i: int, body: Mapping) -> None:
            try:
                results[i] = self.complete(body)
            except Exception as e:  # raised on the caller's thread below
                results[i] = e

        threads = [
            threading.Thread(target=send, args=(i, b), daemon=True) for i, b in enumerate(bodies)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def ready(self) -> bool:
        """Whether it takes requests: its GET /health says 200 (ours, vLLM and llama.cpp say 503
        while loading), or, a server without one, its GET /v1/models answers."""
        for path in ("/health", "/v1/models"):
            try:
                with self._open(path, timeout=5) as response:
                    return response.status == 200
            except HttpError as e:
                if "HTTP 404" not in str(e):
                    return False
        return False


def _message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
    except ValueError:
        return error.reason
    return _error_text(body.get("error", body)) if isinstance(body, dict) else str(body)


def _error_text(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
