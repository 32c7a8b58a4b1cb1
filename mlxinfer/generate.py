"""Generation: prefill the prompt into the KV cache in chunks, then decode one token at a time.

    prompt ids -> prefill (chunks, LM head on the last position only) -> logits [1, vocab]
               -> decode_step loop: sample -> token -> model(token, cache) -> logits

Decoding is pipelined with mx.async_eval: step n+1 is queued before token n is read back on the
host, so the device never waits for Python between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx

from .cache import KVCache
from .model import Model
from .tokenizer import Tokenizer

Sampler = Callable[[mx.array], mx.array]  # logits [B, vocab] -> token ids [B]

DEFAULT_PREFILL_CHUNK = 512


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row: logits `[B, vocab]` -> ids `[B]`."""
    return mx.argmax(logits, axis=-1)


def prefill(
    model: Model, prompt: mx.array, cache: list[KVCache], chunk_size: int = DEFAULT_PREFILL_CHUNK
) -> mx.array:
    """Run `[B, T]` prompt ids through the model, filling `cache`; return the last position's
    logits `[B, vocab]`. Chunks bound the attention scores' memory for long prompts."""
    while prompt.shape[1] > chunk_size:
        model.hidden_states(prompt[:, :chunk_size], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[:, chunk_size:]
    h = model.hidden_states(prompt, cache)  # [B, T_last, D]
    return model.logits(h[:, -1:, :])[:, -1, :]  # [B, vocab]


def decode_step(model: Model, tokens: mx.array, cache: list[KVCache]) -> mx.array:
    """One token per sequence `[B]` -> next-token logits `[B, vocab]`."""
    return model(tokens[:, None], cache)[:, -1, :]


def generate_tokens(
    model: Model,
    prompt_ids: list[int],
    max_tokens: int,
    sampler: Sampler = greedy,
    cache: list[KVCache] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield up to `max_tokens` generated token ids (the caller decides when to stop early)."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    context = model.config.max_position_embeddings
    if len(prompt_ids) > context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, longer than the model's context of {context}"
        )
    max_tokens = min(max_tokens, context - len(prompt_ids))
    if max_tokens <= 0:
        return
    cache = cache if cache is not None else model.make_cache()

    logits = prefill(model, mx.array([prompt_ids]), cache, prefill_chunk)
    token = sampler(logits)  # [1]
    mx.async_eval(token)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_token = sampler(decode_step(model, token, cache))
            mx.async_eval(next_token)
        yield token.item()
        if n + 1 < max_tokens:
            token = next_token


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    max_tokens: int = 256,
    chat: bool = False,
) -> str:
    """Generate greedily from `prompt` (text, or token ids) until EOS or `max_tokens`; return the
    generated text. `chat=True` wraps a text prompt as one user message in the chat template."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    detokenizer = tokenizer.detokenizer()
    for token in generate_tokens(model, prompt_ids, max_tokens):
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int], chat: bool = False) -> list[int]:
    """Token ids for a prompt given as text (optionally through the chat template) or as ids."""
    if isinstance(prompt, str):
        if chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)
    if chat:
        raise ValueError("chat=True needs a text prompt, not token ids")
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {tokenizer.vocab_size}): {bad[:5]}")
    return ids
