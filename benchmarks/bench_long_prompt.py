"""Long prompts: prefill speed against what the machine's GEMM rate allows, and peak memory against
weights + KV cache, for one or more checkouts of mlxinfer, each in its own process.

    python benchmarks/bench_long_prompt.py [--lengths 1024,4096,8000] [--checkout PATH ...]

For each prompt length T (KJV Genesis text, encoded and cut to exactly T tokens) the default
model prefills the prompt and generates one token (float32 policy, "cpu" op set: each checkout's
defaults), after one warm-up at the shortest length. Reported per checkout and length:
  prefill_tps     T / time to the first token
  gemm_fraction   (the prefill's FLOPs / the GEMM rate) / the time taken: how close to the bound.
                  FLOPs: 2 x (matmul parameters of the blocks) x T + 4 x layers x heads x head_dim x
                  T^2 / 2 (causal QK^T and PV) + the LM head once. The rate: the best of 6 float32
                  [1024, 1024] @ [1024, 1024] products through MLX in the same process, just
                  before the prompt (with the rate measured once at start-up, two checkouts'
                  processes starting together measured 135 and 249 GFLOP/s on one machine).
  peak_ratio      mx.get_peak_memory() over the request / (weights + the KV cache it ends with)
Checkouts run one after another, alternating per length (A B A B), so drift is shared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlxinfer.bench.worker import JsonWorker

WORKER = r"""
import json, sys, time
import mlxinfer
import mlx.core as mx
from mlx.utils import tree_flatten
from mlxinfer import SamplingParams
from mlxinfer.cache import kv_cache_bytes
model, tokenizer = mlxinfer.load()
text = (mlxinfer.__path__[0] + "/bench/kjv_genesis.txt")
ids = tokenizer.encode(open(text).read())
config = model.config
weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
block_params = L * (D * H * hd * 2 + D * KV * hd * 2 + 3 * D * F)
a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
def gemm_rate():  # measured before each prompt, while the other checkout's process waits
    rate = 0
    for _ in range(6):
        mx.eval(a, b); start = time.perf_counter(); mx.eval(a @ b)
        rate = max(rate, 2 * 1024**3 / (time.perf_counter() - start))
    return rate
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    T = json.loads(line)["length"]
    rate = gemm_rate()
    prompt = (ids * (T // len(ids) + 1))[:T]
    mx.clear_cache(); mx.reset_peak_memory()
    params = SamplingParams(ignore_eos=True, max_tokens=1)
    start = time.perf_counter()
    for r in mlxinfer.stream_generate(model, tokenizer, prompt, sampling=params):
        first = time.perf_counter()
    peak = mx.get_peak_memory()
    seconds = first - start
    kv = kv_cache_bytes(config, T + 1)
    flops = 2 * block_params * T + 4 * L * H * hd * T * T / 2 + 2 * D * config.vocab_size
    print(json.dumps({
        "prefill_tps": T / seconds, "seconds": seconds, "gemm_gflops": rate / 1e9,
        "gemm_fraction": flops / rate / seconds, "tflop": flops / 1e12,
        "peak_mb": peak / 2**20, "weights_mb": weights / 2**20, "kv_mb": kv / 2**20,
        "peak_ratio": peak / (weights + kv),
    }), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8000")
    parser.add_argument("--checkout", action="append", type=Path, help="default: this one")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    checkouts = args.checkout or [Path(__file__).resolve().parent.parent]
    workers = {  # the package's JSON-lines worker, one process per checkout
        str(checkout): JsonWorker(
            [sys.executable, "-c", WORKER], {"PYTHONPATH": str(checkout)}, cwd=checkout
        )
        for checkout in checkouts
    }
    for worker in workers.values():
        worker.ask({"length": min(lengths)})  # warm-up
    results = {name: {} for name in workers}
    for length in lengths:
        for name, worker in workers.items():
            r = worker.ask({"length": length})
            results[name][length] = r
            print(
                f"{name}  T={length}: prefill {r['prefill_tps']:.0f} tok/s ({r['seconds']:.1f} s, "
                f"{r['tflop']:.2f} TFLOP, {r['gemm_fraction']:.0%} of GEMM at "
                f"{r['gemm_gflops']:.0f} GFLOP/s); peak {r['peak_mb']:.0f} MB = "
                f"{r['peak_ratio']:.2f} x (weights {r['weights_mb']:.0f} + KV {r['kv_mb']:.0f} MB)",
                flush=True,
            )
    for worker in workers.values():
        worker.close()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
