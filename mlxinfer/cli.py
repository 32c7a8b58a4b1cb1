"""The `mlxinfer` command.

    mlxinfer generate [--model PATH] (--prompt TEXT | --prompt - | --prompt-file PATH) [options]
    mlxinfer chat [--model PATH] [--system TEXT] [options]      an interactive conversation
    mlxinfer env [--json]                                       what a bug report needs
    mlxinfer --version

Every argument is checked before the model loads: a bad one exits with status 2 and one line
that names the flag as typed. A model that cannot be loaded exits 1; Ctrl-C exits 130, keeping
what was generated.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

MAX_CLI_LOGPROBS = 20  # OpenAI's and vLLM's default cap; the Python API allows up to the vocabulary
EXIT_USAGE, EXIT_LOAD, EXIT_INTERRUPTED = 2, 1, 130

SAMPLING_FLAGS = {  # SamplingParams field -> the flag that sets it (for error messages)
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "seed": "--seed",
    "stop": "--stop",
    "max_tokens": "--max-tokens",
    "logprobs": "--logprobs",
}


class UsageError(Exception):
    """A bad argument: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, not a usage block; and a flag it
    does not know is reported as that, with the closest one it knows, whatever argparse made of
    the words around it (`bench --repeats 2` was "argument ACTION: invalid choice: '2'")."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(self._given, namespace)
        unknown = self._unknown_flag(extras)
        if unknown:
            self.error(unknown)
        return namespace, extras

    def error(self, message: str):
        message = self._unknown_flag(getattr(self, "_given", [])) or message
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def _unknown_flag(self, words: list[str]) -> str | None:
        """The first of `words` (before a subcommand) that looks like a flag and is none of this
        parser's, nor the start of one (argparse takes abbreviations), as "unknown flag --x (did
        you mean --y?)"; None when there is none. A flag's value is not taken for a flag."""
        options = self._option_string_actions
        commands = {
            name
            for action in self._actions
            if isinstance(action, argparse._SubParsersAction)
            for name in action.choices
        }
        value_next = False
        for word in words:
            if word == "--" or (word in commands and not value_next):
                break
            if value_next or not word.startswith("-") or word == "-" or _is_number(word):
                value_next = False
                continue
            name, has_value, _ = word.partition("=")
            matches = [name] if name in options else [o for o in options if o.startswith(name)]
            if matches:  # known, or an abbreviation (argparse says if it is ambiguous)
                action = options[matches[0]]
                value_next = len(matches) == 1 and action.nargs != 0 and not has_value
                continue
            close = difflib.get_close_matches(name, [o for o in options if o.startswith("--")], 1)
            return f"unknown flag {name}" + (f" (did you mean {close[0]}?)" if close else "")
        return None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def version_string() -> str:
    return (
        f"mlxinfer {_version('mlxinfer')} (MLX {_version('mlx')}, Python {sys.version.split()[0]})"
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- arguments ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlxinfer", description="LLM inference on MLX")
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
    _add_model_options(gen)
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
    _add_sampling_options(gen)
    _add_cache_options(gen)
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
    _add_model_options(chat)
    chat.add_argument("--system", metavar="TEXT", help="a system message for the conversation")
    chat.add_argument(
        "--json",
        action="store_true",
        help="print each reply as one JSON line {text, finish_reason, metrics} (for scripts)",
    )
    _add_sampling_options(chat)
    _add_cache_options(chat)

    env = commands.add_parser(
        "env", help="versions, device, BLAS and the default model, for bug reports"
    )
    env.add_argument("--json", action="store_true", help="as one JSON object")

    from .bench.command import add_parser as add_bench_parser

    add_bench_parser(commands)

    dashboard = commands.add_parser(
        "dashboard", help="the web dashboard: chat, sweeps, results, metrics",
        description="Start the Streamlit dashboard on this machine and print its address.",
    )  # fmt: skip
    dashboard.add_argument("--model", metavar="PATH",
                           help="the model preselected (default: the default model)")  # fmt: skip
    dashboard.add_argument("--port", type=int, default=8501, metavar="N", help="default 8501")
    dashboard.add_argument("--host", default="localhost", metavar="ADDRESS",
                           help="address to listen on (default localhost; 0.0.0.0 for all)")  # fmt: skip
    dashboard.add_argument("--db", metavar="PATH", help="the runs database (default: "
                           "MLXINFER_DB, else ~/.local/share/mlxinfer/runs.sqlite)")  # fmt: skip
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="a Hugging Face / MLX model directory or a .gguf file (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--compute",
        choices=["auto", "float32", "native"],
        default="auto",
        help="weights as stored (native) or float32; auto: float32 on the CPU, native on a GPU",
    )
    parser.add_argument(
        "--kernels",
        choices=["auto", "cpu", "mlx"],
        default="auto",
        help="op set: MLX's fast ops (mlx, what a Mac runs) or CPU-tuned kernels (cpu); "
        "auto: $MLXINFER_KERNELS, else cpu on the CPU and mlx on a GPU",
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling (default: greedy)")
    sampling.add_argument(
        "--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)"
    )
    sampling.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    sampling.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    sampling.add_argument("--min-p", type=float, default=0.0, metavar="P", help="0 = off")
    sampling.add_argument(
        "--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off"
    )
    sampling.add_argument("--presence-penalty", type=float, default=0.0, metavar="X")
    sampling.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X")
    sampling.add_argument("--seed", type=int, default=None, metavar="S")
    sampling.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="a stop string (repeat for several)",
    )
    sampling.add_argument("--ignore-eos", action="store_true", help="generate exactly max tokens")


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    kv = parser.add_argument_group("KV cache (default: growing, float)")
    kv.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        metavar="N",
        help="bound the cache to N tokens per layer (rotating; keeps --kv-keep sink tokens)",
    )
    kv.add_argument(
        "--kv-keep",
        type=int,
        default=None,
        metavar="K",
        help="sink tokens a bounded cache keeps (4)",
    )
    kv.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the cache")
    kv.add_argument(
        "--kv-group-size",
        type=int,
        choices=[32, 64, 128],
        default=None,
        help="quantization group (64)",
    )


