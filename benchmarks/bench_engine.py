"""The Engine under load: scheduling policies against Poisson arrivals, and the prefix cache.

    python benchmarks/bench_engine.py [--rates 0.5,1,2] [--requests 24] [--reps 1]
    python benchmarks/bench_engine.py --part prefix [--system-tokens 1000] [--prefix-reps 3]
    python benchmarks/bench_engine.py --quick    # 6 requests at one rate, short prefix: smoke test

Default model (mlxinfer.load(): float32 weights on the CPU), greedy, EOS ignored (every request
generates exactly its max_tokens), prompts of random token ids (fixed seed).

Part "load": --requests requests, prompt lengths uniform in [--min-prompt, --max-prompt] tokens,
--tokens generated each, arriving as a Poisson process: a driver thread submits request i at
t_i = (E_1 + ... + E_i) / rate (E standard exponential, seeded; t_0 = 0), the same prompts and the
same unit-rate gaps for every (policy, rate). Each run gets a fresh Engine(max_batch=--max-batch,
policy=...) with its defaults otherwise (prefix cache on: these prompts share no prefix, so it only
costs its copies), warmed up by one short request before the clock starts. First, all requests
submitted at once to a prefill-first engine measure the capacity (requests/s) that the rates are
quoted against. Per (policy, rate): TTFT p50/p99 over requests (metrics.ttft_ms, from submit, so
queueing included), ITL p50/p99 over the pooled gaps of all requests (metrics.itl_ms), queue p50,
and throughput = total generated tokens / (last token of the last request - first submit). With
--reps > 1 the order is rep -> rate -> policy (policies alternate at each rate); percentiles pool
the repetitions, throughput is reported as mean/std over them.

Part "prefix": a --system-tokens shared prefix plus --suffix-tokens different tokens per request,
--prefix-requests requests sent one after another (each waits for the previous to finish) to a
fresh Engine with the prefix cache on (prefix_cache_mb=256, the default) and, as the control, off
(prefix_cache_mb=0); on and off alternate, --prefix-reps times. Each engine is first warmed up by
an unrelated prompt of the same length (random ids, no common prefix). Reported per request index:
TTFT mean/std, metrics.cached_prompt_tokens, and the speed-up over the first request's TTFT.

Both parts also print a table; the JSON (raw per-request samples included) goes to
benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import numpy as np
from common import machine_info, save_result, summary

from mlxinfer.metrics import percentile
from mlxinfer.scheduler import POLICIES


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def warm_up(engine: mlxinfer.Engine, prompt: list[int], tokens: int) -> None:
    params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=tokens)
    engine.submit(prompt, sampling=params).result()


def run_load(model, tokenizer, policy: str, prompts, arrivals, tokens: int, max_batch: int) -> dict:
    """Submit prompts[i] at arrivals[i] seconds from a driver thread; wait for all; raw figures."""
    params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=tokens)
    engine = mlxinfer.Engine(model, tokenizer, max_batch=max_batch, policy=policy)
    try:
        warm_up(engine, list(range(100, 132)), 4)
        handles, submitted = [None] * len(prompts), [0.0] * len(prompts)

        def drive() -> None:
            start = time.perf_counter()
            for i, (prompt, at) in enumerate(zip(prompts, arrivals, strict=True)):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                submitted[i] = time.perf_counter()
                handles[i] = engine.submit(prompt, sampling=params)

        driver = threading.Thread(target=drive, name="bench-driver")
        driver.start()
        driver.join()
        results = [h.result() for h in handles]
    finally:
        engine.close()
    bad = [
        (i, r.finish_reason, r.error) for i, r in enumerate(results) if r.finish_reason != "length"
    ]
    if bad:
        raise RuntimeError(f"{policy}: requests did not generate {tokens} tokens: {bad}")
    metrics = [r.metrics for r in results]
    end = max(s + m.e2e_ms / 1e3 for s, m in zip(submitted, metrics, strict=True))
    generated = sum(m.generated_tokens for m in metrics)
    return {
        "ttft_ms": [m.ttft_ms for m in metrics],
        "queue_ms": [m.queue_ms for m in metrics],
        "e2e_ms": [m.e2e_ms for m in metrics],
        "itl_ms": [round(x, 3) for m in metrics for x in m.itl_ms],
        "throughput_tps": generated / (end - submitted[0]),
        "wall_s": end - submitted[0],
    }


def load_part(model, tokenizer, args, rng) -> dict:
    vocab = tokenizer.vocab_size
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.requests)
    prompts = [rng.integers(100, vocab - 100, n).tolist() for n in lengths]
    unit_arrivals = np.concatenate([[0.0], np.cumsum(rng.standard_exponential(args.requests - 1))])
    rates = [float(x) for x in args.rates.split(",")]
    tokens, max_batch = args.tokens, args.max_batch

    log(f"capacity: {args.requests} requests at once, prefill-first")
    at_once = run_load(
        model, tokenizer, "prefill-first", prompts, [0.0] * len(prompts), tokens, max_batch
    )
    capacity = args.requests / at_once["wall_s"]
    log(f"capacity {capacity:.2f} requests/s, {at_once['throughput_tps']:.1f} tok/s")

    raw = {(p, r): [] for r in rates for p in POLICIES}
    for rep in range(args.reps):
        for rate in rates:
            for policy in POLICIES:
                log(f"rep {rep + 1}/{args.reps}: {policy} at {rate:g} requests/s")
                raw[policy, rate].append(
                    run_load(
                        model, tokenizer, policy, prompts, unit_arrivals / rate, tokens, max_batch
                    )
                )

    runs = []
    for (policy, rate), reps in raw.items():
        pooled = {k: [x for run in reps for x in run[k]] for k in ("ttft_ms", "queue_ms", "itl_ms")}
        runs.append(
            {
                "policy": policy,
                "rate_rps": rate,
                "offered_load": rate / capacity,
                "ttft_p50_ms": percentile(pooled["ttft_ms"], 50),
                "ttft_p99_ms": percentile(pooled["ttft_ms"], 99),
                "itl_p50_ms": percentile(pooled["itl_ms"], 50),
                "itl_p99_ms": percentile(pooled["itl_ms"], 99),
                "queue_p50_ms": percentile(pooled["queue_ms"], 50),
                "throughput_tps": summary([run["throughput_tps"] for run in reps]),
                "raw": reps,
            }
        )

    print(
        f"\nPoisson arrivals: {args.requests} requests, prompts {args.min_prompt}-"
        f"{args.max_prompt} tokens, {tokens} generated each, max_batch {max_batch}; "
        f"capacity {capacity:.2f} requests/s ({at_once['throughput_tps']:.1f} tok/s)"
    )
    print(
        f"{'policy':<14} {'req/s':>6} {'load':>5} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'queue p50':>9} {'tok/s':>14}"
    )
    for run in sorted(runs, key=lambda r: (r["rate_rps"], POLICIES.index(r["policy"]))):
        tps = run["throughput_tps"]
        print(
            f"{run['policy']:<14} {run['rate_rps']:>6g} {run['offered_load']:>5.2f} "
            f"{run['ttft_p50_ms']:>9.0f} {run['ttft_p99_ms']:>9.0f} {run['itl_p50_ms']:>8.1f} "
            f"{run['itl_p99_ms']:>8.1f} {run['queue_p50_ms']:>9.0f} "
            f"{tps['mean']:>7.1f} ± {tps['std']:<4.1f}"
        )
    return {
        "requests": args.requests,
        "prompt_tokens": [int(n) for n in lengths],
        "tokens": tokens,
        "max_batch": max_batch,
        "reps": args.reps,
        "unit_rate_arrivals_s": unit_arrivals.tolist(),
        "capacity_rps": capacity,
        "capacity_tps": at_once["throughput_tps"],
        "capacity_raw": at_once,
        "runs": runs,
    }


def prefix_part(model, tokenizer, args, rng) -> dict:
    vocab = tokenizer.vocab_size
    system = rng.integers(100, vocab - 100, args.system_tokens).tolist()
    suffixes = rng.integers(100, vocab - 100, (args.prefix_requests, args.suffix_tokens)).tolist()
    unrelated = rng.integers(100, vocab - 100, args.system_tokens + args.suffix_tokens).tolist()
    params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=args.prefix_gen_tokens)
    configs = {"on": 256, "off": 0}
    raw = {name: [] for name in configs}
    for rep in range(args.prefix_reps):
        for name, mb in configs.items():
            log(f"rep {rep + 1}/{args.prefix_reps}: prefix cache {name}")
            engine = mlxinfer.Engine(model, tokenizer, prefix_cache_mb=mb)
            try:
                warm_up(engine, unrelated, args.prefix_gen_tokens)
                metrics = [
                    engine.submit(system + suffix, sampling=params).result().metrics
                    for suffix in suffixes
                ]
            finally:
                engine.close()
            raw[name].append(
                [
                    {k: getattr(m, k) for k in ("ttft_ms", "cached_prompt_tokens", "prefill_tps")}
                    for m in metrics
                ]
            )

    out = {}
    print(
        f"\nPrefix cache: {args.system_tokens}-token shared prefix + {args.suffix_tokens}-token "
        f"suffixes, requests one after another, {args.prefix_reps} rep(s)"
    )
    print(f"{'cache':<6} {'request':>7} {'TTFT ms':>16} {'cached tokens':>14} {'vs first':>9}")
    for name, reps in raw.items():
        rows = []
        for i in range(args.prefix_requests):
            ttft = summary([rep[i]["ttft_ms"] for rep in reps])
            cached = [rep[i]["cached_prompt_tokens"] for rep in reps]
            rows.append({"ttft_ms": ttft, "cached_prompt_tokens": cached})
        first = rows[0]["ttft_ms"]["mean"]
        for i, row in enumerate(rows):
            row["speedup_vs_first"] = first / row["ttft_ms"]["mean"]
            t = row["ttft_ms"]
            print(
                f"{name:<6} {i + 1:>7} {t['mean']:>8.0f} ± {t['std']:<5.0f} "
                f"{max(row['cached_prompt_tokens']):>14} {row['speedup_vs_first']:>8.1f}x"
            )
        out[name] = {"prefix_cache_mb": configs[name], "requests": rows, "raw": reps}
    return {
        "system_tokens": args.system_tokens,
        "suffix_tokens": args.suffix_tokens,
        "generated_tokens": args.prefix_gen_tokens,
        "reps": args.prefix_reps,
        **out,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("all", "load", "prefix"), default="all")
    parser.add_argument("--rates", default="0.5,1,2", help="comma-separated requests/s")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--suffix-tokens", type=int, default=16)
    parser.add_argument("--prefix-requests", type=int, default=3)
    parser.add_argument("--prefix-gen-tokens", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1, help="repetitions of the load part")
    parser.add_argument("--prefix-reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="6 requests at 1 request/s, 256-token prefix"
    )
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rates, args.reps, args.prefix_reps = 6, "1", 1, 1
        args.system_tokens = 256

    model, tokenizer = mlxinfer.load()
    result = {
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (mlxinfer.load() defaults)",
        "prompt": "random token ids",
        "seed": args.seed,
    }
    if args.part in ("all", "load"):
        result["load"] = load_part(model, tokenizer, args, np.random.default_rng(args.seed))
    if args.part in ("all", "prefix"):
        result["prefix"] = prefix_part(model, tokenizer, args, np.random.default_rng(args.seed + 1))
    save_result(result, "engine" + ("-quick" if args.quick else ""), args.out)


if __name__ == "__main__":
    main()
