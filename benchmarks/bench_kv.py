"""Decode speed and memory against context length with a bounded KV cache (the goal: with a
512-token window, decode_tps and memory at contexts 512, 2k and 8k are flat within 10%).

    python benchmarks/bench_kv.py [--contexts 512,2048,8000] [--tokens 64] [--reps 3]
    python benchmarks/bench_kv.py --kv-bits 8 --no-contrast --part default

Two parts, each a sweep over context lengths L (random token ids of exact length, fixed seed; EOS
ignored, so every request generates --tokens):
1. the default model (mlxinfer.load(), float32 policy on the CPU) through mlxinfer.generate with
   max_kv_size=--window (a rotating cache keeping --keep sink tokens); against it the growing
   cache (max_kv_size=None), and with --kv-bits the rotating cache stored quantized;
2. a small random-weight "mistral" model with sliding_window=--window, whose make_cache() gives
   every layer a rotating cache of its window; against it the same model (same seed, same
   weights) without a window: full attention, growing cache.
L + --tokens must fit the context: 8192 for the default model, hence 8000 rather than 8192.
For every repetition, lengths and configurations alternate (A B A B at each length) after one
warm-up of each configuration at the shortest length. A bounded configuration's spread over lengths
is max/min - 1 of its per-length means. peak_memory_mb is the process peak during the request (the
resident weights included, as BENCHMARKS.md's protocol defines it); request_peak_memory_mb is that peak less
what was allocated when the request started: the KV cache and activations alone.
"""

from __future__ import annotations

import argparse
import time

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx
import numpy as np
from common import machine_info, random_model, save_result, summary

from mlxinfer.generate import generate_tokens, prefill
from mlxinfer.metrics import RequestMetrics, request_metrics

