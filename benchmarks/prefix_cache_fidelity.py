"""How close a prefix-cache hit is to a cold prefill, per KV cache kind, on the default model.

    python benchmarks/prefix_cache_fidelity.py [--prompts 24] [--tokens 32] [--out FILE]

For each prompt (a shared 160-token system prompt, KJV Genesis text, then a different 24-token
question from the same text) and each cache kind (float, 8-bit, 4-bit): one engine with the prefix
cache off answers it cold; another answers the system prompt alone first, then the prompt, which
hits the cache for the shared prefix. Greedy, `--tokens` tokens each. Reported per kind:
  first_logit_diff   max |hit - cold| over the vocabulary, at the prompt's last position
                     (the median and the worst over prompts)
  same_answers       prompts whose greedy answer is the same token for token
  first_token_same   prompts whose first answered token is the same
This is accuracy, not speed: it is what README.md's claim about prefix-cache hits rests on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx

from mlxinfer import SamplingParams
from mlxinfer.generate import prefill

SYSTEM_TOKENS = 160
QUESTION_TOKENS = 24
KINDS = {"float": {}, "8-bit": dict(kv_bits=8), "4-bit": dict(kv_bits=4)}


def last_logits(model, ids, cache_options, cached=None):
    """Logits at the last position: cold, or with the first len(cached[0]) tokens from `cached`."""
    cache = model.make_cache(**cache_options)
    if cached is None:
        return prefill(model, mx.array([ids]), cache)
    prefix_ids, stored = cached
    from mlxinfer.prefix_cache import PrefixCache

    prefixes = PrefixCache(2**30)
    prefixes.store(prefix_ids, stored)
    matched, key = prefixes.lookup(ids)
    prefixes.restore(key, matched, cache)
    return prefill(model, mx.array([ids[matched:]]), cache)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = mlxinfer.load()
    text = Path(mlxinfer.__path__[0], "bench", "kjv_genesis.txt").read_text()
    ids = tokenizer.encode(text)
    system = ids[:SYSTEM_TOKENS]
    starts = range(SYSTEM_TOKENS, SYSTEM_TOKENS + args.prompts * 97, 97)
    prompts = [system + ids[s : s + QUESTION_TOKENS] for s in starts]
    greedy = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    report = {}
    for kind, options in KINDS.items():
        diffs, same, first_same = [], 0, 0
        stored = model.make_cache(**options)
        prefill(model, mx.array([system]), stored)
        for prompt in prompts:
            cold = last_logits(model, prompt, options)
            hit = last_logits(model, prompt, options, (system, stored))
            diffs.append(float(mx.abs(hit - cold).max()))
            with mlxinfer.Engine(model, tokenizer, prefix_cache_mb=0, **options) as engine:
                a = engine.submit(prompt, sampling=greedy).result()
            with mlxinfer.Engine(model, tokenizer, **options) as engine:
                engine.submit(system, sampling=SamplingParams(max_tokens=1)).result()
                b = engine.submit(prompt, sampling=greedy).result()
                assert b.metrics.cached_prompt_tokens > 0, "the prompt did not hit the cache"
            same += a.tokens == b.tokens
            first_same += a.tokens[0] == b.tokens[0]
        report[kind] = {
            "first_logit_diff_median": statistics.median(diffs),
            "first_logit_diff_max": max(diffs),
            "same_answers": f"{same}/{len(prompts)}",
            "first_token_same": f"{first_same}/{len(prompts)}",
        }
        print(kind, json.dumps(report[kind]), flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({"prompts": len(prompts), "tokens": args.tokens, "kinds": report}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
