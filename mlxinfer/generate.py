"""Generation: prefill the prompt into the KV cache in chunks, then decode one token at a time.

    prompt ids -> prefill (chunks, LM head on the last position only) -> logits [1, vocab]
               -> sampler -> token -> decode_step(token, cache) -> logits -> ...
    tokens -> TextStream (detokenizer, stop strings, EOS, budget) -> GenerationResponse per token

stream_generate drives the scheduler (scheduler.py, and through it the runner) with a batch of
one: the same prefill passes, decode steps and responses as the Engine. generate_tokens is the bare
loop over the same steps (steps.py), for a sampler and caches of the caller's.

On a GPU decoding is pipelined with mx.async_eval: step n+1 is queued before token n is read back
on the host, so the device never waits for Python between steps. On the CPU it is not: there the
queued step competes with the host thread for the same cores, so token n was read back only once
step n+1 was mostly done (3 tokens reported 48.9 tok/s against 27 real), and measured end to end
pipelining bought nothing. Timing lives here, never in the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from typing import cast

import mlx.core as mx
import numpy as np

from .cache import CacheSpec, cache_spec
from .metrics import RequestMetrics
from .model import Model
from .responses import GenerationResponse, StopStrings, TextStream, TokenLogprobs
from .sampling import SamplingParams
from .scheduler import EngineOptions, Request, Scheduler, token_budget
from .steps import (
    DEFAULT_PREFILL_CHUNK,
    PrefillProgress,
    decode_step,
    pipelines_decode,
    prefill,
)
from .streams import own_streams
from .tokenizer import Tokenizer

__all__ = [  # GenerationResponse & co. live in responses.py, the steps in steps.py; importable
    "GenerationResponse",  # from here as before
    "RequestMetrics",
    "StopStrings",
    "TextStream",
    "TokenLogprobs",
    "decode_step",
    "prefill",
]

TokenSampler = Callable[[mx.array], mx.array]  # logits [B, vocab] -> token ids [B]
Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages [{"role", "content"}]


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row: logits `[B, vocab]` -> ids `[B]`."""
    return mx.argmax(logits, axis=-1)


def _decode_loop(
    model: Model,
    prompt_ids: list[int],
    max_tokens: int,
    sampler: TokenSampler,
    cache: list,
    prefill_chunk: int,
) -> Iterator[int]:
    """generate_tokens' loop: a sampler of the caller's, caches of the caller's."""
    max_tokens = token_budget(model, prompt_ids, max_tokens)
    pipelined = pipelines_decode()
    token = sampler(prefill(model, mx.array([prompt_ids]), cache, prefill_chunk))
    mx.async_eval(token)
    try:
        for n in range(max_tokens):
            last = n + 1 == max_tokens
            if pipelined and not last:  # queue step n+1 before reading token n
                next_token = sampler(decode_step(model, token, cache))
                mx.async_eval(next_token)
            yield cast(int, token.item())
            if not last:
                if not pipelined:  # step n+1 only after token n is on the host
                    next_token = sampler(decode_step(model, token, cache))
                    mx.async_eval(next_token)
                token = next_token
    finally:
        # A caller that stops early (EOS, stop string) leaves one step queued; a thread that ends
        # with work still queued on its stream aborts the process at exit (MLX 0.32).
        mx.synchronize()


