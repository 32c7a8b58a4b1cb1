"""mlxinfer: an LLM inference engine on MLX.

model, tokenizer = mlxinfer.load()          # the default model, SmolLM2-135M-Instruct
text = mlxinfer.generate(model, tokenizer, "What is the capital of France?", chat=True)
"""

from .backend import load_fast_blas

load_fast_blas()  # before anything imports mlx.core: OpenBLAS must claim the BLAS symbols first

from .cache import KVCache, RotatingKVCache
from .config import ModelConfig, ModelLoadError
from .generate import GenerationResponse, TokenLogprobs, generate, generate_tokens, stream_generate
from .loading import default_model_path, load
from .metrics import RequestMetrics
from .model import Model
from .sampling import SamplingParams
from .tokenizer import StreamingDetokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
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
