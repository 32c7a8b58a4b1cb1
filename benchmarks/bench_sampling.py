"""Cost of the full sampling chain against a greedy decode step, on the default model (49k vocab).

    python benchmarks/bench_sampling.py [--tokens 64] [--reps 5]

Two measurements, each alternating A (greedy) and B (the full chain) with one warm-up:
1. decode_tps of whole generations (ignore_eos, fixed seed, same prompt);
2. the chain alone on [1, 49152] logits, evaluated step by step, against the mean decode step time.
"""

from __future__ import annotations

import argparse
import json
import time

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx
import numpy as np
from common import machine_info, summary

from mlxinfer.sampling import Sampler

FULL_CHAIN = dict(
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    min_p=0.05,
    repetition_penalty=1.1,
    presence_penalty=0.2,
    frequency_penalty=0.2,
    seed=0,
)
TOP_P_ONLY = dict(temperature=0.7, top_p=0.9, seed=0)  # no top-k: top-p sorts the whole vocabulary
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_tps(model, tokenizer, params: mlxinfer.SamplingParams) -> float:
    _, metrics = mlxinfer.generate(
        model, tokenizer, PROMPT, sampling=params, chat=True, return_metrics=True
    )
    return metrics.decode_tps


def chain_ms(vocab: int, params: mlxinfer.SamplingParams, steps: int = 200) -> float:
    """Mean wall time of one sampler call (penalties, filters, draw, bookkeeping) on the device."""
    sampler = Sampler(params, vocab, prompt_ids=list(range(64)))
    logits = mx.array(np.random.default_rng(0).normal(size=(1, vocab)) * 4, mx.float32)
    mx.eval(logits)
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(sampler(logits))
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = mlxinfer.load()
    vocab = model.config.vocab_size
    greedy = mlxinfer.SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    configs = {
        "greedy": greedy,
        "full_chain": mlxinfer.SamplingParams(
            max_tokens=args.tokens, ignore_eos=True, **FULL_CHAIN
        ),
        "top_p_only": mlxinfer.SamplingParams(
            max_tokens=args.tokens, ignore_eos=True, **TOP_P_ONLY
        ),
    }
    for params in configs.values():
        decode_tps(model, tokenizer, params)  # warm-up, not counted
    tps = {name: [] for name in configs}
    chain_alone = {name: [] for name in configs}
    for _ in range(args.reps):  # A B C A B C
        for name, params in configs.items():
            tps[name].append(decode_tps(model, tokenizer, params))
    for _ in range(args.reps):
        for name, params in configs.items():
            chain_alone[name].append(chain_ms(vocab, params))

    step_ms = 1e3 / np.mean(tps["greedy"])
    result = {
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (default)",
        "vocab": vocab,
        "tokens": args.tokens,
        "reps": args.reps,
        "decode_tps": {k: summary(v) for k, v in tps.items()},
        "decode_tps_ratio_over_greedy": {
            name: float(np.mean(tps[name]) / np.mean(tps["greedy"])) for name in configs
        },
        "sampler_ms": {k: summary(v) for k, v in chain_alone.items()},
        "greedy_decode_step_ms": step_ms,
        "sampler_fraction_of_decode_step": {
            name: float(np.mean(chain_alone[name]) / step_ms) for name in configs
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
