"""The C prefill kernels (the gemv shim's library) against the cpu op set's MLX path, per variant.

    python benchmarks/bench_prefill_kernels.py [--keys 512,2048,4096,8192] [--reps 7] [--out FILE]

Causal attention of one 512-query prefill chunk at the end of S positions, SmolLM2-135M's heads
(9 query heads over 3 KV heads, head dim 64), and SwiGLU of one 512-token chunk (512 x 1536), on
random float32 inputs already evaluated. For every variant this CPU can run (avx512, avx2,
generic; neon on AArch64, each forced in the call), and for the MLX path the cpu op set takes
without the shim (`MLXINFER_NATIVE_PREFILL=0`: causal query blocks through BLAS, key blocks of
512 with an online softmax past 1,024 keys, the compiled polynomial exp): the best of --reps
calls after one warm-up, in milliseconds, and the attention's GFLOP/s (4 x heads x head_dim x
the causal query-key pairs). Each result is also checked against MLX's
`mx.fast.scaled_dot_product_attention` (max abs difference) so a fast wrong kernel shows.
"""

from __future__ import annotations

# isort: off
import mlxinfer  # noqa: F401  (before mlx.core: OpenBLAS and the shim)
import mlx.core as mx
import mlx.nn as nn

# isort: on
import argparse
import os
import time

from common import machine_info, save_result

from mlxinfer import backend, cpu_kernels

HEADS, KV_HEADS, HEAD_DIM, QUERIES, INTERMEDIATE = 9, 3, 64, 512, 1536


def best_ms(function, reps: int) -> float:
    mx.eval(function())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(function())
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def mlx_path(function):
    """Run `function` with the C kernels off (the cpu op set's fall-back)."""
    os.environ[backend.NATIVE_PREFILL_ENV] = "0"
    try:
        return function()
    finally:
        del os.environ[backend.NATIVE_PREFILL_ENV]


def attention_runs(q, k, v, scale: float, variants: list[str]) -> dict:
    """The MLX path and each variant of the C kernel, as functions of nothing."""
    runs = {"mlx ops": lambda: mlx_path(lambda: cpu_kernels.attention(q, k, v, scale, "causal"))}
    for variant in variants:
        runs[variant] = lambda variant=variant: cpu_kernels.native_attention(
            q, k, v, scale, variant
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="512,2048,4096,8192")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    kernel = backend.gemv_kernel()
    if kernel is None:
        raise SystemExit(f"no gemv shim here ({backend.gemv_shim_status()}): nothing to measure")
    variants = kernel["runnable"].split(", ")
    scale = HEAD_DIM**-0.5
    mx.random.seed(0)
    results = {"attention": {}, "swiglu": {}}
    for S in (int(s) for s in args.keys.split(",")):
        q = mx.random.normal((1, HEADS, QUERIES, HEAD_DIM))
        k, v = (mx.random.normal((1, KV_HEADS, S, HEAD_DIM)) for _ in "kv")
        mx.eval(q, k, v)
        reference = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        pairs = QUERIES * (S - QUERIES) + QUERIES * (QUERIES + 1) / 2
        gflop = 4 * HEADS * HEAD_DIM * pairs / 1e9
        row = {}
        runs = attention_runs(q, k, v, scale, variants)
        for name, run in runs.items():
            ms = best_ms(run, args.reps)
            error = mx.abs(run() - reference).max().item()
            row[name] = {"ms": ms, "gflops": gflop / ms * 1e3, "max_abs_diff": error}
        results["attention"][S] = row
        print(
            f"attention, {QUERIES} queries over {S} keys: "
            + ", ".join(f"{n} {r['ms']:.1f} ms ({r['gflops']:.0f} GFLOP/s)" for n, r in row.items())
        )
    gate, up = (mx.random.normal((1, QUERIES, INTERMEDIATE)) for _ in "gu")
    mx.eval(gate, up)
    reference = nn.silu(gate) * up
    runs = {"mlx ops": lambda: cpu_kernels.swiglu(gate, up)}
    for variant in variants:
        runs[variant] = lambda variant=variant: cpu_kernels.native_swiglu(gate, up, variant)
    for name, run in runs.items():
        ms = best_ms(run, args.reps)
        error = mx.abs(run() - reference).max().item()
        results["swiglu"][name] = {"ms": ms, "max_abs_diff": error}
    print(
        f"swiglu, {QUERIES} x {INTERMEDIATE}: "
        + ", ".join(f"{n} {r['ms']:.2f} ms" for n, r in results["swiglu"].items())
    )
    save_result(
        {"machine": machine_info(), "reps": args.reps, **results}, "prefill-kernels", args.out
    )


if __name__ == "__main__":
    main()
