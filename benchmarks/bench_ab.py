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
                                  [--batch 8]

Greedy, EOS ignored, a prompt of exact length from KJV Genesis; then (unless --batch 1) that many
prompts of the same length (consecutive stretches of the text) through batch_generate, whose
aggregate tok/s (prefill included) is `batch_tps`. The compute policy and op set
are each checkout's defaults ("auto").
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
from mlxinfer import SamplingParams
from mlxinfer.bench.sweep import exact_tokens
model, tokenizer = mlxinfer.load()
print(json.dumps({"ready": mlxinfer.__file__}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    n, tokens, batch = request["prompt_tokens"], request["tokens"], request["batch"]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    prompt = exact_tokens(tokenizer, n)
    *_, last = mlxinfer.stream_generate(model, tokenizer, prompt, sampling=params)
    m = last.metrics
    reply = {"decode_tps": m.decode_tps, "prefill_tps": m.prefill_tps}
    if batch > 1:  # distinct prompts: consecutive stretches of the text
        text = exact_tokens(tokenizer, n * batch)
        prompts = [text[i * n : (i + 1) * n] for i in range(batch)]
        start = time.perf_counter()
        results = mlxinfer.batch_generate(model, tokenizer, prompts, sampling=params)
        seconds = time.perf_counter() - start
        assert all(len(r.tokens) == tokens for r in results), [r.finish_reason for r in results]
        reply["batch_tps"] = batch * tokens / seconds  # aggregate, the batch's prefill included
    print(json.dumps(reply), flush=True)
"""


class Worker(JsonWorker):
    """A checkout's mlxinfer in its own process (the package's JSON-lines worker)."""

    def __init__(self, checkout: Path):
        root = str(checkout.resolve())
        super().__init__([sys.executable, "-c", WORKER], {"PYTHONPATH": root}, cwd=checkout)
        self.path = self.facts["ready"]
        if not self.path.startswith(root):
            self.close()
            raise SystemExit(f"{checkout}: the worker imported mlxinfer from {self.path}")

    def run(self, request: dict) -> dict:
        return self.ask(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    parser.add_argument("--b", type=Path, required=True, help="the checkout under test")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--batch", type=int, default=8, help="also batch_generate this many prompts (1: no)"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    from mlxinfer.bench.stats import paired_ratio, summary

    request = {"prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "batch": args.batch}
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
    for metric in ("decode_tps", "prefill_tps", "batch_tps")[: 3 if args.batch > 1 else 2]:
        xa = [s[metric] for s in samples["a"]]
        xb = [s[metric] for s in samples["b"]]
        result[metric] = {"a": summary(xa), "b": summary(xb), "b_over_a": paired_ratio(xb, xa)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
