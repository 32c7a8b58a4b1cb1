"""Decode speed of a top-2-of-8 mixture of experts against a dense model with the same active
parameters, same run (the MoE goal: MoE decode_tps >= 0.6x dense).

    python benchmarks/bench_moe.py [--prompt-tokens 256] [--tokens 64] [--reps 5]
    python benchmarks/bench_moe.py --hidden 1024 --layers 8 --heads 16 --kv-heads 4 \\
        --vocab 32000 --experts 8 --top-k 2 --expert-size 1408

Two models with random weights (fixed seed), prepared as `mlxinfer.load()` prepares a model on the
CPU (float32 weights, fused projections, wide layers transposed): B, a mixtral whose every MLP is
top-k of E experts of intermediate size F; A, a llama with the same attention and one dense MLP of
intermediate size k*F, so a token goes through the same number of weights in both (plus the MoE's
router). Prompts are random token ids of exact length; EOS is ignored (greedy, fixed length).
Requests alternate A B A B after one warm-up each; the ratio is MoE / dense.
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
from mlx.utils import tree_flatten

from mlxinfer.generate import generate_tokens, prefill
from mlxinfer.metrics import request_metrics

GOAL_RATIO = 0.6  # MoE decode_tps / dense decode_tps


def expert_bytes(model: mlxinfer.Model) -> int:
    """Bytes of the routed experts' stacked weights (all E of them)."""
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".switch_mlp." in k)


def weight_bytes(model: mlxinfer.Model) -> dict:
    """Total bytes; bytes a token goes through (k of E experts); bytes a decode step reads (that,
    less the embedding table of which one row is read, unless it is also the LM head)."""
    c = model.config
    inactive = 0
    if c.num_experts:
        inactive = expert_bytes(model) * (c.num_experts - c.num_experts_per_tok) // c.num_experts
    return {
        "total": model.nbytes,
        "active": model.nbytes - inactive,
        "decode_read": model.decode_weight_bytes,  # already counts only k of E experts
    }


def run(model: mlxinfer.Model, prompt: list[int], tokens: int, read_bytes: int) -> dict:
    """One greedy request on a fresh cache, timed per token as the metrics definitions say.
    Both models stay resident, so memory is the peak above what was allocated at the start (the
    request's KV cache and activations), not the process's peak."""
    cache = model.make_cache()
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    start = time.perf_counter()
    token_times = []
    for _ in generate_tokens(model, prompt, tokens, cache=cache):
        token_times.append(time.perf_counter())
    m = request_metrics(start, token_times, len(prompt), weight_bytes_per_step=read_bytes)
    return {
        "decode_tps": m.decode_tps,
        "prefill_tps": m.prefill_tps,
        "ttft_ms": m.ttft_ms,
        "bandwidth_gbs": m.bandwidth_gbs,
        "request_peak_memory_mb": (mx.get_peak_memory() - resident) / 2**20,
    }


def check_finite(model: mlxinfer.Model, prompt: list[int], name: str) -> None:
    """Random weights must not overflow: NaN/inf activations would time a different computation."""
    logits = prefill(model, mx.array([prompt]), model.make_cache())
    if not mx.isfinite(logits).all().item():
        raise SystemExit(f"{name}: non-finite logits with random weights")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1408, help="F of each expert")
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be >= 2 (decode_tps needs two tokens)")

    shared = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": max(4096, args.prompt_tokens + args.tokens),
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    configs = {
        "dense": {
            "model_type": "llama",
            **shared,
            "intermediate_size": args.top_k * args.expert_size,
        },
        "moe": {
            "model_type": "mixtral",
            **shared,
            "intermediate_size": args.expert_size,
            "num_local_experts": args.experts,
            "num_experts_per_tok": args.top_k,
        },
    }
    models = {name: random_model(config) for name, config in configs.items()}
    sizes = {name: weight_bytes(model) for name, model in models.items()}
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt_tokens).tolist()

    for name, model in models.items():
        check_finite(model, prompt, name)
        run(model, prompt, args.tokens, sizes[name]["decode_read"])  # warm-up, not counted
    runs = {name: [] for name in models}
    for _ in range(args.reps):  # A B A B
        for name, model in models.items():
            runs[name].append(run(model, prompt, args.tokens, sizes[name]["decode_read"]))

    def stat(key: str) -> dict:
        values = {name: [r[key] for r in runs[name]] for name in models}
        return {
            **{name: summary(v) for name, v in values.items()},
            "ratio": float(np.mean(values["moe"]) / np.mean(values["dense"])),
        }

    decode = stat("decode_tps")
    machine = machine_info()
    result = {
        "machine": machine,
        "models": "random weights, float32 policy (as mlxinfer.load() on the CPU)",
        "configs": configs,
        "prompt": "random token ids",
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "reps": args.reps,
        "weight_bytes": sizes,
        "active_weight_ratio": sizes["moe"]["active"] / sizes["dense"]["active"],
        "decode_tps": decode,
        "prefill_tps": stat("prefill_tps"),
        "ttft_ms": stat("ttft_ms"),
        "bandwidth_gbs": stat("bandwidth_gbs"),
        "request_peak_memory_mb": stat("request_peak_memory_mb"),
        "goal": f"moe decode_tps >= {GOAL_RATIO} x dense",
        "goal_met": decode["ratio"] >= GOAL_RATIO,
    }
    save_result(result, "moe-vs-dense", args.out)


if __name__ == "__main__":
    main()
