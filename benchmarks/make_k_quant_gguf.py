"""A large K-quant GGUF of random blocks, shaped like a 7B llama in llama.cpp's Q4_K_M mix (Q4_K,
with Q6_K for the down projections and the LM head), for timing loads of a file of that size
when no real one is at hand.

    python benchmarks/make_k_quant_gguf.py OUT.gguf [--layers 32]

The weights are random blocks (random quants, small float16 scales): the file loads and runs,
but says nothing. With the defaults the file is ~3.9 GB (6.7 G weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import gguf

    from tests.test_loading import random_blocks

    rng = np.random.default_rng(0)
    hidden, ffn, vocab = args.hidden, args.ffn, args.vocab
    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(hidden // 128)
    writer.add_head_count_kv(hidden // 128)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([])
    writer.add_eos_token_id(2)

    def matrix(name: str, rows: int, columns: int, kind: str = "Q4_K") -> None:
        raw = random_blocks(rng, kind, rows, columns)
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(args.layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{part}.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn, "Q6_K")
    norm("output_norm.weight")
    matrix("output.weight", vocab, hidden, "Q6_K")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(args.out, Path(args.out).stat().st_size)


if __name__ == "__main__":
    main()
