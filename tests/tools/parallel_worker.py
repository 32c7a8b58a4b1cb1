"""One rank of a tensor-parallel run, for tests/test_parallel.py: started once per rank with
MLX_HOSTFILE and MLX_RANK set (MLX's ring backend over loopback), or alone (one process, no group).

    python tests/tools/parallel_worker.py MODEL OUT_DIR [--parallel tensor] [--kernels cpu|mlx]
        [--compute native|float32] [--kv-bits N] [--max-kv-size N] [--forever]
        [--pipeline-split N,N]

Writes OUT_DIR/rank{R}.npz: the logits of a full forward pass over a fixed prompt, the logits of a
prefill and 6 decode steps through a KV cache (greedy tokens fed back), those greedy tokens, a
seeded sampled continuation's text, and the bytes of weights this rank holds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# isort: off
import mlxinfer  # first: it loads OpenBLAS, which must happen before mlx.core is imported

# isort: on
import mlx.core as mx
import numpy as np

from mlxinfer.steps import decode_step, prefill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--parallel", default=None)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--compute", default="auto")
    parser.add_argument("--kv-bits", type=int, default=None)
    parser.add_argument("--max-kv-size", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--forever", action="store_true", help="decode until killed (fault tests)")
    parser.add_argument("--pipeline-split", default=None, help="blocks per rank, e.g. 20,10")
    args = parser.parse_args()

    split = None  # (alone, the flag is ignored: the run to compare with)
    if args.pipeline_split is not None and args.parallel is not None:
        split = [int(n) for n in args.pipeline_split.split(",")]
    model, tokenizer = mlxinfer.load(
        args.model,
        compute=args.compute,
        kernels=args.kernels,
        parallel=args.parallel,
        pipeline_split=split,
    )
    rank = model.ranks.rank() if model.ranks is not None else 0
    if args.forever:
        cache = model.make_cache()
        token = mx.array([1])
        print("decoding", flush=True)
        while True:
            token = mx.argmax(decode_step(model, token, cache), axis=-1)
            mx.eval(token)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(3, vocab - 1, args.prompt_tokens)
    full = np.array(model(mx.array(ids[None])).astype(mx.float32))[0]  # [T, vocab]

    options = {}
    if args.kv_bits:
        options.update(kv_bits=args.kv_bits, kv_group_size=32)
    if args.max_kv_size:
        options["max_kv_size"] = args.max_kv_size
    cache = model.make_cache(**options)
    logits = prefill(model, mx.array(ids[None]), cache, chunk_size=5)
    steps, tokens = [np.array(logits.astype(mx.float32))[0]], []
    for _ in range(6):
        token = int(np.argmax(steps[-1]))
        tokens.append(token)
        logits = decode_step(model, mx.array([token]), cache)
        steps.append(np.array(logits.astype(mx.float32))[0])

    sampling = mlxinfer.SamplingParams(temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    sampled = mlxinfer.generate(model, tokenizer, ids.tolist(), max_tokens=8, sampling=sampling)
    np.savez(
        Path(args.out) / f"rank{rank}.npz",
        full=full,
        steps=np.stack(steps),
        tokens=np.array(tokens),
        sampled=np.array(sampled),
        nbytes=np.array(model.nbytes),
        heads=np.array([model.config.num_attention_heads, model.config.num_key_value_heads]),
        layers=np.array(model.config.num_hidden_layers),
    )
    print(f"rank {rank} done", file=sys.stderr)


if __name__ == "__main__":
    main()
