"""Generation: prefill the prompt into the KV cache in chunks, then decode one token at a time.

    prompt ids -> prefill (chunks, LM head on the last position only) -> logits [1, vocab]
               -> sampler -> token -> decode_step(token, cache) -> logits -> ...
    tokens -> StreamingDetokenizer -> stop-string check -> GenerationResponse per token

On a GPU decoding is pipelined with mx.async_eval: step n+1 is queued before token n is read back
on the host, so the device never waits for Python between steps. On the CPU it is not: there the
queued step competes with the host thread for the same cores, so token n was read back only once
step n+1 was mostly done (3 tokens reported 48.9 tok/s against 27 real), and measured end to end
pipelining bought nothing. Timing lives here, never in the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import KVCache
from .metrics import RequestMetrics, request_metrics
from .model import Model
from .sampling import Sampler, SamplingParams, top_logprobs
from .tokenizer import Tokenizer

TokenSampler = Callable[[mx.array], mx.array]  # logits [B, vocab] -> token ids [B]
Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages [{"role", "content"}]

DEFAULT_PREFILL_CHUNK = 512


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row: logits `[B, vocab]` -> ids `[B]`."""
    return mx.argmax(logits, axis=-1)


PrefillProgress = Callable[[int, int], None]  # (prompt tokens done, prompt tokens in all)


def prefill(
    model: Model,
    prompt: mx.array,
    cache: list[KVCache],
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    progress: PrefillProgress | None = None,
) -> mx.array:
    """Run `[B, T]` prompt ids through the model, filling `cache`; return the last position's
    logits `[B, vocab]`. Chunks bound the attention scores' memory for long prompts; `progress`
    is called after each chunk but the last with (tokens done, tokens in all)."""
    total, done = prompt.shape[1], 0
    while prompt.shape[1] > chunk_size:
        model.hidden_states(prompt[:, :chunk_size], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[:, chunk_size:]
        done += chunk_size
        if progress is not None:
            progress(done, total)
    h = model.hidden_states(prompt, cache)  # [B, T_last, D]
    return model.logits(h[:, -1:, :])[:, -1, :]  # [B, vocab]


def decode_step(model: Model, tokens: mx.array, cache: list[KVCache]) -> mx.array:
    """One token per sequence `[B]` -> next-token logits `[B, vocab]`."""
    return model(tokens[:, None], cache)[:, -1, :]


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability and the n most likely alternatives, from the model's
    distribution before any penalty or filter."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def _decode_loop(
    model: Model,
    prompt_ids: list[int],
    max_tokens: int,
    sampler: TokenSampler,
    cache: list[KVCache],
    prefill_chunk: int,
    n_logprobs: int,
    progress: PrefillProgress | None = None,
) -> Iterator[tuple[int, TokenLogprobs | None]]:
    max_tokens = token_budget(model, prompt_ids, max_tokens)
    pipelined = pipelines_decode()

    def step(logits: mx.array):
        token = sampler(logits)  # [1]
        if not n_logprobs:
            return token, None
        all_lp, top_ids, top_lp = top_logprobs(logits, n_logprobs)
        return token, (mx.take_along_axis(all_lp, token[:, None], axis=-1), top_ids, top_lp)

    def to_host(lp) -> TokenLogprobs | None:
        if lp is None:
            return None
        chosen, ids, values = lp
        return TokenLogprobs(
            chosen.item(), list(zip(ids[0].tolist(), values[0].tolist(), strict=True))
        )

    if max_tokens <= 0:
        return
    token, lp = step(prefill(model, mx.array([prompt_ids]), cache, prefill_chunk, progress))
    mx.async_eval(token, lp)
    try:
        for n in range(max_tokens):
            last = n + 1 == max_tokens
            if pipelined and not last:  # queue step n+1 before reading token n
                next_token, next_lp = step(decode_step(model, token, cache))
                mx.async_eval(next_token, next_lp)
            yield token.item(), to_host(lp)  # the token's arrival time is taken on this return
            if not last:
                if not pipelined:  # step n+1 only after token n is on the host
                    next_token, next_lp = step(decode_step(model, token, cache))
                    mx.async_eval(next_token, next_lp)
                token, lp = next_token, next_lp
    finally:
        # A caller that stops early (EOS, stop string) leaves one step queued; a thread that ends
        # with work still queued on its stream aborts the process at exit (MLX 0.32).
        mx.synchronize()


def pipelines_decode() -> bool:
    """Whether decode steps are queued ahead of the host (on a GPU) or run one at a time (CPU)."""
    return mx.default_device() != mx.cpu


