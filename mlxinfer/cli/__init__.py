"""The `mlxinfer` command.

    mlxinfer generate [--model PATH] (--prompt TEXT | --prompt - | --prompt-file PATH) [options]
    mlxinfer chat [--model PATH] [--system TEXT] [options]      an interactive conversation
    mlxinfer serve [--model PATH] [--host ADDRESS] [--port N]   an OpenAI/Anthropic HTTP server
    mlxinfer env [--json]                                       what a bug report needs
    mlxinfer --version

Every argument is checked before the model loads: a bad one exits with status 2 and one line
that names the flag as typed. A model that cannot be loaded exits 1; Ctrl-C exits 130, keeping
what was generated.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .options import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    MAX_CLI_LOGPROBS,
    Parser,
    UsageError,
    add_cache_options,
    add_model_options,
    add_parallel_option,
    add_sampling_options,
    version_string,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlxinfer", description="LLM inference on MLX")
    parser.add_argument("--version", action="version", version=version_string())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate", help="generate text from a prompt", description="Generate text from a prompt."
    )
    source = gen.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt", metavar="TEXT", help="the prompt text; - reads it from standard input"
    )
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    add_model_options(gen)
    add_parallel_option(gen)
    gen.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as is (default: wrapped in the model's chat template when it has one)",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="require the chat template (the default when there is one)",
    )
    gen.add_argument("--system", metavar="TEXT", help="a system message (chat template only)")
    add_sampling_options(gen)
    add_cache_options(gen)
    output = gen.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print text as it is generated")
    output.add_argument(
        "--json",
        action="store_true",
        help="print text and metrics as JSON (with --stream: one JSON line per token, then the result)",
    )
    output.add_argument(
        "--logprobs",
        type=int,
        default=0,
        metavar="N",
        help=f"with --json: the N most likely tokens at each step (0-{MAX_CLI_LOGPROBS})",
    )

    chat = commands.add_parser(
        "chat",
        help="an interactive conversation",
        description="A multi-turn conversation in the terminal; /reset clears the history, /exit "
        "quits. When standard input is not a terminal, each line is one user turn.",
    )
    add_model_options(chat)
    add_parallel_option(chat)
    chat.add_argument("--system", metavar="TEXT", help="a system message for the conversation")
    chat.add_argument(
        "--json",
        action="store_true",
        help="print each reply as one JSON line {text, finish_reason, metrics} (for scripts)",
    )
    add_sampling_options(chat)
    add_cache_options(chat)

    env = commands.add_parser(
        "env", help="versions, device, BLAS and the default model, for bug reports"
    )
    env.add_argument("--json", action="store_true", help="as one JSON object")

    from ..bench.command import add_parser as add_bench_parser
    from .serve import add_parser as add_serve_parser

    add_bench_parser(commands)
    add_serve_parser(commands)

    dashboard = commands.add_parser(
        "dashboard",
        help="the web dashboard: chat, sweeps, results, metrics",
        description="Start the Streamlit dashboard on this machine and print its address.",
    )
    dashboard.add_argument(
        "--model", metavar="PATH", help="the model preselected (default: the default model)"
    )
    dashboard.add_argument("--port", type=int, default=8501, metavar="N", help="default 8501")
    dashboard.add_argument(
        "--host",
        default="localhost",
        metavar="ADDRESS",
        help="address to listen on (default localhost; 0.0.0.0 for all)",
    )
    dashboard.add_argument(
        "--db",
        metavar="PATH",
        help="the runs database (default: MLXINFER_DB, else ~/.local/share/mlxinfer/runs.sqlite)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _begin(args)
        return run_command(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _begin(args: argparse.Namespace) -> None:
    """The end of the command's start-up: the modules a command that runs a model needs are
    imported (MLX, the model, the tokenizer), then Ctrl-C is made a KeyboardInterrupt, which each
    command handles (generate keeps the text so far, a sweep marks its run stopped). Until here
    Ctrl-C exits 130 at once (mlxinfer/__init__.py): an exception raised inside an import can
    turn into another (MLX's extension: an ImportError, or an abort; a class being made: a
    RuntimeError) or be lost (in a weakref callback)."""
    if args.command in ("generate", "chat", "serve") or (
        args.command == "bench" and args.bench_command is None
    ):
        from .. import engine, loading  # noqa: F401
    elif args.command == "env":
        import mlx.core  # noqa: F401
    from .. import _exit_on_ctrl_c

    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()):  # held since the import
        if "mlx.core" in sys.modules:
            _probe_mlx_compiler()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a held Ctrl-C: exits here
    if signal.getsignal(signal.SIGINT) is _exit_on_ctrl_c:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _probe_mlx_compiler() -> None:
    """Have MLX ask now, with Ctrl-C held, whether it can compile. Its CPU backend asks once per
    process, when a compiled function first runs, by `system("g++ --version")`, and system()
    ignores SIGINT until the child ends: a Ctrl-C then was dropped, and the command ran to the end
    with status 0. Held, a Ctrl-C that comes during the probe stays pending (Linux never drops a
    blocked signal; every thread holds it, see mlxinfer/__init__.py) and exits when released.
    One pending before the probe is taken first (unblocking runs its handler), as setting SIGINT
    ignored, which system() does, would discard it. On a GPU MLX runs no probe."""
    import mlx.core as mx

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    mx.compile(_plus_one)(mx.array(0))  # traced, never evaluated: only the probe runs


def _plus_one(x):
    return x + 1


def run_command(args: argparse.Namespace) -> int:
    """The command `args` names; a UsageError is one line on stderr and exit status 2."""
    try:
        if args.command == "env":
            from .env import run_env

            return run_env(args)
        if args.command == "chat":
            from .chat import run_chat

            return run_chat(args)
        if args.command == "serve":
            from .serve import run_serve

            return run_serve(args)
        if args.command == "dashboard":
            from .dashboard import run_dashboard

            return run_dashboard(args)
        if args.command == "bench":
            from ..bench.command import run as run_bench

            try:
                return run_bench(args)
            except ValueError as e:  # a bad flag, value, sweep file or database: nothing ran
                raise UsageError(str(e)) from None
        from .generate import run_generate

        return run_generate(args)
    except UsageError as e:
        print(f"mlxinfer {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