def generate_tokens(
    model: Model,
    prompt_ids: list[int],
    max_tokens: int,
    sampler: TokenSampler = greedy,
    cache: list | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[int]:
    """The bare token generator: up to `max_tokens` ids from any `sampler` (logits [1, vocab] ->
    ids [1]) into any `cache` (the caller decides when to stop early)."""
    caches = cache if cache is not None else model.make_cache()
    yield from _decode_loop(model, prompt_ids, max_tokens, sampler, caches, prefill_chunk)


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    cache: CacheSpec | None = None,
    prefill_progress: PrefillProgress | None = None,
    draft_model: Model | None = None,
    **cache_options,
) -> Generator[GenerationResponse, None, None]:
    """Generate from `prompt`, yielding one GenerationResponse per token.

    `prompt` is text, token ids, or a conversation: a list of `{"role", "content"}` messages,
    always rendered with the model's chat template. `max_tokens` overrides
    `sampling.max_tokens`; `chat=True` wraps a text prompt as one user message in the chat
    template. `prefill_progress(done, total)` is called after each prefill chunk but the last.
    Runs on the calling thread (any thread), through the same scheduler and decode step as the
    Engine, with a batch of one.

    KV cache: `cache`, a CacheSpec, or its fields as keywords: `max_kv_size` bounds it to that
    many tokens per layer (a rotating cache keeping the first `kv_keep` tokens as attention sinks
    and the latest ones after them); `kv_bits` (8 or 4) stores keys and values quantized in groups
    of `kv_group_size`. See `Model.make_cache`.

    `draft_model`: a second, smaller loaded model that shares the tokenizer, proposing tokens
    for speculative decoding when `sampling.speculation` is "draft" (the same tokens, sooner)."""
    own_streams()  # this thread's MLX streams are cleared as it ends (streams.py)
    params = sampling or SamplingParams()
    max_tokens = params.max_tokens if max_tokens is None else max_tokens
    check_max_tokens(max_tokens)
    options = EngineOptions(
        max_batch=1, cache=cache_spec(cache, **cache_options), draft_model=draft_model
    )
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    scheduler = Scheduler(model, tokenizer, options)
    request = Request(0, prompt_ids, params, max_tokens)
    request.progress = prefill_progress
    scheduler.check(request)  # clips max_tokens to the context the prompt leaves
    mx.reset_peak_memory()
    request.submitted = time.perf_counter()
    scheduler.add(request)
    try:
        while scheduler.has_work():
            for _, response in scheduler.step():
                yield response
    finally:
        # A caller that stops early leaves a step queued on a GPU; a thread that ends with work
        # still queued on its stream aborts the process at exit (MLX 0.32).
        mx.synchronize()


def check_max_tokens(max_tokens: object) -> int:
    """max_tokens must be an integer >= 1: a ValueError saying so otherwise."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return max_tokens


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    return_metrics: bool = False,
    cache: CacheSpec | None = None,
    draft_model: Model | None = None,
    **cache_options,
) -> str | tuple[str, RequestMetrics]:
    """Generate from `prompt` and return the text, or (text, metrics) with return_metrics=True.
    Greedy unless `sampling` says otherwise; stops at EOS, a stop string or max_tokens.
    `cache`, `cache_options` and `draft_model` are stream_generate's."""
    text: list[str] = []
    metrics: RequestMetrics | None = None
    responses = stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens,
        sampling,
        chat,
        cache,
        draft_model=draft_model,
        **cache_options,
    )
    for response in responses:
        text.append(response.text)
        metrics = response.metrics or metrics
    if not return_metrics:
        return "".join(text)
    if metrics is None:  # the last response always has them
        raise RuntimeError("generation ended without metrics")
    return "".join(text), metrics


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


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, chat: bool = False) -> list[int]:
    """Token ids for a prompt given as text (optionally through the chat template), as token ids,
    or as a list of chat messages (always through the chat template)."""
    if isinstance(prompt, str):
        check_utf8(prompt, "prompt")
        if chat:
            return _chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        raise ValueError("prompt is one message; pass a conversation as a list of messages")
    items: list = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        return _chat_ids(tokenizer, check_messages(items))
    if any(isinstance(p, (str, list, tuple, dict)) for p in items):
        raise ValueError(
            f"prompt is a list of {len(items)} prompts, but generation takes one prompt at a time "
            "(text, token ids, or a list of chat messages); for many prompts use "
            "mlxinfer.batch_generate or an mlxinfer.Engine"
        )
    if chat:
        raise ValueError("chat=True needs a text prompt or chat messages, not token ids")
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in items):
        raise ValueError("prompt token ids must be integers")
    ids = [int(t) for t in items]
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {tokenizer.vocab_size}): {bad[:5]}")
    return ids


def _chat_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return cast(list[int], tokenizer.apply_chat_template(messages))  # tokenize=True: ids