FLAT = 0.10  # the goal: bounded configurations vary by at most 10% over context lengths
METRICS = ("decode_tps", "prefill_tps", "ttft_ms", "kv_cache_mb", "peak_memory_mb")
FLAT_METRICS = ("decode_tps", "kv_cache_mb", "peak_memory_mb", "request_peak_memory_mb")
GOAL_METRICS = ("decode_tps", "kv_cache_mb", "peak_memory_mb")
SYNTHETIC = {
    "model_type": "mistral",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def record(m: RequestMetrics, resident: int) -> dict:
    """The metrics this benchmark keeps, plus the request's own peak above `resident` bytes."""
    out = {key: getattr(m, key) for key in METRICS}
    out["request_peak_memory_mb"] = m.peak_memory_mb - resident / 2**20
    return out


def run_generate(model, tokenizer, prompt: list[int], tokens: int, options: dict) -> dict:
    """One request through the public API, with its cache options."""
    params = mlxinfer.SamplingParams(max_tokens=tokens, ignore_eos=True)
    resident = mx.get_active_memory()
    _, m = mlxinfer.generate(
        model, tokenizer, prompt, sampling=params, return_metrics=True, **options
    )
    return record(m, resident)


def run_tokens(model: mlxinfer.Model, prompt: list[int], tokens: int) -> dict:
    """One greedy request on the model's own cache (make_cache()), timed per token."""
    cache = model.make_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    token_times = []
    for _ in generate_tokens(model, prompt, tokens, cache=cache):
        token_times.append(time.perf_counter())
    m = request_metrics(
        start,
        token_times,
        prompt_tokens=len(prompt),
        peak_memory_bytes=mx.get_peak_memory(),
        kv_cache_bytes=sum(c.nbytes for c in cache),
    )
    return record(m, resident)


def sweep(runners: dict, prompts: dict[int, list[int]], reps: int) -> dict:
    """{config: {L: {metric: summary}}}: one warm-up per config at the shortest L, then for each
    repetition every length, and at each length every config in turn."""
    shortest = prompts[min(prompts)]
    for runner in runners.values():
        runner(shortest)  # warm-up, not counted
    samples = {name: {L: [] for L in prompts} for name in runners}
    for _ in range(reps):
        for L, prompt in prompts.items():
            for name, runner in runners.items():
                samples[name][L].append(runner(prompt))
    return {
        name: {
            L: {key: summary([r[key] for r in runs]) for key in runs[0]}
            for L, runs in by_length.items()
        }
        for name, by_length in samples.items()
    }


def spread(by_length: dict) -> dict:
    """max/min - 1 over lengths of each metric's mean, and whether it is within FLAT."""
    out = {}
    for key in FLAT_METRICS:
        means = [stats[key]["mean"] for stats in by_length.values()]
        value = max(means) / min(means) - 1 if min(means) > 0 else float("inf")
        out[key] = {"spread": value, "within_10pct": value <= FLAT}
    return out


def ratios(results: dict, bounded: str, unbounded: str) -> dict:
    """Bounded over unbounded, per length and metric (means)."""
    return {
        L: {
            key: stats[key]["mean"] / results[unbounded][L][key]["mean"]
            for key in ("decode_tps", "kv_cache_mb", "peak_memory_mb")
        }
        for L, stats in results[bounded].items()
    }


def summarize(results: dict, bounded: list[str], contrast: tuple[str, str] | None) -> dict:
    spreads = {name: spread(results[name]) for name in bounded}
    out = {
        "results": results,
        "spread": spreads,
        "goal_met": {
            name: all(s[key]["within_10pct"] for key in GOAL_METRICS) for name, s in spreads.items()
        },
    }
    if contrast and contrast[1] in results:
        out[f"{contrast[0]}_over_{contrast[1]}"] = ratios(results, *contrast)
    return out


def default_model_part(args, contexts: list[int]) -> dict:
    model, tokenizer = mlxinfer.load()
    limit = model.config.max_position_embeddings
    if max(contexts) + args.tokens > limit:
        raise SystemExit(
            f"context {max(contexts)} + {args.tokens} tokens exceeds the model's {limit}"
        )
    bounded = {"max_kv_size": args.window, "kv_keep": args.keep}
    configs = {"rotating": bounded}
    if not args.no_contrast:
        configs["growing"] = {}
    if args.kv_bits:
        configs[f"rotating_kv{args.kv_bits}"] = {**bounded, "kv_bits": args.kv_bits}
    rng_high = tokenizer.vocab_size - 100
    prompts = {L: np.random.default_rng(0).integers(100, rng_high, L).tolist() for L in contexts}
    runners = {
        name: lambda p, o=options: run_generate(model, tokenizer, p, args.tokens, o)
        for name, options in configs.items()
    }
    results = sweep(runners, prompts, args.reps)
    bounded_names = [name for name in configs if name != "growing"]
    return {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (default), float32 policy",
        "weight_mb": model.nbytes / 2**20,
        "configs": configs,
        **summarize(results, bounded_names, ("rotating", "growing")),
    }


def synthetic_part(args, contexts: list[int]) -> dict:
    limit = SYNTHETIC["max_position_embeddings"]
    if max(contexts) + args.tokens > limit:
        raise SystemExit(
            f"context {max(contexts)} + {args.tokens} tokens exceeds the model's {limit}"
        )
    configs = {"sliding": {**SYNTHETIC, "sliding_window": args.window}}
    if not args.no_contrast:
        configs["full"] = SYNTHETIC
    models = {name: random_model(config) for name, config in configs.items()}
    windows = set(models["sliding"].config.layer_windows)
    if windows != {args.window}:
        raise SystemExit(f"the sliding-window model's layer windows are {windows}")
    prompts = {
        L: np.random.default_rng(0).integers(0, SYNTHETIC["vocab_size"], L).tolist()
        for L in contexts
    }
    logits = prefill(
        models["sliding"], mx.array([prompts[min(contexts)]]), models["sliding"].make_cache()
    )
    if not mx.isfinite(logits).all().item():
        raise SystemExit("the synthetic model gives non-finite logits with random weights")
    runners = {
        name: lambda p, m=model: run_tokens(m, p, args.tokens) for name, model in models.items()
    }
    results = sweep(runners, prompts, args.reps)
    return {
        "model": "random weights, float32 policy (as mlxinfer.load() on the CPU)",
        "weight_mb": models["sliding"].nbytes / 2**20,
        "configs": configs,
        "resident_models": list(models),
        **summarize(results, ["sliding"], ("sliding", "full")),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--contexts", default="512,2048,8000", help="comma-separated prompt lengths"
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--window", type=int, default=512, help="max_kv_size and sliding_window")
    parser.add_argument("--keep", type=int, default=4, help="sink tokens of the rotating cache")
    parser.add_argument(
        "--kv-bits", type=int, choices=(4, 8), default=None, help="add a quantized rotating cache"
    )
    parser.add_argument("--no-contrast", action="store_true", help="skip the growing-cache runs")
    parser.add_argument("--part", choices=("all", "default", "synthetic"), default="all")
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/)")
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    if args.tokens < 2:
        parser.error("--tokens must be >= 2 (decode_tps needs two tokens)")

    machine = machine_info()
    result = {
        "machine": machine,
        "prompt": "random token ids (seed 0)",
        "contexts": contexts,
        "tokens": args.tokens,
        "reps": args.reps,
        "window": args.window,
        "keep": args.keep,
        "goal": f"bounded cache: decode_tps, kv_cache_mb, peak_memory_mb within {FLAT:.0%} over contexts",
    }
    if args.part in ("all", "default"):
        result["default_model"] = default_model_part(args, contexts)
    if args.part in ("all", "synthetic"):
        result["sliding_window_model"] = synthetic_part(args, contexts)
    save_result(result, "kv-context", args.out)


if __name__ == "__main__":
    main()
