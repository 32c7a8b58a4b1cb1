"""The `mlxinfer` command.

mlxinfer generate [--model PATH] --prompt TEXT [--max-tokens N] [--chat]
                  [--temperature T] [--top-k K] [--top-p P] [--min-p P]
                  [--repetition-penalty R] [--presence-penalty X] [--frequency-penalty X]
                  [--seed S] [--stop STR ...] [--ignore-eos] [--logprobs N] [--stream] [--json]
                  [--max-kv-size N] [--kv-keep K] [--kv-bits {4,8}] [--kv-group-size G]
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxinfer", description="LLM inference on MLX")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument(
        "--model",
        default=None,
        help="a Hugging Face / MLX model directory or a .gguf file (default: SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (256)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument(
        "--compute",
        choices=["auto", "float32", "native"],
        default="auto",
        help="weights as stored (native) or float32; auto: float32 on the CPU, native on a GPU",
    )
    sampling = gen.add_argument_group("sampling (default: greedy)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=0, help="0 = off")
    sampling.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    sampling.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument(
        "--stop", action="append", default=[], help="a stop string (repeat for several)"
    )
    sampling.add_argument("--ignore-eos", action="store_true", help="generate exactly max tokens")
    sampling.add_argument("--logprobs", type=int, default=0, help="top-N logprobs per token (JSON)")
    kv = gen.add_argument_group("KV cache (default: growing, float)")
    kv.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="bound the cache to N tokens per layer (rotating; keeps --kv-keep sink tokens)",
    )
    kv.add_argument("--kv-keep", type=int, default=4, help="sink tokens a bounded cache keeps (4)")
    kv.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the cache")
    kv.add_argument(
        "--kv-group-size",
        type=int,
        choices=[32, 64, 128],
        default=64,
        help="quantization group (64)",
    )
    output = gen.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print text as it is generated")
    output.add_argument("--json", action="store_true", help="print text and metrics as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backend import blas_status
    from .generate import stream_generate  # imported late: `mlxinfer --help` stays instant
    from .loading import load
    from .sampling import SamplingParams

    try:
        sampling = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            max_tokens=args.max_tokens,
            ignore_eos=args.ignore_eos,
            logprobs=args.logprobs,
        )
    except ValueError as e:
        print(f"mlxinfer: error: {e}", file=sys.stderr)
        return 2

    try:
        model, tokenizer = load(args.model, compute=args.compute)
        pieces, tokens = [], []
        responses = stream_generate(
            model,
            tokenizer,
            args.prompt,
            sampling=sampling,
            chat=args.chat,
            max_kv_size=args.max_kv_size,
            kv_keep=args.kv_keep,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
        )
        for response in responses:
            pieces.append(response.text)
            tokens.append(response)
            if args.stream and not args.json:
                print(response.text, end="", flush=True)
    except (FileNotFoundError, ModelLoadError, ValueError) as e:
        print(f"mlxinfer: error: {e}", file=sys.stderr)
        return 1

    last = tokens[-1] if tokens else None
    if args.json:
        result = {
            "text": "".join(pieces),
            "finish_reason": last.finish_reason if last else None,
            "token_ids": [r.token for r in tokens],
            "metrics": last.metrics.to_dict() if last and last.metrics else None,
            "compute_policy": model.compute_policy,
            "kv_cache": {
                "max_kv_size": args.max_kv_size,
                "keep": args.kv_keep if args.max_kv_size else None,
                "bits": args.kv_bits,
                "group_size": args.kv_group_size if args.kv_bits else None,
            },
            "blas": blas_status(),
        }
        if args.logprobs:
            result["logprobs"] = [
                {"token": r.token, "logprob": r.logprobs.logprob, "top": r.logprobs.top}
                for r in tokens
            ]
        print(json.dumps(result))
    elif args.stream:
        print()
    else:
        print("".join(pieces))
    return 0
