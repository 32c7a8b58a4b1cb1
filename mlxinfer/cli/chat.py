"""`mlxinfer chat`: a multi-turn conversation in the terminal.

The whole history goes through the model's chat template each turn; replies stream as they are
generated. `/reset` clears the history (the system message stays), `/exit` quits. When standard
input is not a terminal each line is one user turn and each reply ends with a newline; with --json
each reply is one JSON line (replies may hold newlines), so a conversation can be scripted. Ctrl-C
stops the reply being generated (what was said stays in the history); at the prompt it quits, like
Ctrl-D.

With --parallel under `mlx.launch`, rank 0 holds the conversation (standard input, the replies) and
an Engine of one row whose steps the other ranks run with it (engine_ranks.py); they print nothing
and end when rank 0 does.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..conversation import REPLY_ROOM, Conversation
from .options import (
    EXIT_INTERRUPTED,
    EXIT_LOAD,
    PrefillProgress,
    UsageError,
    cache_options,
    check_text,
    load_draft,
    load_model,
    sampling_params,
)

COMMANDS = {"/reset": "clear the conversation", "/exit": "quit (also /quit, Ctrl-D)"}


def run_chat(args: argparse.Namespace) -> int:
    sampling = sampling_params(args)
    cache = cache_options(args)
    loaded = load_model(args)
    if loaded is None:
        return EXIT_LOAD
    model, tokenizer = loaded
    if not tokenizer.chat_template:
        raise UsageError(
            "this model has no chat template; use `mlxinfer generate --raw` to complete text"
        )
    draft = load_draft(args, model, tokenizer)
    if draft is False:
        return EXIT_LOAD
    engine = None
    if model.ranks is not None:  # every rank runs each reply: rank 0's engine plans them
        from ..engine import Engine
        from .serve import follow_engine

        engine = Engine(model, tokenizer, max_batch=1, prefix_cache_mb=0, cache=cache)
        if model.ranks.rank() != 0:
            return follow_engine(engine, "chat", interrupt_ends=False)
    try:
        return _chat_loop(args, model, tokenizer, sampling, cache, engine, draft)
    finally:
        if engine is not None:
            engine.close(cancel=True)


def _chat_loop(args, model, tokenizer, sampling, cache, engine, draft=None) -> int:
    interactive = sys.stdin.isatty()
    conversation = Conversation(tokenizer, model.config.max_position_embeddings, args.system)
    if interactive:
        help_text = ", ".join(f"{c} to {what}" for c, what in COMMANDS.items())
        print(f"mlxinfer chat: {help_text}; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            return EXIT_INTERRUPTED if not interactive else 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conversation.reset()
            print("mlxinfer chat: conversation cleared", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(
                f"mlxinfer chat: unknown command {text}; commands: {', '.join(COMMANDS)}",
                file=sys.stderr,
            )
            continue
        try:
            check_text(text, "the message")
        except UsageError as e:
            print(f"mlxinfer chat: error: {e}", file=sys.stderr)
            continue
        try:
            messages, dropped = conversation.ask(text, min(sampling.max_tokens, REPLY_ROOM))
        except ValueError as e:  # the chat template fails on this history (or runs past its bounds)
            conversation.turns.pop()
            report_failed_turn(args, e, interactive)
            continue
        if dropped:
            print(
                f"mlxinfer chat: the conversation outgrew the context; the {dropped} oldest "
                "messages were dropped",
                file=sys.stderr,
            )
        progress = PrefillProgress()
        reply, last = [], None
        stream = _reply(model, tokenizer, messages, sampling, cache, progress, engine, draft)
        try:
            for response in stream:
                progress.clear()
                reply.append(response.text)
                last = response
                if not args.json:
                    print(response.text, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
            progress.clear()
            finish(args, reply, None, " [stopped]")
            if not interactive:
                return EXIT_INTERRUPTED
        except ValueError as e:  # a single message longer than the context, a failing template
            progress.clear()
            conversation.turns.pop()
            report_failed_turn(args, e, interactive)
            continue
        else:
            finish(args, reply, last, "")
        conversation.answer("".join(reply))


def report_failed_turn(args: argparse.Namespace, error: ValueError, interactive: bool) -> None:
    """The error on stderr; with --json an error line too, as every turn has its line (a script
    stays in step); piped, the empty line a reply would end with."""
    print(f"mlxinfer chat: error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": "", "finish_reason": "error", "error": str(error)}))
    elif not interactive:
        print(flush=True)


def finish(args: argparse.Namespace, reply: list[str], last, stopped_mark: str) -> None:
    """End a reply: a newline after the streamed text, or with --json the reply as one line
    {text, finish_reason, metrics} ("interrupted" when Ctrl-C stopped it)."""
    if not args.json:
        print(stopped_mark if sys.stdin.isatty() else "", flush=True)
        return
    result = {
        "text": "".join(reply),
        "finish_reason": last.finish_reason if last is not None else "interrupted",
        "metrics": last.metrics.to_dict() if last is not None and last.metrics else None,
    }
    print(json.dumps(result), flush=True)


def _reply(model, tokenizer, messages, sampling, cache, progress, engine, draft=None):
    """The reply's responses as they come, as a generator whose close() stops it (nothing starts
    before its first response is asked for): from stream_generate, or over ranks from rank 0's
    engine (closing it cancels the request)."""
    if engine is None:
        from ..generate import stream_generate

        return stream_generate(
            model,
            tokenizer,
            messages,
            sampling=sampling,
            cache=cache,
            prefill_progress=progress,
            draft_model=draft,
        )

    def responses():
        handle = engine.submit(messages, sampling=sampling)  # (a ValueError: the caller's)
        try:
            yield from handle
        finally:
            if not handle.done:  # stopped midway (Ctrl-C): cancel, and let it end
                handle.cancel()
                handle.result(timeout=60)

    return responses()
