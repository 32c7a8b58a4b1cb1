"""One rank of an Engine over a split model, for tests/test_parallel.py: started once per rank with
MLX_HOSTFILE and MLX_RANK set (MLX's ring backend over loopback), or alone (one process).

    python tests/tools/engine_worker.py MODEL OUT_DIR [--parallel tensor|pipeline] [--perturb]
        [--forever]

Rank 0 (or the lone process) runs an Engine of 4 rows (prompt chunks of 8) on 8 ragged requests
(greedy, seeded sampled and unseeded sampled), cancels one after its second token, then sends a
prompt that shares a prefix with an earlier one (a prefix-cache hit unless a window is shorter),
then a 20-token prompt and one sharing 18 of its tokens (a hit), and writes OUT_DIR/rank0.json:
each request's tokens and finish reason, the steps taken and the prefix cache's hits. Alone, it
also writes each greedy prompt's tokens and top-2 margins through the single-sequence caches
("reference"). The other ranks run `engine.wait()` and write their step counts. `--perturb` scales
this rank's final norm (its logits then differ from the other ranks'); with `--forever` rank 0
sends the 8 requests again and again until one fails (fault tests). Every rank also writes the
next unseeded seed it would draw after the engine ("next_seed": the same on every rank)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx
import numpy as np

from mlxinfer import Engine, SamplingParams
from mlxinfer.parallel import unseeded_seed
from tests.test_engine import alone  # greedy tokens and top-2 margins through the single caches


def requests(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(8):
        ids = rng.integers(3, vocab - 1, int(rng.integers(3, 40))).tolist()
        n = 6 + 2 * i
        if i % 3 == 0 or i == 4:  # request 4 is cancelled: greedy, so its tokens can be checked
            params = SamplingParams(max_tokens=n, ignore_eos=True)
        elif i % 3 == 1:
            params = SamplingParams(
                temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=n, ignore_eos=True
            )
        else:  # unseeded: rank 0 draws its seed
            params = SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True)
        out.append((ids, params))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--parallel", default=None)
    parser.add_argument("--perturb", action="store_true")
    parser.add_argument("--forever", action="store_true", help="generate until a rank fails")
    args = parser.parse_args()

    model, tokenizer = mlxinfer.load(args.model, parallel=args.parallel)
    rank = model.ranks.rank() if model.ranks is not None else 0
    if args.perturb:
        scale = mx.linspace(0.5, 1.5, model.config.hidden_size)
        model.model.norm.weight = model.model.norm.weight * scale
        mx.eval(model.parameters())  # here: the engine's thread cannot run this thread's arrays
    # chunks of 8 prompt tokens: most prompts take several steps (a pipeline runs them back to back)
    engine = Engine(model, tokenizer, max_batch=4, prefix_cache_mb=64, prefill_chunk=8)
    out = Path(args.out) / f"rank{rank}.json"
    if rank != 0:
        if args.forever:
            print("decoding", flush=True)
        try:
            engine.wait()
        finally:
            seed = unseeded_seed()
            out.write_text(json.dumps({"steps": engine._worker.link.steps, "next_seed": seed}))
        print(f"rank {rank} done", file=sys.stderr)
        return

    work = requests(model.config.vocab_size)
    if args.forever:
        print("decoding", flush=True)
        while True:
            handles = [engine.submit(ids, sampling=params) for ids, params in work]
            for result in [h.result(timeout=300) for h in handles]:
                if result.error is not None:
                    sys.exit(f"rank 0: a request failed: {result.error}")
    handles = [engine.submit(ids, sampling=params) for ids, params in work]
    cancelled = handles[4]
    for i, _ in enumerate(cancelled):
        if i == 1:
            cancelled.cancel()
    results = [h.result(timeout=120) for h in handles]
    for result in results:
        if result.error is not None:
            sys.exit(f"rank 0: a request failed: {result.error}")
    # a prompt sharing its first 24 tokens with the longest earlier prompt: a prefix-cache hit
    longest = max(range(8), key=lambda i: len(work[i][0]))
    shared = work[longest][0][:24] + [5, 6, 7, 8]
    hit = engine.submit(shared, sampling=SamplingParams(max_tokens=8, ignore_eos=True)).result(120)
    # (with a window shorter than that prompt nothing of it was kept: a short one then, surely)
    base = list(range(40, 60))
    for prompt in (base, base[:18] + [5, 6, 7]):
        engine.submit(prompt, sampling=SamplingParams(max_tokens=2, ignore_eos=True)).result(120)
    stats = engine.stats
    engine.close()
    report = {
        "tokens": [r.tokens for r in [*results, hit]],
        "reasons": [r.finish_reason for r in [*results, hit]],
        "errors": [r.error for r in [*results, hit]],
        "prefix_cache_hits": stats["prefix_cache_hits"],
        "steps": engine._worker.link.steps if engine._worker.link else None,
        "next_seed": unseeded_seed(),
    }
    if model.ranks is None:
        prompts = [ids for ids, _ in work] + [shared]
        lengths = [p.max_tokens for _, p in work] + [8]
        report["reference"] = [
            alone(model, ids, n) for ids, n in zip(prompts, lengths, strict=True)
        ]
    out.write_text(json.dumps(report))
    print(f"rank {rank} done", file=sys.stderr)


if __name__ == "__main__":
    main()
