"""`mlxinfer generate [--model PATH] --prompt TEXT [--max-tokens N] [--chat]`."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        print("mlxinfer: error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    from .generate import generate  # imported late: `mlxinfer --help` stays instant
    from .loading import load

    try:
        model, tokenizer = load(args.model)
        text = generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, chat=args.chat)
    except (FileNotFoundError, ModelLoadError, ValueError) as e:
        print(f"mlxinfer: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0
