"""The host side of a request: what each generated token becomes for the caller.

    token id -> TextStream.add: EOS? detokenize (never half a UTF-8 character) -> stop strings
    (held back while they may be starting) -> the token budget -> GenerationResponse

stream_generate and the Engine's scheduler both answer through these, so a request ends the same
way whichever runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metrics import RequestMetrics
from .sampling import SamplingParams
from .tokenizer import Tokenizer


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability and the n most likely alternatives, from the model's
    distribution before any penalty or filter."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class GenerationResponse:
    """One generated token. `text` is the new text it completes (may be empty while a UTF-8
    character or a possible stop string is incomplete); the last response has `finish_reason`
    ('eos', 'stop' or 'length'; from the Engine also 'cancelled' or 'error', with `error` saying
    why) and `metrics`. A last response that brings no token has `token` -1."""

    text: str
    token: int
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None


class TextStream:
    """The host side of one request, token by token: EOS, detokenizing, stop strings (held back
    while they may be starting) and the token budget. stream_generate and the Engine's scheduler
    both use it, so a request ends the same way whichever runs it."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, max_tokens: int):
        self.detokenizer = tokenizer.detokenizer()
        self.stops = StopStrings(params.stop)
        self.eos = frozenset() if params.ignore_eos else frozenset(tokenizer.eos_token_ids)
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.token_times: list[float] = []  # when each token reached the host

    def add(self, token: int, now: float) -> tuple[str, str | None]:
        """A new token that reached the host at `now`: (text it completes, finish reason or None)."""
        self.tokens.append(token)
        self.token_times.append(now)
        if token in self.eos:
            text, stopped = self.stops.finish(self.detokenizer.finalize())
            return text, "stop" if stopped else "eos"
        text, stopped = self.stops.feed(self.detokenizer.add_token(token))
        if stopped:
            return text, "stop"
        if len(self.tokens) >= self.max_tokens:
            rest, stopped = self.stops.finish(self.detokenizer.finalize())
            return text + rest, "stop" if stopped else "length"
        return text, None

    def flush(self) -> str:
        """The request ends early (cancelled): the text still held back."""
        return self.stops.finish(self.detokenizer.finalize())[0]


class StopStrings:
    """Finds stop strings that span token boundaries: text that could be the start of a stop string
    is held back until it is known not to be one; a stop string is never emitted."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was found)."""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        text = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(text) :]
        return text, False

    def finish(self, delta: str) -> tuple[str, bool]:
        """The end of generation: add the last `delta`; what is still held back is text after all."""
        text, stopped = self.feed(delta)
        if not stopped:
            text, self.pending = text + self.pending, ""
        return text, stopped


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
