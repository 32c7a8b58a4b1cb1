"""The two steps of generation, written once: a prefill pass and a decode step.

    prompt ids [B, T] --prefill_pass--> cache filled, logits [B, vocab] at each row's last position
    tokens [B]        --decode_step---> cache one longer, next-token logits [B, vocab]

Everything that runs the model goes through these: `prefill` (a whole prompt in chunks, for
generate_tokens, inspect and the tests), the runner (runner.py: one chunk of a request, or several
fresh prompts padded into one pass, and the batch's decode steps), and through the runner
stream_generate, batch_generate and the Engine. Timing, sampling and scheduling live above.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .cache import KVCache
from .model import Model

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per pass: bounds the attention scores' memory

PrefillProgress = Callable[[int, int], None]  # (prompt tokens done, prompt tokens in all)


def prefill_pass(
    model: Model, ids: mx.array, cache: list, last: list[int] | None = None
) -> mx.array:
    """Run prompt tokens `[B, T]` through the model into `cache` and return the logits `[B, vocab]`
    of each row's last real position: `last[b]`, or T - 1 for every row. Rows shorter than T are
    padded at the end; causal attention keeps a row's real tokens from seeing its padding, so each
    row's logits are exact (the padding's keys are in the cache: the caller keeps only the real
    ones). The LM head runs on those positions only."""
    h = model.hidden_states(ids, cache)  # [B, T, D]
    if last is None or all(n == ids.shape[1] - 1 for n in last):
        h = h[:, -1:, :]
    else:
        h = mx.take_along_axis(h, mx.array(last)[:, None, None], axis=1)  # [B, 1, D]
    return model.logits(h)[:, -1, :]


def prefill_chunk(model: Model, ids: mx.array, cache: list) -> None:
    """A prompt chunk `[B, T]` that is not the prompt's last: into `cache`, evaluated now (its
    logits are never needed, so the LM head does not run)."""
    if model.pipeline is None:
        model.hidden_states(ids, cache)
        mx.eval([c.state for c in cache])
        return
    # In a pipeline, this stage's blocks and the send of their output (which the next stage
    # waits for: evaluated, or it waits forever), without the final all_sum: this stage goes on
    # to the next chunk while the next stage computes this one (Model.hidden_states).
    sent = model.hidden_states(ids, cache, last_stage=False)
    mx.eval([c.state for c in cache] + [sent])


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
        prefill_chunk(model, prompt[:, :chunk_size], cache)
        prompt = prompt[:, chunk_size:]
        done += chunk_size
        if progress is not None:
            progress(done, total)
    return prefill_pass(model, prompt, cache)


def decode_step(model: Model, tokens: mx.array, cache: list) -> mx.array:
    """One token per sequence `[B]` -> next-token logits `[B, vocab]` (`cache` single-sequence
    caches for B = 1, or a batch's caches with a row per sequence)."""
    return model(tokens[:, None], cache)[:, -1, :]


def verify_step(model: Model, tokens: mx.array, cache: list) -> mx.array:
    """Speculative decoding's pass: T tokens per sequence `[B, T]` (each row's last token and
    the tokens proposed to follow it) -> the logits at every position `[B, T, vocab]`. The
    caches take all T; the caller keeps only the accepted ones (Rows.advance)."""
    return model(tokens, cache)


def pipelines_decode() -> bool:
    """Whether decode steps are queued ahead of the host (on a GPU) or run one at a time (CPU).
    On the CPU the queued step competes with the host thread for the same cores: token n was read
    back only once step n+1 was mostly done, and end to end it bought nothing."""
    return mx.default_device() != mx.cpu
