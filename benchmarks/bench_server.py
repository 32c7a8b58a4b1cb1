"""Over HTTP: `mlxinfer serve` against `mlx_lm.server` on the same float32 weights, same run.

    python benchmarks/bench_server.py [--levels 1,4,8,16] [--reps 3] [--prompt-tokens 128]
                                      [--tokens 128] [--out FILE]

Both servers run in their own processes on loopback ports: ours on the default model (float32 on
the CPU), mlx-lm's on those weights exported to a Hugging Face style directory (bench_cpu.py's
setup), started through a wrapper that loads OpenBLAS first and not our gemv shim (MLX's own CPU
BLAS is its slow reference one). At concurrency C, C streamed /v1/completions requests are sent at
once from C threads, each a different slice of public-domain text (KJV Genesis) of --prompt-tokens
tokens, asking --tokens tokens at temperature 0 (ours with ignore_eos; mlx-lm has no such field, so
its token counts come from its usage and are reported). Aggregate tok/s = every completion token
/ the wave's wall time; TTFT per request is the time to the first event carrying text. Each level:
a warm-up wave of each server, then --reps waves alternating A B A B, prompts new at every wave
(no prefix-cache hits). At concurrency 1 the in-process Engine is timed too, alternating, for
the HTTP overhead: in a worker process of its own with the server's environment
(OMP_WAIT_POLICY=PASSIVE, which `mlxinfer serve` sets), so the two differ by the HTTP layer only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import numpy as np
from common import machine_info, save_result, summary

from mlxinfer.bench.baseline import NO_SHIM, export_for_mlx_lm
from mlxinfer.bench.servers import MLX_LM_SERVER, free_port
from mlxinfer.bench.sweep import TEXT
from mlxinfer.bench.worker import JsonWorker


def wait_ready(url: str, process: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def one_request(url: str, body: dict, out: list, index: int) -> None:
    """POST a streamed completion; out[index] = (ttft_s, end_s, tokens) from the send."""
    request = urllib.request.Request(
        url + "/v1/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    start, first, tokens = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    out[index] = (first - start, time.perf_counter() - start, tokens)


def wave(url: str, model: str, prompts: list[str], tokens: int, ours: bool) -> dict:
    """len(prompts) streamed requests at once: aggregate tok/s, TTFTs, token counts."""
    out: list = [None] * len(prompts)
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if ours:
        body["ignore_eos"] = True
    threads = [
        threading.Thread(target=one_request, args=(url, {**body, "prompt": p}, out, i))
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    counts = [o[2] for o in out]
    return {
        "tps": sum(counts) / wall,
        "ttft_ms": [o[0] * 1e3 for o in out],
        "tokens": counts,
    }


def engine_worker() -> None:
    """`bench_server.py --engine-worker`: the default model's Engine in this process; each input
    line a JSON {prompt, tokens}, each output line the tok/s of that one request (its prefill and
    decode, as a wave of 1 over HTTP)."""
    model, tokenizer = mlxinfer.load()
    engine = mlxinfer.Engine(model, tokenizer, max_batch=16)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = mlxinfer.SamplingParams(ignore_eos=True, max_tokens=request["tokens"])
        start = time.perf_counter()
        result = engine.submit(request["prompt"], params).result()
        tps = len(result.tokens) / (time.perf_counter() - start)
        print(json.dumps({"tps": tps}), flush=True)
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out")
    parser.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_worker:
        engine_worker()
        return
    levels = [int(x) for x in args.levels.split(",")]

    model, tokenizer = mlxinfer.load()
    ids = tokenizer.encode(TEXT.read_text())
    needed = args.prompt_tokens * (sum(levels) * (2 * args.reps + 2) + 4 * args.reps + 4)
    while len(ids) < needed:
        ids = ids + ids
    cursor = [0]

    def fresh(n: int) -> list[str]:  # n prompts never sent before
        texts = []
        for _ in range(n):
            start = cursor[0]
            cursor[0] += args.prompt_tokens
            texts.append(tokenizer.decode(ids[start : start + args.prompt_tokens]))
        return texts

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    export_for_mlx_lm(model, tokenizer, tmp)
    ours_port, theirs_port = free_port(), free_port()
    ours = subprocess.Popen(
        [sys.executable, "-m", "mlxinfer", "serve", "--port", str(ours_port), "--max-batch", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    theirs = subprocess.Popen(
        [sys.executable, "-c", MLX_LM_SERVER, "--model", str(tmp), "--port", str(theirs_port)],
        env={**os.environ, **NO_SHIM},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers = {
        "mlxinfer": (f"http://127.0.0.1:{ours_port}", "SmolLM2-135M-Instruct", True),
        "mlx-lm": (f"http://127.0.0.1:{theirs_port}", str(tmp), False),
    }
    try:
        wait_ready(servers["mlxinfer"][0], ours, "/health")
        wait_ready(servers["mlx-lm"][0], theirs, "/v1/models")
        engine = JsonWorker(
            [sys.executable, __file__, "--engine-worker"], env={"OMP_WAIT_POLICY": "PASSIVE"}
        )
        results: dict = {}
        for level in levels:
            for url, model_id, is_ours in servers.values():  # warm-ups
                wave(url, model_id, fresh(level), 16, is_ours)
            runs: dict[str, list] = {name: [] for name in servers}
            runs["in-process"] = []
            for _ in range(args.reps):
                for name, (url, model_id, is_ours) in servers.items():
                    runs[name].append(wave(url, model_id, fresh(level), args.tokens, is_ours))
                if level == 1:
                    reply = engine.ask({"prompt": fresh(1)[0], "tokens": args.tokens})
                    runs["in-process"].append(reply["tps"])
            row = {}
            for name in servers:
                ttft = [t for w in runs[name] for t in w["ttft_ms"]]
                row[name] = {
                    "tps": summary([w["tps"] for w in runs[name]]),
                    "ttft_p50_ms": float(np.percentile(ttft, 50)),
                    "ttft_p99_ms": float(np.percentile(ttft, 99)),
                    "tokens": sorted({c for w in runs[name] for c in w["tokens"]}),
                }
            row["ratio"] = row["mlxinfer"]["tps"]["mean"] / row["mlx-lm"]["tps"]["mean"]
            if runs["in-process"]:
                row["in_process_tps"] = summary(runs["in-process"])
                row["http_overhead"] = 1 - row["mlxinfer"]["tps"]["mean"] / statistics.fmean(
                    runs["in-process"]
                )
            results[level] = row
            ours_row, theirs_row = row["mlxinfer"], row["mlx-lm"]
            print(
                f"C={level}: mlxinfer {ours_row['tps']['mean']:.1f} tok/s (TTFT p50 "
                f"{ours_row['ttft_p50_ms']:.0f} / p99 {ours_row['ttft_p99_ms']:.0f} ms), mlx-lm "
                f"{theirs_row['tps']['mean']:.1f} tok/s (TTFT p50 {theirs_row['ttft_p50_ms']:.0f}"
                f" / p99 {theirs_row['ttft_p99_ms']:.0f} ms): {row['ratio']:.2f}x"
                + (
                    f"; in-process {row['in_process_tps']['mean']:.1f} tok/s, HTTP overhead "
                    f"{row['http_overhead']:.1%}"
                    if "http_overhead" in row
                    else ""
                )
                + f"; mlx-lm token counts {theirs_row['tokens']}",
                flush=True,
            )
        engine.close()
    finally:
        for process in (ours, theirs):
            process.terminate()
            process.wait(timeout=60)
    save_result(
        {
            "machine": machine_info(),
            "model": "SmolLM2-135M-Instruct, float32 weights (dequantized from the Q4_1 GGUF)",
            "protocol": "streamed /v1/completions, C at once, temperature 0, alternating",
            "prompt_tokens": args.prompt_tokens,
            "tokens": args.tokens,
            "reps": args.reps,
            "levels": results,
        },
        "server",
        args.out,
    )


if __name__ == "__main__":
    main()
