"""`mlxinfer serve`: the HTTP server (mlxinfer.server) on one model and one Engine, in the
foreground until SIGTERM or Ctrl-C, which stop it taking requests, let those in flight finish for
a few seconds and cancel the rest; SIGTERM then exits 0, Ctrl-C 130.

Under `mlx.launch` with --parallel, rank 0 serves HTTP and owns the Engine's queue; the other ranks
load their parts and run the steps rank 0 plans (engine_ranks.py), printing nothing but errors,
until rank 0 closes the engine. They outlive a signal by rank 0's drain (mlx.launch signals every
rank), so the replies in flight finish; a rank that is lost makes rank 0's engine stop, and the
server then answers 503."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .options import UsageError, cache_options, check_draft_flag, check_parallel_args, open_draft

API_KEY_ENV = "MLXINFER_API_KEY"
# The kernels' OpenMP threads spin for a while after each product by default; beside a server's
# threads (the event loop, tokenizing) on few cores the spinning took the cores they needed:
# 53 tok/s at 16 streams with spinning, 87 passive, against the in-process engine's ~90.
OMP_WAIT_ENV = "OMP_WAIT_POLICY"


def add_parser(commands) -> None:
    from .options import add_cache_options, add_draft_option, add_model_options, add_parallel_option

    serve = commands.add_parser(
        "serve",
        help="an OpenAI- and Anthropic-compatible HTTP server",
        description="Serve one model over HTTP: /v1/chat/completions, /v1/completions, "
        "/v1/messages, /v1/models, /health, /metrics. Listens on this machine only unless "
        "--host says otherwise.",
    )
    add_model_options(serve)
    add_parallel_option(serve)
    serve.add_argument("--host", default="127.0.0.1", metavar="ADDRESS", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, metavar="N", help="default 8080")
    serve.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require this key (Authorization: Bearer KEY, or x-api-key); default ${API_KEY_ENV}",
    )
    serve.add_argument(
        "--model-name",
        default=None,
        metavar="ID",
        help="the model's id in the API (default: the model file or directory's name)",
    )
    engine = serve.add_argument_group("engine")
    engine.add_argument("--max-batch", type=int, default=8, metavar="N", help="rows at once (8)")
    engine.add_argument(  # (checked by EngineOptions: the parser must not import MLX)
        "--policy",
        default="prefill-first",
        metavar="P",
        help="prefill-first (default), decode-first or chunked",
    )
    engine.add_argument(
        "--kv-budget-mb", type=float, default=None, metavar="MB", help="bound the KV caches"
    )
    engine.add_argument("--prefill-chunk", type=int, default=None, metavar="N")
    engine.add_argument(
        "--prefix-cache-mb", type=float, default=256, metavar="MB", help="0 turns it off (256)"
    )
    engine.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        metavar="N",
        help="requests queued before new ones are refused with 429 (64)",
    )
    engine.add_argument(
        "--max-body-mb", type=float, default=8, metavar="MB", help="largest request body (8)"
    )
    add_draft_option(engine)  # (requests use it unless they say "draft": false)
    add_cache_options(serve)


def model_id(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    return path.stem if path.suffix == ".gguf" else path.name


def run_serve(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..ops import resolve_kernels
    from ..server import Server, ServerOptions
    from ..server.run import run

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise UsageError(f"--model {args.model}: no such file or directory")
    if args.draft_model is not None:
        check_draft_flag(args)
    for flag in ("max_batch", "max_waiting"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_body_mb <= 0:
        raise UsageError("--max-body-mb must be above 0")
    check_parallel_args(args)
    cache = cache_options(args)
    try:
        resolve_kernels(args.kernels)
        from ..scheduler import EngineOptions

        EngineOptions(
            args.max_batch,
            args.policy,
            args.kv_budget_mb,
            args.prefill_chunk,
            args.prefix_cache_mb,
            cache,
        )
    except ValueError as e:  # in the flags' names
        message = str(e)
        for field in ("max_batch", "policy", "kv_budget_mb", "prefill_chunk", "prefix_cache_mb"):
            if message.startswith(field):
                message = "--" + field.replace("_", "-") + message[len(field) :]
        raise UsageError(message) from None

    if OMP_WAIT_ENV not in os.environ:  # read by libgomp when it loads: start again with it
        os.environ[OMP_WAIT_ENV] = "PASSIVE"
        if sys.argv[1:2] == ["serve"]:  # this process is the command (not main() in a program)
            sys.stdout.flush()  # the same interpreter, flags and entry point; the same process
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

    group = None
    if args.parallel is not None:  # the ranks connect first: only rank 0 serves HTTP
        from ..parallel import init_group

        group = init_group()

    def load() -> Engine:
        from ..loading import load as load_model

        model, tokenizer = load_model(
            args.model,
            compute=args.compute,
            kernels=args.kernels,
            parallel=args.parallel,
            group=group,
            pipeline_split=args.pipeline_split,
        )
        draft = None
        if args.draft_model is not None:
            draft = open_draft(args, model, tokenizer)
        return Engine(
            model,
            tokenizer,
            max_batch=args.max_batch,
            policy=args.policy,
            kv_budget_mb=args.kv_budget_mb,
            prefill_chunk=args.prefill_chunk,
            prefix_cache_mb=args.prefix_cache_mb,
            cache=cache,
            draft_model=draft,
        )

    if group is not None and group.rank() > 0:
        return follow(load, group)

    options = ServerOptions(
        model_id=args.model_name or model_id(args.model),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_waiting=args.max_waiting,
    )
    server = Server(options, load)
    split = ""
    if group is not None and group.size() > 1:
        split = f", split over {group.size()} ranks ({args.parallel} parallel)"
    print(
        f"mlxinfer serve: {options.model_id} on http://{args.host}:{args.port}{split}", flush=True
    )
    code = run(server, args.host, args.port)
    if server.error is not None:
        print(f"mlxinfer serve: error: {server.error}", flush=True)
    return code


def follow(load, group) -> int:
    """A rank other than 0: load this rank's part and run rank 0's steps until it closes the
    engine (see follow_engine); a model that cannot be loaded exits 1."""
    try:
        engine = load()
    except (FileNotFoundError, ValueError) as e:
        label = f"mlxinfer serve: rank {group.rank()} of {group.size()}"
        print(f"{label}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return follow_engine(engine, "serve", interrupt_ends=True)


def follow_engine(engine, command: str, interrupt_ends: bool) -> int:
    """A rank other than 0 of a split model: run the steps rank 0 plans until it closes the engine
    (exit 0, or 130 after Ctrl-C). SIGTERM (and Ctrl-C if `interrupt_ends`; chat's rank 0 takes
    Ctrl-C to stop a reply, so its other ranks ignore it) gives rank 0 its drain and
    FOLLOW_AFTER_SIGNAL_S more to close the engine, then exits 1; an engine stopped by a lost rank
    exits 1 at once (its thread may be stuck in MLX for good, so no orderly exit)."""
    import signal
    import time

    from ..server.run import DRAIN_S

    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, _: signals.append(number))
    if interrupt_ends:
        signal.signal(signal.SIGINT, lambda number, _: signals.append(number))
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = engine._worker.link
    label = f"mlxinfer {command}: rank {link.rank} of {link.size}"
    deadline = None
    while True:
        try:
            engine.wait(timeout=0.5)
            break
        except TimeoutError:
            pass
        except RuntimeError as e:
            print(f"{label}: {e}", file=sys.stderr, flush=True)
            sys.stderr.flush()
            os._exit(1)
        if signals and deadline is None:
            deadline = time.monotonic() + DRAIN_S + FOLLOW_AFTER_SIGNAL_S
        if deadline is not None and time.monotonic() > deadline:
            print(f"{label}: rank 0 did not close the engine after the signal", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
    return 130 if signal.SIGINT in signals else 0


FOLLOW_AFTER_SIGNAL_S = 10.0  # beyond rank 0's drain
