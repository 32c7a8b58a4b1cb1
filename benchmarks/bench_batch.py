"""Batched generation: aggregate tok/s at concurrency 1-16, mlxinfer.batch_generate against mlx-lm's
batch_generate on the same float32 weights, same run.

    python benchmarks/bench_batch.py [--levels 1,2,4,8,16] [--reps 3]
    python benchmarks/bench_batch.py --prompt-tokens 64 --tokens 64 --out FILE
    python benchmarks/bench_batch.py --quick     # levels 1,2, one repetition: a smoke test
    python benchmarks/bench_batch.py --ragged [--reps 3]   # batched vs one at a time, ours only

At concurrency B, B prompts (random token ids of exactly --prompt-tokens tokens, fixed seed; the
same prompts for both engines, level B taking the first B of them) each generate exactly --tokens
tokens, EOS ignored. Aggregate tok/s = B * tokens / wall time of the whole call, prefill included.

Both engines run the default model's weights dequantized to float32 (bench_cpu.py's setup: our
weights exported to a Hugging Face style directory for mlx-lm, which runs in a worker process with
OpenBLAS but without mlxinfer's gemv shim). Ours: mlxinfer.batch_generate(..., max_tokens=tokens,
sampling=SamplingParams(ignore_eos=True)), all B prompts in one batch (max_batch defaults to B).
mlx-lm 0.32: mlx_lm.generate.batch_generate(model, tokenizer, prompts, max_tokens=tokens,
return_token_ids=True) with its defaults (prefill_batch_size=8, completion_batch_size=32); it
stops a row on tokenizer.eos_token_ids, so the worker empties that set (TokenizerWrapper's setter)
to ignore EOS, and every call checks that each row came back with exactly --tokens tokens. Greedy
decoding in both. At each level: one warm-up of each engine, then --reps repetitions alternating
A B A B. Reported per level: mean/std of each engine's aggregate tok/s, the ratio ours / mlx-lm,
and ours against our own B=1 throughput (the batching speed-up).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import numpy as np
from common import machine_info, save_result, summary

from mlxinfer.bench.baseline import NO_SHIM, export_for_mlx_lm
from mlxinfer.bench.worker import JsonWorker


def run_mlxinfer(model, tokenizer, prompts: list[list[int]], tokens: int) -> float:
    """Aggregate generated tok/s of one mlxinfer.batch_generate call."""
    params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=tokens)
    start = time.perf_counter()
    results = mlxinfer.batch_generate(model, tokenizer, prompts, max_tokens=tokens, sampling=params)
    seconds = time.perf_counter() - start
    counts = [len(r.tokens) for r in results]
    if counts != [tokens] * len(prompts) or any(r.finish_reason != "length" for r in results):
        reasons = [(r.finish_reason, r.error) for r in results]
        raise RuntimeError(
            f"mlxinfer generated {counts} tokens ({reasons}), expected {tokens} each"
        )
    return len(prompts) * tokens / seconds


class MlxLmBatchWorker(JsonWorker):
    """mlx-lm's batch_generate in its own process (the package's worker, with the mlx-lm
    baseline's environment; this script's --serve-mlx-lm answers)."""

    def __init__(self, model_dir: Path):
        super().__init__([sys.executable, __file__, "--serve-mlx-lm", str(model_dir)], NO_SHIM)
        self.blas = self.facts["blas"]

    def run(self, prompts: list[list[int]], tokens: int) -> float:
        """Aggregate generated tok/s of one batch_generate call, timed inside the worker."""
        reply = self.ask({"prompts": prompts, "tokens": tokens})
        if "error" in reply:
            raise RuntimeError(f"mlx-lm worker: {reply['error']}")
        return reply["tps"]


def serve_mlx_lm(model_dir: str) -> None:
    """The worker: load mlx-lm's model, then answer one JSON request per stdin line."""
    import mlx_lm

    from mlxinfer.backend import blas_status

    # mlx_lm.generate is the function; the module holds batch_generate
    batch_generate = importlib.import_module("mlx_lm.generate").batch_generate
    model, tokenizer = mlx_lm.load(model_dir)
    tokenizer.eos_token_ids = []  # batch_generate stops rows on these: EOS ignored
    print(json.dumps({"blas": blas_status()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompts, tokens = request["prompts"], request["tokens"]
        start = time.perf_counter()
        response = batch_generate(
            model, tokenizer, prompts, max_tokens=tokens, return_token_ids=True
        )
        seconds = time.perf_counter() - start
        counts = [len(ids) for ids in response.token_ids]
        if counts != [tokens] * len(prompts):
            reply = {"error": f"generated {counts} tokens, expected {tokens} each"}
        else:
            reply = {"tps": len(prompts) * tokens / seconds}
        print(json.dumps(reply), flush=True)


RAGGED_LENGTHS = [23, 41, 64, 77, 96, 110, 128, 150]  # prompt tokens of the 8 requests
RAGGED_TOKENS = 32


def ragged(reps: int, out: str | None = None) -> None:
    """Eight prompts of different lengths (RAGGED_LENGTHS, random ids), RAGGED_TOKENS tokens each,
    EOS ignored: one batch_generate call against the same eight generated one after another
    (mlxinfer.generate), alternating, after a warm-up of each. Reported: wall times and the
    speed-up batched / one at a time (prefill included in both)."""
    model, tokenizer = mlxinfer.load(compute="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, tokenizer.vocab_size - 100, n).tolist() for n in RAGGED_LENGTHS]
    params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=RAGGED_TOKENS)

    def batched() -> float:
        start = time.perf_counter()
        results = mlxinfer.batch_generate(
            model, tokenizer, prompts, max_tokens=RAGGED_TOKENS, sampling=params
        )
        assert all(len(r.tokens) == RAGGED_TOKENS for r in results)
        return time.perf_counter() - start

    def alone() -> float:
        start = time.perf_counter()
        for prompt in prompts:
            mlxinfer.generate(model, tokenizer, prompt, max_tokens=RAGGED_TOKENS, sampling=params)
        return time.perf_counter() - start

    batched(), alone()  # warm-up
    together, apart = [], []
    for _ in range(reps):
        together.append(batched())
        apart.append(alone())
    speedup = float(np.mean(apart) / np.mean(together))
    print(
        f"8 ragged prompts ({min(RAGGED_LENGTHS)}-{max(RAGGED_LENGTHS)} tokens), "
        f"{RAGGED_TOKENS} tokens each: batched {np.mean(together):.2f} s, one at a time "
        f"{np.mean(apart):.2f} s: {speedup:.2f}x"
    )
    result = {
        "machine": machine_info(),
        "prompt_tokens": RAGGED_LENGTHS,
        "tokens": RAGGED_TOKENS,
        "reps": reps,
        "batched_s": summary(together),
        "one_at_a_time_s": summary(apart),
        "speedup": speedup,
    }
    save_result(result, "batch-ragged", out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,2,4,8,16", help="comma-separated batch sizes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="levels 1,2 and one repetition")
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/)")
    parser.add_argument("--ragged", action="store_true", help="8 ragged prompts: batched vs alone")
    parser.add_argument("--serve-mlx-lm", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mlx_lm:
        serve_mlx_lm(args.serve_mlx_lm)
        return
    if args.ragged:
        ragged(args.reps, args.out)
        return
    if args.quick:
        args.levels, args.reps = "1,2", 1
    levels = [int(x) for x in args.levels.split(",")]

    import mlx_lm

    model, tokenizer = mlxinfer.load(compute="float32")
    tmp = tempfile.TemporaryDirectory()
    export_for_mlx_lm(model, tokenizer, Path(tmp.name))
    reference = MlxLmBatchWorker(Path(tmp.name))
    rng = np.random.default_rng(0)
    vocab = tokenizer.vocab_size
    all_prompts = rng.integers(100, vocab - 100, (max(levels), args.prompt_tokens)).tolist()

    runs = {}
    try:
        for b in levels:
            prompts = all_prompts[:b]
            run_mlxinfer(model, tokenizer, prompts, args.tokens)  # warm-up
            reference.run(prompts, args.tokens)
            ours, theirs = [], []
            for _ in range(args.reps):
                ours.append(run_mlxinfer(model, tokenizer, prompts, args.tokens))
                theirs.append(reference.run(prompts, args.tokens))
            runs[b] = {
                "mlxinfer_tps": summary(ours),
                "mlx_lm_tps": summary(theirs),
                "ratio": float(np.mean(ours) / np.mean(theirs)),
            }
            print(
                f"B={b}: mlxinfer {np.mean(ours):.1f} tok/s, mlx-lm {np.mean(theirs):.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        reference.close()
        tmp.cleanup()
    if 1 in runs:
        base = runs[1]["mlxinfer_tps"]["mean"]
        for run in runs.values():
            run["mlxinfer_vs_own_b1"] = run["mlxinfer_tps"]["mean"] / base

    print(f"{'B':>3} {'mlxinfer tok/s':>18} {'mlx-lm tok/s':>18} {'ratio':>6} {'vs own B=1':>10}")
    for b, run in runs.items():
        a, t = run["mlxinfer_tps"], run["mlx_lm_tps"]
        own = f"{run['mlxinfer_vs_own_b1']:.2f}x" if "mlxinfer_vs_own_b1" in run else "-"
        print(
            f"{b:>3} {a['mean']:>10.1f} ± {a['std']:<5.1f} {t['mean']:>10.1f} ± {t['std']:<5.1f} "
            f"{run['ratio']:>6.2f} {own:>10}"
        )

    result = {
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct, float32 weights (dequantized from the Q4_1 GGUF) in both engines",
        "mlx_lm": mlx_lm.__version__,
        "mlx_lm_process": "separate",
        "mlx_lm_blas": reference.blas,
        "mlx_lm_eos": "tokenizer.eos_token_ids emptied in the worker; token counts checked",
        "prompt": "random token ids",
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "reps": args.reps,
        "metric": "aggregate generated tok/s = B * tokens / wall time of the call, prefill included",
        "levels": {str(b): run for b, run in runs.items()},
    }
    save_result(result, "batch-vs-mlx-lm" + ("-quick" if args.quick else ""), args.out)


if __name__ == "__main__":
    main()
