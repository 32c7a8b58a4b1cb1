"""Mixture of experts: a router picks `top_k` of `num_experts` SwiGLU experts per token and mixes
their outputs by the router weights; Qwen2-MoE adds a shared expert behind a sigmoid gate.

    router logits = x @ gate.T                      [N, E]
    probs = softmax(logits); top-k of them          [N, k] ids and weights (renormalised or not)
    out = sum_j weight_j * expert_{id_j}(x)         gathered matmuls: only the chosen experts' rows

Expert weights are stacked `[E, out, in]` (`switch_mlp.{gate,up,down}_proj`, mlx-lm's layout, which
mlx-community checkpoints use). `mx.gather_mm` / `mx.gather_qmm` multiply each token by the
matrices of its own experts, so a decode step reads k experts' weights, never all E. For many
tokens (prefill) the (token, expert) pairs are sorted by expert first, so each expert's matrix is
read once for all its tokens.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .mlp import SwiGLU
from .ops import OPS, MLXOps

# Sort (token, expert) pairs by expert when there are at least this many (mlx-lm uses 64 too):
# below it the sort costs more than the scattered reads it saves.
SORT_THRESHOLD = 64


def sorted_gather_is_exact() -> bool:
    """Whether gather_mm/gather_qmm may be told the rows are sorted by expert. MLX 0.32.4's CUDA
    kernel returns wrong rows with sorted_indices=True (max error 42 on a top-2-of-8 layer where
    sorted_indices=False is exact, measured on an H100); the CPU and Metal kernels are exact, and
    mlx-lm uses the flag on Metal. Sorting still groups each expert's rows either way."""
    return mx.default_device() == mx.cpu or mx.metal.is_available()


class SwitchLinear(nn.Module):
    """`num_experts` Linear layers stacked as weight `[E, out, in]`; call with the expert of each row."""

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1.0 / in_features)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out_features, in_features))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x [..., 1, in] per (token, expert) pair; weight.T per expert: [E, in, out]
        return mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """Hook for nn.quantize: the quantized twin with this layer's weights."""
        return QuantizedSwitchLinear.from_weight(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with affine-quantized expert weights (packed `weight`, `scales`, `biases` per
    expert), multiplied by mx.gather_qmm without dequantizing."""

    def __init__(self, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode

    @classmethod
    def from_weight(
        cls, weight: mx.array, group_size: int, bits: int, mode: str = "affine"
    ) -> QuantizedSwitchLinear:
        layer = cls(group_size, bits, mode)
        layer.weight, layer.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            layer.biases = biases[0]
        layer.freeze()
        return layer

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )

    def dequantized(self) -> SwitchLinear:
        weight = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            self.group_size,
            self.bits,
            mode=self.mode,
        )
        num_experts, out_features, in_features = weight.shape
        layer = SwitchLinear(in_features, out_features, num_experts)  # its lazy init is replaced
        layer.weight = weight
        return layer


class SwitchGLU(nn.Module):
    """The routed experts: one SwiGLU per expert, stacked."""

    ops: MLXOps = OPS["mlx"]  # the model's op set, assigned by Model.set_kernels

    def __init__(self, hidden_size: int, expert_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, expert_size, num_experts)
        self.up_proj = SwitchLinear(hidden_size, expert_size, num_experts)
        self.down_proj = SwitchLinear(expert_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x `[N, D]`, indices `[N, k]` -> each chosen expert's output `[N, k, D]`."""
        N, k = indices.shape
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            # One row per (token, expert) pair, ordered by expert: gather_mm then reads each
            # expert's matrices once, in one run of rows.
            flat = indices.flatten()
            order = mx.argsort(flat)
            rows = x[order // k][:, None, :]  # [N*k, 1, D]
            idx = flat[order]
        else:
            rows = x[:, None, None, :]  # [N, 1, 1, D], broadcast over the k experts
            idx = indices
        sorted_flag = do_sort and sorted_gather_is_exact()
        gate = self.gate_proj(rows, idx, sorted_indices=sorted_flag)
        up = self.up_proj(rows, idx, sorted_indices=sorted_flag)
        hidden = self.ops.swiglu(gate, up)  # silu(gate) * up
        out = self.down_proj(hidden, idx, sorted_indices=sorted_flag)  # [..., 1, D]
        if do_sort:
            out = out[mx.argsort(order)]  # back to (token, expert) order
        return out.reshape(N, k, -1)


class SparseMoE(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's gated shared expert); same call as SwiGLU."""

    group: mx.distributed.Group | None = None  # tensor parallel: its ranks' outputs are summed

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(D, config.num_experts, bias=False)  # the router
        self.switch_mlp = SwitchGLU(D, config.moe_intermediate_size, config.num_experts)
        if config.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape  # [B, T, D]
        x = x.reshape(-1, shape[-1])  # [N, D]
        indices, weights = self.route(x)
        out = (self.switch_mlp(x, indices) * weights[..., None].astype(x.dtype)).sum(axis=1)
        if "shared_expert" in self:
            out = out + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.group is not None:  # each rank's columns of every expert: one sum for all
            out = mx.distributed.all_sum(out, group=self.group)
        return out.reshape(shape)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Expert ids `[N, k]` and their weights `[N, k]` (float32): softmax over all experts in
        float32, top-k, optionally renormalised (transformers' order for all three families)."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1, precise=True)  # [N, E]
        k = self.top_k
        indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        weights = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return mx.stop_gradient(indices), weights
