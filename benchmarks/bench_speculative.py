"""Speculative decoding with prompt lookup against plain decoding, same run, default model.

    python benchmarks/bench_speculative.py [--reps 3] [--tokens 160] [--num-draft 6]

Two tasks, each through the chat template:
    copy   rewrite a ~300-token passage (the first verses of Genesis, KJV, public domain:
           tests/data/kjv_genesis_1.txt) exactly, with one change ("God" -> "the Creator")
    free   a short story on a given topic (eight topics), where the reply copies nothing
at temperature 0 (greedy) and 0.7 (seeded), alone (one request) and in a batch of 8 (eight
requests of the task at once, max_batch 8), with and without `speculation="prompt-lookup"`
(num_draft --num-draft, lookup_ngram 3), each up to --tokens tokens (EOS ends a reply). The
variants alternate within each repetition, after one warm-up of each.

Reported per (task, temperature, batch): decode tok/s with and without, their ratio, and the
acceptance rate (accepted / proposed). Decode tok/s alone is the request's `decode_tps` ((N - 1)
/ (t_N - t_1)); in a batch it is the aggregate sum(N_i - 1) / (last token - first first token),
prefill excluded (eight 330-token prompts would otherwise dilute both sides alike).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
from common import machine_info, save_result, summary

from mlxinfer import SamplingParams

GENESIS = Path(__file__).parents[1] / "tests" / "data" / "kjv_genesis_1.txt"
TOPICS = [
    "a dragon who learns to bake bread",
    "a lighthouse keeper and a lost whale",
    "a robot that collects umbrellas",
    "two rival gardeners in a small village",
    "a clock that runs backwards",
    "a cat who becomes mayor",
    "a map that redraws itself",
    "a violin found in an attic",
]


def task_prompts(task: str, tokenizer, n: int) -> list[list[dict]]:
    if task == "copy":
        words = GENESIS.read_text().split()
        passage, text = [], ""
        for word in words:  # ~300 tokens of the passage
            passage.append(word)
            text = " ".join(passage)
            if len(tokenizer.encode(text)) >= 300:
                break
        ask = (
            "Rewrite the following passage exactly, but replace the word 'God' with 'the Creator':"
        )
        return [[{"role": "user", "content": f"{ask}\n\n{text}"}]] * n
    return [
        [{"role": "user", "content": f"Write a short story about {topic}."}]
        for topic in (TOPICS * n)[:n]
    ]


def decode_rate(metrics: list) -> float:
    """One request's decode_tps; a batch's aggregate sum(N_i - 1) / (last token - first first
    token), prefill excluded."""
    if len(metrics) == 1:
        return metrics[0].decode_tps
    span = (max(m.e2e_ms for m in metrics) - min(m.ttft_ms for m in metrics)) / 1e3
    return sum(m.generated_tokens - 1 for m in metrics) / span


def run(model, tokenizer, prompts, temperature: float, spec: bool, args) -> dict:
    params = [
        SamplingParams(
            temperature=temperature,
            seed=1000 + i,
            max_tokens=args.tokens,
            speculation="prompt-lookup" if spec else None,
            num_draft=args.num_draft,
        )
        for i in range(len(prompts))
    ]
    results = mlxinfer.batch_generate(
        model, tokenizer, prompts, sampling=params, chat=True, max_batch=len(prompts)
    )
    metrics = [r.metrics for r in results]
    proposed = sum(m.draft_tokens for m in metrics)
    accepted = sum(m.accepted_draft_tokens for m in metrics)
    return {
        "decode_tps": decode_rate(metrics),
        "tokens": sum(m.generated_tokens for m in metrics),
        "proposed": proposed,
        "accepted": accepted,
        "texts": [r.text for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--num-draft", type=int, default=6)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = mlxinfer.load()
    rows = []
    for task in ("copy", "free"):
        for temperature in (0.0, 0.7):
            for batch in [int(b) for b in args.batches.split(",")]:
                prompts = task_prompts(task, tokenizer, batch)
                runs: dict[bool, list[dict]] = {False: [], True: []}
                for spec in (False, True):  # warm-up
                    run(model, tokenizer, prompts, temperature, spec, args)
                for _ in range(args.reps):
                    for spec in (False, True):
                        runs[spec].append(run(model, tokenizer, prompts, temperature, spec, args))
                plain = summary([r["decode_tps"] for r in runs[False]])
                fast = summary([r["decode_tps"] for r in runs[True]])
                proposed = sum(r["proposed"] for r in runs[True])
                accepted = sum(r["accepted"] for r in runs[True])
                same = temperature > 0 or all(
                    a["texts"] == b["texts"] for a, b in zip(runs[False], runs[True], strict=True)
                )
                row = {
                    "task": task,
                    "temperature": temperature,
                    "batch": batch,
                    "plain_decode_tps": plain,
                    "lookup_decode_tps": fast,
                    "ratio": fast["mean"] / plain["mean"],
                    "acceptance_rate": accepted / proposed if proposed else 0.0,
                    "proposed_per_run": proposed / args.reps,
                    "tokens_per_run": sum(r["tokens"] for r in runs[True]) / args.reps,
                    "greedy_texts_equal": same,
                }
                rows.append(row)
                print(
                    f"{task:4} T={temperature:.1f} batch {batch}: plain {plain['mean']:.1f} "
                    f"lookup {fast['mean']:.1f} tok/s ({row['ratio']:.2f}x), acceptance "
                    f"{row['acceptance_rate']:.2f}, same text {same}",
                    flush=True,
                )
    save_result(
        {
            "benchmark": "speculative",
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine_info(),
            "args": vars(args),
            "rows": rows,
        },
        "speculative",
        args.out,
    )


if __name__ == "__main__":
    main()
