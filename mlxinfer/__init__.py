"""mlxinfer: an LLM inference engine on MLX.

model, tokenizer = mlxinfer.load()          # the default model, SmolLM2-135M-Instruct
text = mlxinfer.generate(model, tokenizer, "What is the capital of France?", chat=True)
"""

import os
import signal as _signal
import sys


def _exit_on_ctrl_c(number, frame):
    """Ctrl-C while the `mlxinfer` command starts up (this import, the arguments, importing MLX):
    exit 130 at once, as the running command does, with nothing done yet to keep. An exception
    raised here would be unsafe: inside a module's import it is a traceback, in MLX's
    extension an ImportError or an abort, in a weakref callback ignored. cli.main makes Ctrl-C
    a KeyboardInterrupt again when the command begins."""
    os.write(2, b"\n")  # the shell's prompt on a line of its own, after ^C
    os._exit(130)


def _started_as_the_command() -> bool:
    """`mlxinfer ...` or `python -m mlxinfer ...`, not a program that imports the package."""
    if sys.argv[:1] == ["-m"]:  # python -m X, X being found: which, the interpreter's argv says
        argv = sys.orig_argv
        return "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["mlxinfer"]
    script = sys.argv[0] if sys.argv else ""  # the console script: .../bin/mlxinfer
    return os.path.splitext(os.path.basename(script))[0] == "mlxinfer"


if _started_as_the_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _exit_on_ctrl_c)  # (not where the shell left Ctrl-C ignored)
    # Held (blocked) until cli._begin releases it, so that the threads OpenBLAS and MLX start
    # meanwhile hold it too: a Ctrl-C while MLX asks for its compiler then waits instead of
    # being dropped (see cli._probe_mlx_compiler). A held Ctrl-C exits 130 when released.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})

from .backend import load_fast_blas

load_fast_blas()  # before anything imports mlx.core: OpenBLAS must claim the BLAS symbols first

import importlib
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): `import mlxinfer` (and so `mlxinfer --help`,
# `--version`) does not load MLX; `mlxinfer.load` or `from mlxinfer import load` does.
_EXPORTS = {
    "CacheSpec": "cache",
    "Engine": "engine",
    "EngineOptions": "scheduler",
    "GenerationResult": "engine",
    "RequestHandle": "engine",
    "batch_generate": "engine",
    "GenerationResponse": "responses",
    "KVCache": "cache",
    "Model": "model",
    "ModelConfig": "config",
    "ModelLoadError": "config",
    "RequestMetrics": "metrics",
    "RotatingKVCache": "cache",
    "SamplingParams": "sampling",
    "StreamingDetokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "default_model_path": "loading",
    "generate": "generate",
    "generate_tokens": "generate",
    "load": "loading",
    "stream_generate": "generate",
    "TokenLogprobs": "responses",
}

__all__ = [
    "CacheSpec",
    "Engine",
    "EngineOptions",
    "GenerationResult",
    "RequestHandle",
    "batch_generate",
    "GenerationResponse",
    "KVCache",
    "Model",
    "ModelConfig",
    "ModelLoadError",
    "RequestMetrics",
    "RotatingKVCache",
    "SamplingParams",
    "StreamingDetokenizer",
    "Tokenizer",
    "default_model_path",
    "generate",
    "generate_tokens",
    "load",
    "stream_generate",
    "TokenLogprobs",
]

if TYPE_CHECKING:  # what type checkers and editors see: the names as if imported eagerly
    from .cache import CacheSpec, KVCache, RotatingKVCache
    from .config import ModelConfig, ModelLoadError
    from .engine import Engine, GenerationResult, RequestHandle, batch_generate
    from .generate import (
        GenerationResponse,
        TokenLogprobs,
        generate,
        generate_tokens,
        stream_generate,
    )
    from .loading import default_model_path, load
    from .metrics import RequestMetrics
    from .model import Model
    from .sampling import SamplingParams
    from .scheduler import EngineOptions
    from .tokenizer import StreamingDetokenizer, Tokenizer


def __getattr__(name: str) -> Any:
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{submodule}", __name__), name)
    globals()[name] = value  # once: later look-ups no longer reach __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """`mlxinfer.generate` is the function, as when the API was imported eagerly, even after
    something imports the submodule `mlxinfer.generate`: the import system then binds the
    submodule on the package, which would hide the function. That binding is skipped; the
    submodule stays in sys.modules, where `import mlxinfer.generate` finds it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