def sampling_params(args: argparse.Namespace, logprobs: int = 0):
    """SamplingParams from the flags; a bad value is a UsageError naming the flag."""
    from .sampling import SamplingParams

    try:
        return SamplingParams(
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
            logprobs=logprobs,
        )
    except ValueError as e:
        message = str(e)
        for field, flag in SAMPLING_FLAGS.items():
            if message.startswith(field):
                message = flag + message[len(field) :]
                break
        raise UsageError(message) from None


def cache_options(args: argparse.Namespace) -> dict:
    """The KV cache keyword arguments of stream_generate, checked flag by flag."""
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise UsageError(f"--max-kv-size must be a positive integer, got {args.max_kv_size}")
    if args.kv_keep is not None:
        if args.max_kv_size is None:
            raise UsageError(
                "--kv-keep needs --max-kv-size (it is the bounded cache's sink tokens)"
            )
        if args.kv_keep < 0:
            raise UsageError(f"--kv-keep must be >= 0, got {args.kv_keep}")
    keep = 4 if args.kv_keep is None else args.kv_keep
    if args.max_kv_size is not None and args.max_kv_size <= keep:
        raise UsageError(
            f"--max-kv-size ({args.max_kv_size}) must be larger than --kv-keep ({keep}), the sink "
            "tokens it always keeps"
        )
    if args.kv_group_size is not None and args.kv_bits is None:
        raise UsageError("--kv-group-size needs --kv-bits (it is the quantization group)")
    return {
        "max_kv_size": args.max_kv_size,
        "kv_keep": keep,
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size or 64,
    }


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


def check_text(text: str, what: str) -> None:
    """generate.check_utf8, as a usage error: checked before the model loads."""
    from .generate import check_utf8

    try:
        check_utf8(text, what)
    except ValueError as e:
        raise UsageError(str(e)) from None


