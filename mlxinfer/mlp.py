"""The feed-forward block, a gated MLP: SwiGLU, `down(silu(gate(x)) * up(x))`, or GeGLU (Gemma)
with tanh-approximated GELU in silu's place. `moe.SparseMoE` is the sparse alternative with the
same call signature."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .ops import OPS, MLXOps


class SwiGLU(nn.Module):
    ops: MLXOps = OPS["mlx"]  # the model's op set, assigned by Model.set_kernels
    group: mx.distributed.Group | None = None  # tensor parallel: its ranks' outputs are summed

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        D, bias = config.hidden_size, config.mlp_bias
        F = intermediate_size or config.intermediate_size
        self.fused = config.fused_gate_up
        self.gelu = config.hidden_act == "gelu_tanh"
        if self.fused:
            # Phi-3 stores [gate; up] stacked along the output dim.
            self.gate_up_proj = nn.Linear(D, 2 * F, bias=bias)
        else:
            self.gate_proj = nn.Linear(D, F, bias=bias)
            self.up_proj = nn.Linear(D, F, bias=bias)
        self.down_proj = nn.Linear(F, D, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        if self.fused:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)  # each [B, T, F]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gated = self.ops.geglu(gate, up) if self.gelu else self.ops.swiglu(gate, up)
        out = self.down_proj(gated)  # act(gate) * up
        if self.group is not None:  # each rank's columns of F: a partial sum of down_proj
            out = mx.distributed.all_sum(out, group=self.group)
        return out
