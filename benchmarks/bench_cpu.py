"""mlxinfer against mlx-lm on the default model, same weights, same run (the CPU speed issue).

    python benchmarks/bench_cpu.py [--prompt-tokens 256] [--tokens 64] [--reps 5] [--model M]
    python benchmarks/bench_cpu.py --ttft-sweep 16,64,256,1024,2048 --reps 3

Both engines run the default model's weights dequantized to float32 (mlx-lm's best CPU
configuration, with OpenBLAS loaded first: mlxinfer is imported before mlx-lm). mlx-lm cannot read
GGUF, so the weights are exported once to a Hugging Face style directory that mlx-lm loads (llama,
rope_traditional=True: the GGUF q/k layout, which mlx-lm supports). mlx-lm runs in a worker process
with OpenBLAS but without mlxinfer's gemv shim (its own best configuration); requests alternate
between the two processes, A B A B, after one warm-up each. Prompts are random token ids of exact
length; EOS is ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx
import numpy as np
from common import machine_info, summary

from mlxinfer.backend import blas_status
from mlxinfer.bench.baseline import NO_SHIM, export_for_mlx_lm
from mlxinfer.bench.worker import JsonWorker

ROOFLINE_GBS = 21.0  # the development machine's measured memory read bandwidth (BENCHMARKS.md)


def run_mlxinfer(model, tokenizer, prompt: list[int], tokens: int) -> dict:
    params = mlxinfer.SamplingParams(max_tokens=tokens, ignore_eos=True)
    _, m = mlxinfer.generate(model, tokenizer, prompt, sampling=params, return_metrics=True)
    return {"ttft_ms": m.ttft_ms, "prefill_tps": m.prefill_tps, "decode_tps": m.decode_tps}


def run_mlx_lm(model, prompt: list[int], tokens: int) -> dict:
    """mlx-lm's generate_step, timed by the same definitions (token available on the host)."""
    from mlx_lm.generate import generate_step

    if isinstance(model, MlxLmWorker):
        return model.run(prompt, tokens)

    start = time.perf_counter()
    times = []
    for _, _ in zip(
        range(tokens), generate_step(mx.array(prompt), model, max_tokens=tokens), strict=False
    ):
        times.append(time.perf_counter())
    ttft = times[0] - start
    return {
        "ttft_ms": ttft * 1e3,
        "prefill_tps": len(prompt) / ttft,
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
    }


class MlxLmWorker(JsonWorker):
    """mlx-lm in its own process with its best CPU configuration (the package's worker, with
    mlxinfer.bench.baseline's environment: OpenBLAS loaded, not mlxinfer's gemv shim), served by
    `script --serve-mlx-lm`."""

    script = __file__  # the script whose --serve-mlx-lm answers this worker's requests

    def __init__(self, model_dir: Path):
        super().__init__([sys.executable, self.script, "--serve-mlx-lm", str(model_dir)], NO_SHIM)
        self.blas = self.facts["blas"]

    def run(self, prompt: list[int], tokens: int) -> dict:
        return self.ask({"prompt": prompt, "tokens": tokens})


def serve_mlx_lm(model_dir: str) -> None:
    """The worker: load mlx-lm's model, then answer one JSON request per stdin line."""
    import mlx_lm

    from mlxinfer.backend import blas_status

    model, _ = mlx_lm.load(model_dir)
    print(json.dumps({"blas": blas_status()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(run_mlx_lm(model, request["prompt"], request["tokens"])), flush=True)


def compare(ours, theirs, prompt, tokens, reps) -> dict:
    run_mlxinfer(*ours, prompt, tokens)  # warm-up
    run_mlx_lm(theirs, prompt, tokens)
    a, b = [], []
    for _ in range(reps):
        a.append(run_mlxinfer(*ours, prompt, tokens))
        b.append(run_mlx_lm(theirs, prompt, tokens))
    out = {}
    for key in ("ttft_ms", "prefill_tps", "decode_tps"):
        ours_v, theirs_v = [r[key] for r in a], [r[key] for r in b]
        out[key] = {
            "mlxinfer": summary(ours_v),
            "mlx_lm": summary(theirs_v),
            "ratio": float(np.mean(ours_v) / np.mean(theirs_v)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ttft-sweep", default="", help="comma-separated prompt lengths")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run mlx-lm in this process (it then also gets the gemv shim)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a model (default: the default model); mlx-lm gets it exported (llama, gemma3_text)",
    )
    parser.add_argument("--serve-mlx-lm", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mlx_lm:
        serve_mlx_lm(args.serve_mlx_lm)
        return

    import mlx_lm

    model, tokenizer = mlxinfer.load(args.model, compute="float32")
    tmp = tempfile.TemporaryDirectory()
    export_for_mlx_lm(model, tokenizer, Path(tmp.name))
    if args.same_process:
        reference, _ = mlx_lm.load(tmp.name)
        mlx_lm_blas = blas_status()
    else:
        reference = MlxLmWorker(Path(tmp.name))
        mlx_lm_blas = reference.blas
    rng = np.random.default_rng(0)
    result = {
        "machine": machine_info(),
        "model": (args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)")
        + ", float32 weights (dequantized) in both engines",
        "mlx_lm": mlx_lm.__version__,
        "mlx_lm_process": "same" if args.same_process else "separate",
        "mlx_lm_blas": mlx_lm_blas,
        "prompt": "random token ids",
    }
    if args.ttft_sweep:
        sweep = {}
        for n in [int(x) for x in args.ttft_sweep.split(",")]:
            prompt = rng.integers(100, tokenizer.vocab_size - 100, n).tolist()
            sweep[n] = compare((model, tokenizer), reference, prompt, 2, args.reps)["ttft_ms"]
        result["ttft_sweep"] = sweep
    else:
        prompt = rng.integers(100, tokenizer.vocab_size - 100, args.prompt_tokens).tolist()
        runs = compare((model, tokenizer), reference, prompt, args.tokens, args.reps)
        weight_gb = model.decode_weight_bytes / 1e9
        result.update(
            prompt_tokens=args.prompt_tokens,
            tokens=args.tokens,
            reps=args.reps,
            **runs,
            decode_weight_gb=weight_gb,
            decode_roofline_tps=ROOFLINE_GBS / weight_gb,
            decode_roofline_fraction=runs["decode_tps"]["mlxinfer"]["mean"]
            * weight_gb
            / ROOFLINE_GBS,
        )
    if isinstance(reference, MlxLmWorker):
        reference.close()
    tmp.cleanup()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
