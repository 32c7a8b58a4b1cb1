"""mlxinfer: an LLM inference engine on MLX.

model, tokenizer = mlxinfer.load()          # the default model, SmolLM2-135M-Instruct
text = mlxinfer.generate(model, tokenizer, "What is the capital of France?", chat=True)
"""

from .cache import KVCache
from .config import ModelConfig, ModelLoadError
from .generate import generate, generate_tokens
from .loading import default_model_path, load
from .model import Model
from .tokenizer import StreamingDetokenizer, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "Model",
    "ModelConfig",
    "ModelLoadError",
    "StreamingDetokenizer",
    "Tokenizer",
    "default_model_path",
    "generate",
    "generate_tokens",
    "load",
]
