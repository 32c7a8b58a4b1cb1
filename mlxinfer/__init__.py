"""mlxinfer: an LLM inference engine on MLX.

model, tokenizer = mlxinfer.load()          # the default model, SmolLM2-135M-Instruct
text = mlxinfer.generate(model, tokenizer, "What is the capital of France?", chat=True)
"""

from .backend import load_fast_blas

load_fast_blas()  # before anything imports mlx.core: OpenBLAS must claim the BLAS symbols first

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): `import mlxinfer` (and so `mlxinfer --help`,
# `--version`) does not load MLX; `mlxinfer.load` or `from mlxinfer import load` does.
_EXPORTS = {
    "Engine": "engine",
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
    "Engine",
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
    from .cache import KVCache, RotatingKVCache
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