# -- generate -------------------------------------------------------------------------------------


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
    if args.command in ("generate", "chat") or (
        args.command == "bench" and args.bench_command is None
    ):
        from . import engine, loading  # noqa: F401
    elif args.command == "env":
        import mlx.core  # noqa: F401
    from . import _exit_on_ctrl_c

    if signal.getsignal(signal.SIGINT) is _exit_on_ctrl_c:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_command(args: argparse.Namespace) -> int:
    """The command `args` names; a UsageError is one line on stderr and exit status 2."""
    try:
        if args.command == "env":
            return run_env(args)
        if args.command == "chat":
            from .chat import run_chat

            return run_chat(args)
        if args.command == "dashboard":
            return run_dashboard(args)
        if args.command == "bench":
            from .bench.command import run as run_bench

            try:
                return run_bench(args)
            except ValueError as e:  # a bad flag, value, sweep file or database: nothing ran
                raise UsageError(str(e)) from None
        return run_generate(args)
    except UsageError as e:
        print(f"mlxinfer {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


DASHBOARD_APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def run_dashboard(args: argparse.Namespace) -> int:
    """`streamlit run dashboard/app.py` with the model and database chosen, in the foreground."""
    import signal
    import subprocess

    from .bench.db import DB_ENV, RunsDB

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise UsageError(f"--model {args.model}: no such file or directory")
    if not DASHBOARD_APP.is_file():
        raise UsageError(
            f"the dashboard is not installed ({DASHBOARD_APP} is missing): it comes with the "
            "source checkout; install mlxinfer with `pip install -e .` from a clone"
        )
    env = dict(os.environ)
    if args.db is not None:
        env[DB_ENV] = str(Path(args.db).expanduser().resolve())
    try:
        RunsDB(env.get(DB_ENV)).close()  # a path that cannot hold the database fails here
    except (ValueError, OSError) as e:
        raise UsageError(f"runs database: {e}") from None
    if args.model is not None:
        env["MLXINFER_MODEL"] = str(Path(args.model).expanduser().resolve())
    command = [
        sys.executable, "-m", "streamlit", "run", str(DASHBOARD_APP),
        "--server.port", str(args.port), "--server.address", args.host,
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer",
        "--client.showErrorDetails", "type",
    ]  # fmt: skip
    print(f"mlxinfer dashboard: http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGTERM, lambda number, frame: process.terminate())  # pass it on
    try:
        return process.wait()
    except KeyboardInterrupt:  # the child got the Ctrl-C too
        process.wait()
        return EXIT_INTERRUPTED


def check_generate_args(args: argparse.Namespace) -> tuple[str, object, dict]:
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


def load_model(args: argparse.Namespace):
    """(model, tokenizer), or None after printing one line for a model that cannot be loaded."""
    from .loading import load
    from .ops import resolve_kernels

    try:
        resolve_kernels(args.kernels)
    except ValueError as e:  # MLXINFER_KERNELS set to something else than cpu or mlx
        raise UsageError(str(e)) from None
    try:
        return load(args.model, compute=args.compute, kernels=args.kernels)
    except (FileNotFoundError, ValueError) as e:  # ModelLoadError is a ValueError
        print(f"mlxinfer {args.command}: error: {e}", file=sys.stderr)
        return None


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
    from .backend import blas_status
    from .generate import stream_generate

    request = conversation(tokenizer, prompt, args)
    progress = PrefillProgress()
    pieces, responses = [], []
    stream = stream_generate(
        model, tokenizer, request, sampling=sampling, prefill_progress=progress, **cache
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
            "max_kv_size": cache["max_kv_size"],
            "keep": cache["kv_keep"] if cache["max_kv_size"] else None,
            "bits": cache["kv_bits"],
            "group_size": cache["kv_group_size"] if cache["kv_bits"] else None,
        },
        "blas": blas,
    }
    if args.logprobs:
        result["logprobs"] = [
            {"token": r.token, "logprob": r.logprobs.logprob, "top": r.logprobs.top}
            for r in responses
        ]
    print(json.dumps(result), flush=True)


class PrefillProgress:
    """Shows how far a long prefill has got on stderr, when stderr is a terminal and the prefill
    has taken more than `after_s` seconds; `clear()` erases the line when the first token comes."""

    def __init__(self, after_s: float = 1.0, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.after_s = after_s
        self.shown = False
        self.enabled = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        if not self.enabled or elapsed < self.after_s:
            return
        rate = done / elapsed
        left = (total - done) / rate if rate > 0 else 0.0
        self.stream.write(
            f"\r\x1b[Kprefill: {done}/{total} prompt tokens ({100 * done // total}%), "
            f"{rate:.0f} tok/s, ~{left:.0f} s left"
        )
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


# -- env ------------------------------------------------------------------------------------------


def environment() -> dict:
    """What a bug report needs: versions, device and backend, BLAS, the gemv shim, the compiler,
    and where the default model is."""
    import platform

    import mlx.core as mx

    from .backend import (
        blas_status,
        c_compiler,
        cpu_features,
        cpu_name,
        gemv_kernel_summary,
        gemv_shim_status,
        prefill_kernel_summary,
        resolve_compute_policy,
    )
    from .loading import DEFAULT_MODEL_INSTALL, default_model_path

    try:
        default_model = str(default_model_path())
    except FileNotFoundError:
        default_model = f"not installed ({DEFAULT_MODEL_INSTALL})"
    return {
        "mlxinfer": _version("mlxinfer"),
        "mlx": mx.__version__,
        "mlx-lm": _version("mlx-lm"),
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "cpu features": cpu_features() or "unknown",
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "compute policy (auto)": resolve_compute_policy("auto"),
        "kernels (auto)": _auto_kernels(),
        "blas": blas_status(),
        "gemv shim": gemv_shim_status(),
        "gemv kernel": gemv_kernel_summary(),
        "prefill kernels": prefill_kernel_summary(),
        "c compiler": c_compiler() or "none found",
        "default model": default_model,
    }


def _auto_kernels() -> str:
    """The op set "auto" picks, and whether the environment chose it (or is invalid)."""
    from .ops import KERNELS_ENV, resolve_kernels

    try:
        chosen = resolve_kernels("auto")
    except ValueError as e:
        return f"error: {e}"
    return f"{chosen} (from ${KERNELS_ENV})" if os.environ.get(KERNELS_ENV) else chosen


def run_env(args: argparse.Namespace) -> int:
    facts = environment()
    if args.json:
        print(json.dumps(facts))
    else:
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            print(f"{key + ':':{width + 1}} {value}")
    return 0
