"""What the commands share: the parser (one-line usage errors naming the flag), the model,
sampling and cache flags and their checks, loading a model, and the prefill progress line."""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cache import CacheSpec
    from ..sampling import SamplingParams

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
    "num_draft": "--num-draft",
    "lookup_ngram": "--lookup-ngram",
}


class UsageError(Exception):
    """A bad argument: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
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
    return f"mlxinfer {package_version('mlxinfer')} (MLX {package_version('mlx')}, Python {sys.version.split()[0]})"


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def add_model_options(parser: argparse.ArgumentParser) -> None:
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


def add_parallel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parallel",
        choices=["tensor", "pipeline"],
        default=None,
        help="split the model over the ranks `mlx.launch` started (MLX's distributed group): "
        "tensor = each rank holds a slice of every layer, pipeline = a run of layers; the text is "
        "printed by rank 0",
    )
    parser.add_argument(
        "--pipeline-split",
        type=_block_counts,
        default=None,
        metavar="N,N,...",
        help="with --parallel pipeline: blocks per rank, in rank order (default: even)",
    )


def check_parallel_args(args: argparse.Namespace) -> None:
    if getattr(args, "pipeline_split", None) is not None and args.parallel != "pipeline":
        raise UsageError("--pipeline-split is for --parallel pipeline")


def _block_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected block counts separated by commas, e.g. 20,10; got {text!r}"
        ) from None


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
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
    spec = parser.add_argument_group(
        "speculative decoding (the same tokens, or the same distribution, faster where the "
        "reply copies the prompt)"
    )
    spec.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="propose what followed the context's latest n-gram where it appeared before",
    )
    add_draft_option(spec)
    spec.add_argument(
        "--num-draft",
        type=int,
        default=4,
        metavar="N",
        help="tokens proposed a step (4, at most 8)",
    )
    spec.add_argument(
        "--lookup-ngram",
        type=int,
        default=3,
        metavar="N",
        help="the longest n-gram prompt lookup matches (3; it needs at least 2, or 1 if N is 1)",
    )


def add_draft_option(group) -> None:
    group.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH",
        help="a smaller model sharing the tokenizer proposes the tokens (loaded as --model is)",
    )


def add_cache_options(parser: argparse.ArgumentParser) -> None:
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


def sampling_params(args: argparse.Namespace, logprobs: int = 0) -> SamplingParams:
    """SamplingParams from the flags; a bad value is a UsageError naming the flag."""
    from ..sampling import SamplingParams

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
            speculation=speculation(args),
            num_draft=args.num_draft,
            lookup_ngram=args.lookup_ngram,
        )
    except ValueError as e:
        message = str(e)
        for field, flag in SAMPLING_FLAGS.items():
            if message.startswith(field):
                message = flag + message[len(field) :]
                break
        raise UsageError(message) from None


def speculation(args: argparse.Namespace) -> str | None:
    """SamplingParams.speculation from --prompt-lookup and --draft-model."""
    if args.prompt_lookup and args.draft_model is not None:
        raise UsageError("--prompt-lookup and --draft-model: choose one proposer")
    if args.draft_model is not None:
        check_draft_flag(args)
        return "draft"
    return "prompt-lookup" if args.prompt_lookup else None


def check_draft_flag(args: argparse.Namespace) -> None:
    """--draft-model, before anything loads: a path that exists, and no --parallel."""
    if not Path(args.draft_model).expanduser().exists():
        raise UsageError(f"--draft-model {args.draft_model}: no such file or directory")
    if getattr(args, "parallel", None) is not None:
        raise UsageError("--draft-model with --parallel is not supported yet")


def load_draft(args: argparse.Namespace, model, tokenizer):
    """The draft model --draft-model names (None without one), loaded with the model's compute
    policy and op set; None after printing one line when it cannot be loaded or cannot propose
    for `model` (another vocabulary, another tokenizer)."""
    if getattr(args, "draft_model", None) is None:
        return None
    try:
        return open_draft(args, model, tokenizer)
    except ValueError as e:
        print(f"mlxinfer {args.command}: error: {e}", file=sys.stderr)
        return False


def open_draft(args: argparse.Namespace, model, tokenizer, **load_options):
    """Load --draft-model as the model was loaded (its compute policy and op set) and check it
    can propose for `model`: the same tokenizer (a probe text encoded alike) and every token id
    in its vocabulary. ValueError naming the flag and the path otherwise."""
    from ..loading import load
    from ..speculative import check_draft_pair

    where = f"--draft-model {args.draft_model}"
    try:
        draft, draft_tokenizer = load(
            args.draft_model, compute=args.compute, kernels=args.kernels, **load_options
        )
        check_draft_pair(model, tokenizer, draft, draft_tokenizer)
    except (FileNotFoundError, ValueError) as e:  # ModelLoadError is a ValueError
        raise ValueError(f"{where}: {e}") from None
    return draft


def cache_options(args: argparse.Namespace) -> CacheSpec:
    """The KV cache the flags ask for (a CacheSpec, whose own checks run here, before the model
    loads, in the flags' names), and flags that would have no effect."""
    from ..cache import CacheSpec

    if args.kv_keep is not None and args.max_kv_size is None:
        raise UsageError("--kv-keep needs --max-kv-size (it is the bounded cache's sink tokens)")
    if args.kv_group_size is not None and args.kv_bits is None:
        raise UsageError("--kv-group-size needs --kv-bits (it is the quantization group)")
    try:
        return CacheSpec(
            max_kv_size=args.max_kv_size,
            kv_keep=4 if args.kv_keep is None else args.kv_keep,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size or 64,
        )
    except ValueError as e:
        message = str(e)
        for field in ("max_kv_size", "kv_keep", "kv_bits", "kv_group_size"):
            message = message.replace(field, "--" + field.replace("_", "-"))
        raise UsageError(message) from None


def check_text(text: str, what: str) -> None:
    """generate.check_utf8, as a usage error: checked before the model loads."""
    from ..generate import check_utf8

    try:
        check_utf8(text, what)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_model(args: argparse.Namespace):
    """(model, tokenizer), or None after printing one line for a model that cannot be loaded."""
    from ..loading import load
    from ..ops import resolve_kernels

    try:
        resolve_kernels(args.kernels)
    except ValueError as e:  # MLXINFER_KERNELS set to something else than cpu or mlx
        raise UsageError(str(e)) from None
    check_parallel_args(args)
    try:
        parallel = getattr(args, "parallel", None)
        split = getattr(args, "pipeline_split", None)
        return load(
            args.model,
            compute=args.compute,
            kernels=args.kernels,
            parallel=parallel,
            pipeline_split=split,
        )
    except (FileNotFoundError, ValueError) as e:  # ModelLoadError is a ValueError
        print(f"mlxinfer {args.command}: error: {e}", file=sys.stderr)
        return None


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
