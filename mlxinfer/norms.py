"""RMSNorm in the two conventions checkpoints use: `x / rms(x) * weight` (Llama and most), and
Gemma's `x / rms(x) * (1 + weight)`, computed in float32 and cast back as transformers does
(its weights start at zero, and 1 + weight in bfloat16 would round away their low bits)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .ops import OPS, MLXOps


class RMSNorm(nn.Module):
    """`x / rms(x) * weight` through the model's op set (mx.fast.rms_norm, or on the CPU, where
    that is several ops, a compiled one: cpu_kernels.rms_norm)."""

    ops: MLXOps = OPS["mlx"]  # the model's op set, assigned by Model.set_kernels

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def __call__(self, x: mx.array) -> mx.array:
        return self.ops.rms_norm(x, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__(dims, eps)
        self.weight = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return self.ops.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


def rms_norm(config: ModelConfig, dims: int) -> RMSNorm:
    """The family's RMSNorm over the last `dims`."""
    if config.gemma_norms:
        return GemmaRMSNorm(dims, eps=config.rms_norm_eps)
    return RMSNorm(dims, eps=config.rms_norm_eps)
