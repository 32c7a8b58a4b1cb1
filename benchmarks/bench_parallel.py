"""Tensor or pipeline parallelism on one machine: two ranks (MLX's ring backend over loopback)
against one process, on the default model.

    python benchmarks/bench_parallel.py [--mode tensor|pipeline] [--reps 3] [--prompt-tokens 128]
        [--tokens 64] [--engine N] [--prefill-chunk N] [--out FILE]

Each configuration runs in fresh processes: one process alone, then the two ranks together
(MLX_HOSTFILE / MLX_RANK, as mlx.launch sets them), --reps times, alternating. Each process loads
the default model (float32, the CPU's policy), prefills a --prompt-tokens prompt of KJV Genesis and
decodes --tokens tokens greedily (EOS ignored), and reports: the weight bytes it holds, prefill and
decode tok/s (rank 0's for the pair), its peak memory, and the communication a decode token needs,
measured apart, without the compute between: tensor, the model's 60 all_sums of one token's
activations ([1, 1, 576] float32); pipeline, one send from rank 0 to rank 1 and one all_sum.
Two ranks on 2 cores share the cores the one process had: slower, and the report says where the
time goes rather than predicting the speed-up of two machines.

With --engine N, each process then runs an Engine of N rows (over the ranks: rank 0 submits, the
other follows its plan) on N different prompts at once, and reports the total output tok/s
(N x --tokens / the wall time from the first submit to the last token) and the mean per-request
decode tok/s. With --prefill-chunk N, each process also times the prompt's prefill in chunks of N
tokens (steps.prefill): in a pipeline a stage starts the next chunk while the next stage computes
this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx
from common import machine_info, save_result, summary

from mlxinfer.bench.servers import free_port


def rank_worker(
    prompt_tokens: int, tokens: int, mode: str | None, engine_rows: int = 0, chunk: int = 0
) -> None:
    """One process (alone, or one rank of the pair): prints its figures as one JSON line."""
    model, tokenizer = mlxinfer.load(compute="float32", parallel=mode)
    text = (Path(mlxinfer.__file__).parent / "bench" / "kjv_genesis.txt").read_text()
    prompt = tokenizer.encode(text)[:prompt_tokens]
    params = mlxinfer.SamplingParams(ignore_eos=True)
    mlxinfer.generate(model, tokenizer, prompt, max_tokens=4, sampling=params)  # warm-up
    _, metrics = mlxinfer.generate(
        model, tokenizer, prompt, max_tokens=tokens, sampling=params, return_metrics=True
    )
    result = {
        "rank": model.ranks.rank() if model.ranks is not None else 0,
        "weight_bytes": model.nbytes,
        "prefill_tps": metrics.prefill_tps,
        "decode_tps": metrics.decode_tps,
        "peak_mb": metrics.peak_memory_mb,
    }
    group = model.ranks
    if group is not None:  # one decode token's communication, without the compute
        hidden = model.config.hidden_size
        sums = 2 * model.config.num_hidden_layers if mode == "tensor" else 1
        x = mx.ones((1, 1, hidden))
        mx.eval(mx.distributed.all_sum(x, group=group))
        start = time.perf_counter()
        for _ in range(20):
            if mode == "pipeline" and group.rank() == 0:
                sent = mx.distributed.send(x, 1, group=group)
                x = mx.where(mx.array(False), sent, mx.zeros_like(sent))
            elif mode == "pipeline":
                x = mx.distributed.recv_like(x, 0, group=group)
            for _ in range(sums):
                x = mx.distributed.all_sum(x, group=group) * 0.5
            mx.eval(x)
        result["comm_ms_per_token"] = (time.perf_counter() - start) / 20 * 1000
        result["all_sums_per_token"] = sums
        result["bytes_per_all_sum"] = hidden * 4
    if chunk:
        from mlxinfer.steps import prefill

        ids = mx.array([prompt])
        mx.eval(prefill(model, ids[:, : 2 * chunk], model.make_cache(), chunk))  # warm-up
        cache = model.make_cache()
        start = time.perf_counter()
        mx.eval(prefill(model, ids, cache, chunk))
        result["chunked_prefill_tps"] = len(prompt) / (time.perf_counter() - start)
    if engine_rows:
        result.update(engine_figures(model, tokenizer, text, prompt_tokens, tokens, engine_rows))
    print(json.dumps(result), flush=True)


def engine_figures(model, tokenizer, text, prompt_tokens, tokens, rows) -> dict:
    """An Engine of `rows` rows on `rows` prompts at once (rank 0 submits; over ranks the other
    follows): total output tok/s and mean decode tok/s, on rank 0."""
    engine = mlxinfer.Engine(model, tokenizer, max_batch=rows, prefix_cache_mb=0)
    if model.ranks is not None and model.ranks.rank() != 0:
        engine.wait()
        return {}
    ids = tokenizer.encode(text)
    prompts = [ids[(i + 1) * prompt_tokens : (i + 2) * prompt_tokens] for i in range(rows)]
    params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=tokens)
    engine.submit(prompts[0], sampling=params, max_tokens=4).result()  # warm-up
    start = time.perf_counter()
    results = [h.result() for h in [engine.submit(p, sampling=params) for p in prompts]]
    wall = time.perf_counter() - start
    engine.close()
    decode = [r.metrics.decode_tps for r in results]
    return {"engine_output_tps": rows * tokens / wall, "engine_decode_tps": sum(decode) / rows}


def run(
    mode: str | None, prompt_tokens: int, tokens: int, engine_rows: int = 0, chunk: int = 0
) -> list[dict]:
    parallel = mode is not None
    command = [sys.executable, __file__, "--rank-worker", "--prompt-tokens", str(prompt_tokens)]
    command += ["--tokens", str(tokens)] + (["--parallel", mode] if mode else [])
    command += ["--engine", str(engine_rows), "--prefill-chunk", str(chunk)]
    env = {**os.environ}
    env.pop("MLX_HOSTFILE", None)
    env.pop("MLX_RANK", None)
    ranks = 2 if parallel else 1
    with tempfile.TemporaryDirectory() as tmp:
        if parallel:
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
            env["MLX_HOSTFILE"] = str(hostfile)
        procs = []
        for rank in range(ranks):
            if parallel:
                env = {**env, "MLX_RANK": str(rank)}
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mode", choices=["tensor", "pipeline"], default="tensor")
    parser.add_argument("--engine", type=int, default=0, metavar="N", help="an Engine of N rows")
    parser.add_argument("--prefill-chunk", type=int, default=0, metavar="N", help="time prefill")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(args.prompt_tokens, args.tokens, args.parallel, args.engine, args.prefill_chunk)
        return
    alone, pair = [], []
    extra = (args.engine, args.prefill_chunk)
    for _ in range(args.reps):
        alone += run(None, args.prompt_tokens, args.tokens, *extra)
        pair.append(run(args.mode, args.prompt_tokens, args.tokens, *extra))
    rank0 = [p[0] for p in pair]

    def stat(rows, key):
        return summary([r[key] for r in rows])

    result = {
        "machine": machine_info(),
        "mode": args.mode,
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "reps": args.reps,
        "one_process": {k: stat(alone, k) for k in ("prefill_tps", "decode_tps", "peak_mb")},
        "two_ranks": {
            k: stat(rank0, k) for k in ("prefill_tps", "decode_tps", "peak_mb", "comm_ms_per_token")
        },
        "weight_bytes": {"one_process": alone[0]["weight_bytes"]}
        | {f"rank{r['rank']}": r["weight_bytes"] for r in pair[0]},
        "peak_mb_per_rank": {f"rank{r['rank']}": r["peak_mb"] for r in pair[0]},
        "engine_rows": args.engine,
        "prefill_chunk": args.prefill_chunk,
        "all_sums_per_token": rank0[0]["all_sums_per_token"],
        "bytes_per_all_sum": rank0[0]["bytes_per_all_sum"],
    }
    keys = ["engine_output_tps", "engine_decode_tps"] if args.engine else []
    keys += ["chunked_prefill_tps"] if args.prefill_chunk else []
    if keys:
        for key in keys:
            result["one_process"][key] = stat(alone, key)
            result["two_ranks"][key] = stat(rank0, key)
    one, two = result["one_process"], result["two_ranks"]
    print(
        f"one process: prefill {one['prefill_tps']['mean']:.0f} tok/s, decode "
        f"{one['decode_tps']['mean']:.1f} tok/s; two ranks: prefill "
        f"{two['prefill_tps']['mean']:.0f}, decode {two['decode_tps']['mean']:.1f} tok/s, "
        f"communication {two['comm_ms_per_token']['mean']:.2f} ms a token; weight bytes "
        f"{result['weight_bytes']}",
        file=sys.stderr,
    )
    if args.engine:
        print(
            f"Engine of {args.engine} rows: output {one['engine_output_tps']['mean']:.1f} vs "
            f"{two['engine_output_tps']['mean']:.1f} tok/s (one process vs two ranks)",
            file=sys.stderr,
        )
    if args.prefill_chunk:
        print(
            f"prefill in chunks of {args.prefill_chunk}: {one['chunked_prefill_tps']['mean']:.0f} "
            f"vs {two['chunked_prefill_tps']['mean']:.0f} tok/s (one process vs two ranks)",
            file=sys.stderr,
        )
    save_result(result, f"parallel-{args.mode}-two-ranks", args.out)


if __name__ == "__main__":
    main()
