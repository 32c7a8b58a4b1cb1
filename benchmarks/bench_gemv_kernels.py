"""The gemv shim's few-row kernels against OpenBLAS's GEMM, on the default model's layer shapes.

    python benchmarks/bench_gemv_kernels.py [--rows 1,4,8,16] [--reps 20] [--out FILE]

A batched decode step multiplies B rows (one per request) by every weight matrix, stored as
mlxinfer's float32 policy stores it: wide layers (N >= 2K: gate/up and the LM head) as [K, N]
(x @ W, cpu_kernels.TransposedLinear), the others as [N, K] (x @ W.T). For every kernel this CPU can run (avx512, avx2,
generic; neon on AArch64) and for OpenBLAS alone (MLXINFER_GEMV_KERNEL=openblas), a fresh
process times that product on SmolLM2-135M's shapes (attention 576 -> 576 and 576 -> 192, MLP
576 -> 1536 and 1536 -> 576, LM head 576 -> 49152): the median of --reps timed calls after two
warm-ups, each call evaluated alone. Reported: milliseconds per shape and row count, and each
kernel's time over OpenBLAS's for the whole layer set (below 1 is faster). Weights are random
float32; the matmul goes through MLX (so through cblas_sgemm) exactly as in the model. Also
reported: which kernel the CPU's features select and what the one-time check chose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {  # name: (K, N)
    "q/o 576x576": (576, 576),
    "k/v 576x192": (576, 192),
    "gate/up 576x1536": (576, 1536),
    "down 1536x576": (1536, 576),
    "lm head 576x49152": (576, 49152),
}

WORKER = r"""
import json, sys, time
import mlxinfer, mlx.core as mx, numpy as np
from mlxinfer.backend import gemv_kernel
rows, reps, shapes = json.loads(sys.argv[1])
mx.random.seed(0)
out = {"kernel": gemv_kernel(), "ms": {}}
for name, (k, n) in shapes.items():
    wide = n >= 2 * k
    w = mx.random.normal((k, n) if wide else (n, k)) / k**0.5
    for m in rows:
        x = mx.random.normal((m, k))
        times = []
        for rep in range(reps + 2):
            mx.eval(x, w)
            start = time.perf_counter()
            mx.eval(x @ w if wide else x @ w.T)
            times.append(time.perf_counter() - start)
        out["ms"][f"{name} M={m}"] = 1e3 * float(np.median(times[2:]))
out["kernel_after"] = gemv_kernel()
print(json.dumps(out))
"""


def measure(kernel: str, rows: list[int], reps: int) -> dict:
    env = {**os.environ, "MLXINFER_GEMV_KERNEL": kernel}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps([rows, reps, SHAPES])],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]

    import mlxinfer  # noqa: F401  (loads OpenBLAS and the shim for the facts below)
    from mlxinfer.backend import gemv_kernel
    from mlxinfer.bench.machine import machine_facts

    facts = machine_facts()
    kernel = gemv_kernel()
    if kernel is None:
        sys.exit(f"no gemv shim in this process ({facts['gemv_shim']}): nothing to compare")
    kernels = kernel["runnable"].split(", ") + ["openblas"]
    results = {k: measure(k, rows, args.reps) for k in kernels}
    print(f"{facts['cpu']} ({facts['cpu_features']}); selected by features: {kernel['selected']}")
    print(f"without MLXINFER_GEMV_KERNEL: {kernel['in_use']}\n")
    header = f"{'shape':<28}" + "".join(f"{k:>10}" for k in kernels)
    print(header + "   (ms, median)")
    for key in results["openblas"]["ms"]:
        print(f"{key:<28}" + "".join(f"{results[k]['ms'][key]:>10.3f}" for k in kernels))
    print()
    for m in rows:
        total = {
            k: sum(v for key, v in results[k]["ms"].items() if key.endswith(f"M={m}"))
            for k in kernels
        }
        ratios = "  ".join(f"{k} {total[k] / total['openblas']:.2f}" for k in kernels)
        print(f"all layers, M={m}: time / OpenBLAS's: {ratios}")
    payload = {"machine": facts, "selected": kernel["selected"], "rows": rows, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
