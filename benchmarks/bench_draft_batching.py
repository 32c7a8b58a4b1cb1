"""What drafting costs a batch: a draft model proposing for every row of a batch of 8, every pass,
in one or more checkouts of mlxinfer (each in its own process, alternating).

    python benchmarks/bench_draft_batching.py [--checkout PATH ...] [--layers 8] [--reps 2]

The target is the default model (float32); the draft the same model truncated to its first
--layers blocks. Eight copies of bench_speculative.py's copy task (through the chat template), 48
tokens each (EOS ignored), speculation="draft" with num_draft 3, and the runner's decisions
switched off: every row drafts num_draft proposals every pass (`affordable` and `worth` patched)
and the batch checks them all, so what differs between checkouts is what the drafting and the
checking cost, not whether they were chosen. Reported per checkout: the batch's aggregate decode
tok/s (bench_speculative.decode_rate) per repetition and the acceptance rate, after one warm-up.
Compare checkouts only within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlxinfer.bench.worker import JsonWorker

WORKER = r"""
import json, sys
import mlxinfer  # first: OpenBLAS before mlx.core
import mlxinfer.runner
from bench_speculative import decode_rate, task_prompts
from mlxinfer import SamplingParams
mlxinfer.runner.affordable = lambda k, *costs: k  # every row drafts every pass
mlxinfer.runner.worth = lambda: 0.0  # as many proposals as num_draft
mlxinfer.runner.width = lambda cost, rows, proposals, alphas: 1 + max(map(len, proposals.values()))
model, tokenizer = mlxinfer.load(compute="float32")
draft, _ = mlxinfer.load(compute="float32")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    ask = json.loads(line)
    draft.model.layers = draft.model.layers[: ask["layers"]]
    params = SamplingParams(max_tokens=48, ignore_eos=True, speculation="draft", num_draft=3)
    results = mlxinfer.batch_generate(
        model, tokenizer, task_prompts("copy", tokenizer, 8), sampling=params,
        draft_model=draft, chat=True,
    )
    metrics = [r.metrics for r in results]
    proposed = sum(m.draft_tokens for m in metrics)
    accepted = sum(m.accepted_draft_tokens for m in metrics)
    print(json.dumps({"decode_tps": decode_rate(metrics), "acceptance": accepted / max(1, proposed)}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", type=Path, help="default: this one")
    parser.add_argument("--layers", type=int, default=8, help="the draft's blocks (of 30)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    checkouts = args.checkout or [Path(__file__).resolve().parent.parent]
    workers = {
        str(checkout): JsonWorker(
            [sys.executable, "-c", WORKER],
            {"PYTHONPATH": f"{checkout}:{checkout / 'benchmarks'}"},
            cwd=checkout,
        )
        for checkout in checkouts
    }
    ask = {"layers": args.layers}
    for worker in workers.values():
        worker.ask(ask)  # warm-up
    results: dict[str, list] = {name: [] for name in workers}
    for _ in range(args.reps):
        for name, worker in workers.items():
            r = worker.ask(ask)
            results[name].append(r)
            print(
                f"{name}: {r['decode_tps']:.1f} tok/s (acceptance {r['acceptance']:.2f})",
                flush=True,
            )
    for worker in workers.values():
        worker.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args) | {"checkout": list(workers)},
                                              "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