def generate_tokens(
    model: Model,
    prompt_ids: list[int],
    max_tokens: int,
    sampler: TokenSampler = greedy,
    cache: list[KVCache] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield up to `max_tokens` generated token ids (the caller decides when to stop early)."""
    cache = cache if cache is not None else model.make_cache()
    for token, _ in _decode_loop(model, prompt_ids, max_tokens, sampler, cache, prefill_chunk, 0):
        yield token


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


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    max_kv_size: int | None = None,
    kv_keep: int = 4,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_progress: PrefillProgress | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt`, yielding one GenerationResponse per token.

    `prompt` is text, token ids, or a conversation: a list of `{"role", "content"}` messages,
    always rendered with the model's chat template. `max_tokens` overrides
    `sampling.max_tokens`; `chat=True` wraps a text prompt as one user message in the chat
    template. `prefill_progress(done, total)` is called after each prefill chunk but the last.
    Safe to call from any thread.

    KV cache: `max_kv_size` bounds it to that many tokens per layer (a rotating cache keeping the
    first `kv_keep` tokens as attention sinks and the latest ones after them); `kv_bits` (8 or 4)
    stores keys and values quantized in groups of `kv_group_size`. See `Model.make_cache`."""
    params = sampling or SamplingParams()
    max_tokens = params.max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    prompt_ids = encode_prompt(tokenizer, prompt, chat)

    cache = model.make_cache(max_kv_size, kv_keep, kv_bits, kv_group_size)  # validates the options

    mx.reset_peak_memory()
    start = time.perf_counter()
    sampler = Sampler(params, model.config.vocab_size, prompt_ids)
    budget = token_budget(model, prompt_ids, max_tokens)
    text_stream = TextStream(tokenizer, params, budget)
    loop = _decode_loop(
        model,
        prompt_ids,
        budget,
        sampler,
        cache,
        DEFAULT_PREFILL_CHUNK,
        params.logprobs,
        prefill_progress,
    )
    for token, logprobs in loop:
        text, reason = text_stream.add(token, time.perf_counter())
        metrics = None
        if reason is not None:
            metrics = request_metrics(
                start,
                text_stream.token_times,
                prompt_tokens=len(prompt_ids),
                weight_bytes_per_step=model.decode_weight_bytes,
                peak_memory_bytes=mx.get_peak_memory(),
                active_memory_bytes=mx.get_active_memory(),
                kv_cache_bytes=sum(c.nbytes for c in cache),
            )
        yield GenerationResponse(text, token, logprobs, reason, metrics)
        if reason is not None:
            return


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


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    return_metrics: bool = False,
    **cache_options,
) -> str | tuple[str, RequestMetrics]:
    """Generate from `prompt` and return the text, or (text, metrics) with return_metrics=True.
    Greedy unless `sampling` says otherwise; stops at EOS, a stop string or max_tokens.
    `cache_options` are stream_generate's max_kv_size, kv_keep, kv_bits and kv_group_size."""
    text, metrics = [], None
    responses = stream_generate(
        model, tokenizer, prompt, max_tokens, sampling, chat, **cache_options
    )
    for response in responses:
        text.append(response.text)
        metrics = response.metrics or metrics
    return ("".join(text), metrics) if return_metrics else "".join(text)


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


def check_messages(messages: list[dict]) -> list[dict]:
    """A conversation must be `{"role": str, "content": str}` dicts; say which one is not."""
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(
                f"prompt message {i} must have a string 'role' and 'content', got {message!r}"
            )
        check_utf8(message["content"], f"prompt message {i}")
    return messages


def check_utf8(text: str, what: str) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates (command-line arguments, a
    non-UTF-8 locale's stdin); the tokenizer cannot take them: a ValueError naming `what`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (at character {e.start})") from None


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, chat: bool = False) -> list[int]:
    """Token ids for a prompt given as text (optionally through the chat template), as token ids,
    or as a list of chat messages (always through the chat template)."""
    if isinstance(prompt, str):
        check_utf8(prompt, "prompt")
        if chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        raise ValueError("prompt is one message; pass a conversation as a list of messages")
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(check_messages(prompt))
    if any(isinstance(p, (str, list, tuple, dict)) for p in prompt):
        raise ValueError(
            f"prompt is a list of {len(prompt)} prompts, but generation takes one prompt at a time "
            "(text, token ids, or a list of chat messages); for many prompts use "
            "mlxinfer.batch_generate or an mlxinfer.Engine"
        )
    if chat:
        raise ValueError("chat=True needs a text prompt or chat messages, not token ids")
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in prompt):
        raise ValueError("prompt token ids must be integers")
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {tokenizer.vocab_size}): {bad[:5]}")
    return ids
