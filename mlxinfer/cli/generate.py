"""`mlxinfer generate`: one prompt, its text (streamed or not) and, with --json, its metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .options import (
    EXIT_INTERRUPTED,
    EXIT_LOAD,
    MAX_CLI_LOGPROBS,
    PrefillProgress,
    UsageError,
    cache_options,
    check_text,
    load_draft,
    load_model,
    sampling_params,
)

if TYPE_CHECKING:
    from ..cache import CacheSpec
    from ..sampling import SamplingParams


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text from --prompt, --prompt - (standard input) or --prompt-file."""
    if args.prompt_file is not None:
        flag = f"--prompt-file {args.prompt_file}"
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise UsageError(f"{flag}: {reason}") from None
    elif args.prompt == "-":
        flag = "--prompt - (standard input)"
        text = sys.stdin.read()
    elif args.prompt is not None:
        flag, text = "--prompt", args.prompt
    else:
        raise UsageError("give the prompt with --prompt TEXT, --prompt - or --prompt-file PATH")
    if not text.strip():
        raise UsageError(f"{flag} is empty")
    check_text(text, flag)
    return text


def check_generate_args(args: argparse.Namespace) -> tuple[str, SamplingParams, CacheSpec]:
    """Everything `generate` can check before loading: (prompt, SamplingParams, cache options)."""
    if args.raw and (args.chat or args.system is not None):
        raise UsageError(
            "--raw sends the prompt as is: it cannot be combined with --chat or --system"
        )
    if not 0 <= args.logprobs <= MAX_CLI_LOGPROBS:
        raise UsageError(
            f"--logprobs must be between 0 and {MAX_CLI_LOGPROBS}, got {args.logprobs}"
        )
    if args.logprobs and not args.json:
        raise UsageError("--logprobs needs --json (log-probabilities are part of the JSON output)")
    sampling = sampling_params(args, args.logprobs)
    cache = cache_options(args)
    return read_prompt(args), sampling, cache


def conversation(tokenizer, prompt: str, args: argparse.Namespace) -> str | list[dict]:
    """The prompt as sent: chat messages when the chat template applies, else the raw text."""
    if args.raw:
        return prompt
    if not tokenizer.chat_template:
        if args.chat or args.system is not None:
            flag = "--chat" if args.chat else "--system"
            raise UsageError(f"{flag} needs a chat template, and this model has none (use --raw)")
        return prompt
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    return messages + [{"role": "user", "content": prompt.strip()}]


def run_generate(args: argparse.Namespace) -> int:
    prompt, sampling, cache = check_generate_args(args)
    loaded = load_model(args)
    if loaded is None:
        return EXIT_LOAD
    model, tokenizer = loaded
    draft = load_draft(args, model, tokenizer)
    if draft is False:
        return EXIT_LOAD
    from ..backend import blas_status
    from ..generate import stream_generate

    if model.ranks is not None and model.ranks.rank() != 0:
        # Every rank runs the generation (each holds part of every layer); rank 0 prints it.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)

    request = conversation(tokenizer, prompt, args)
    progress = PrefillProgress()
    pieces, responses = [], []
    stream = stream_generate(
        model,
        tokenizer,
        request,
        sampling=sampling,
        cache=cache,
        prefill_progress=progress,
        draft_model=draft,
    )
    try:
        for response in stream:
            progress.clear()
            pieces.append(response.text)
            responses.append(response)
            if args.stream and args.json:
                print(json.dumps(_token_json(response)), flush=True)
            elif args.stream:
                print(response.text, end="", flush=True)
    except ValueError as e:  # a prompt longer than the context, a chat template that fails
        progress.clear()
        print(f"mlxinfer generate: error: {e}", file=sys.stderr)
        return EXIT_LOAD
    except KeyboardInterrupt:
        stream.close()
        progress.clear()
        _print_result(args, model, cache, pieces, responses, True, blas_status())
        return EXIT_INTERRUPTED
    _print_result(args, model, cache, pieces, responses, False, blas_status())
    last = responses[-1] if responses else None
    if last is not None and last.finish_reason == "error":  # never reported as success
        print(f"mlxinfer generate: error: {last.error}", file=sys.stderr)
        return EXIT_LOAD
    return 0


def _token_json(response) -> dict:
    out = {"token": response.token, "text": response.text}
    if response.logprobs is not None:
        out["logprob"] = response.logprobs.logprob
        out["top"] = response.logprobs.top
    return out


def _print_result(args, model, cache, pieces, responses, interrupted: bool, blas: str) -> None:
    text = "".join(pieces)
    if not args.json:
        if args.stream:
            print(flush=True)  # the text is out already
        else:
            print(text, flush=True)
        if interrupted:
            print("mlxinfer generate: interrupted", file=sys.stderr)
        return
    last = responses[-1] if responses else None
    result = {
        "text": text,
        "finish_reason": "interrupted" if interrupted else (last.finish_reason if last else None),
        "error": last.error if last else None,
        "token_ids": [r.token for r in responses],
        "metrics": last.metrics.to_dict() if last and last.metrics else None,
        "compute_policy": model.compute_policy,
        "kernels": model.kernels,
        "kv_cache": {
            "max_kv_size": cache.max_kv_size,
            "keep": cache.kv_keep if cache.max_kv_size else None,
            "bits": cache.kv_bits,
            "group_size": cache.kv_group_size if cache.kv_bits else None,
        },
        "blas": blas,
    }
    if args.logprobs:
        result["logprobs"] = [
            {"token": r.token, "logprob": r.logprobs.logprob, "top": r.logprobs.top}
            for r in responses
        ]
    print(json.dumps(result), flush=True)
