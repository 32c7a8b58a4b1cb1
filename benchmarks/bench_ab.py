"""Two checkouts of mlxinfer against each other on the default model, same run: did a change slow
decoding (or prefill)? Each checkout runs in its own worker process; requests alternate between
them after one warm-up each, and the result is B / A with a 95% interval paired by repetition.

Order matters on the development machine: of two identical workers, the one started first
measured 1.4x slower prefill and ~1.1x slower decoding (2-core Xeon, 2026-11-26; the cause is not
known). So the run has two halves, A started (and run) first in one and B in the other, and the
ratios of both halves are pooled: the order's effect cancels out and widens the interval instead
of biasing it.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ab.py --a /tmp/before --b . [--prompt-tokens 64] [--tokens 128] [--reps 7]

Greedy, EOS ignored, a prompt of exact length from KJV Genesis. The compute policy and op set
are each checkout's defaults ("auto").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys
import mlxinfer
from mlxinfer import SamplingParams
from mlxinfer.bench.sweep import exact_tokens
model, tokenizer = mlxinfer.load()
print(json.dumps({"ready": mlxinfer.__file__}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    prompt = exact_tokens(tokenizer, request["prompt_tokens"])
    params = SamplingParams(max_tokens=request["tokens"], ignore_eos=True)
    *_, last = mlxinfer.stream_generate(model, tokenizer, prompt, sampling=params)
    m = last.metrics
    print(json.dumps({"decode_tps": m.decode_tps, "prefill_tps": m.prefill_tps}), flush=True)
"""


class Worker:
    def __init__(self, checkout: Path):
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=checkout,
        )
        ready = json.loads(self.process.stdout.readline())["ready"]
        if not ready.startswith(str(checkout.resolve())):
            raise SystemExit(f"{checkout}: the worker imported mlxinfer from {ready}")
        self.path = ready

    def run(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    parser.add_argument("--b", type=Path, required=True, help="the checkout under test")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    from mlxinfer.bench.stats import paired_ratio, summary

    request = {"prompt_tokens": args.prompt_tokens, "tokens": args.tokens}
    samples = {"a": [], "b": []}
    for first, second in (("a", "b"), ("b", "a")):  # each checkout started first once
        half = -(-args.reps // 2) if first == "a" else args.reps // 2
        workers = {first: Worker(getattr(args, first)), second: Worker(getattr(args, second))}
        try:
            for name in (first, second):  # warm-ups
                workers[name].run(request)
            for _ in range(half):
                for name in (first, second):
                    samples[name].append(workers[name].run(request))
        finally:
            paths = {name: w.path for name, w in workers.items()}
            for w in workers.values():
                w.close()
    a, b = argparse.Namespace(path=paths["a"]), argparse.Namespace(path=paths["b"])
    result = {"machine": machine_info(), "a": a.path, "b": b.path, **request, "reps": args.reps}
    for metric in ("decode_tps", "prefill_tps"):
        xa = [s[metric] for s in samples["a"]]
        xb = [s[metric] for s in samples["b"]]
        result[metric] = {"a": summary(xa), "b": summary(xb), "b_over_a": paired_ratio(xb, xa)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
