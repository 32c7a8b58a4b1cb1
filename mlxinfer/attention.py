"""Causal self-attention with MHA, MQA and GQA through one path: the number of KV heads decides,
and the op set's attention (mx.fast.scaled_dot_product_attention on the "mlx" path) broadcasts KV
heads over their query groups.

A layer with a sliding window (`window`) lets query q see keys k with q - window < k <= q. The
mask comes from the cache, which knows the positions of the keys it returns (a rotating cache
returns them out of order); without a cache it is built from the positions 0..T-1."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, RotatingKVCache
from .config import ModelConfig
from .masks import Mask, causal_mask
from .norms import rms_norm
from .ops import OPS, MLXOps, softcap
from .rope import RoPE


class Attention(nn.Module):
    ops: MLXOps = OPS["mlx"]  # the model's op set, assigned by Model.set_kernels
    group: mx.distributed.Group | None = None  # tensor parallel: its ranks' outputs are summed

    def __init__(self, config: ModelConfig, rope: RoPE, window: int | None = None):
        super().__init__()
        self.window = window  # sliding-window size, or None for full attention
        D, hd = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.scale = config.query_scale or hd**-0.5
        self.softcap = config.attn_logit_softcap
        self.fused = config.fused_qkv
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        if self.fused:
            # Phi-3 stores [q; k; v] stacked along the output dim.
            self.qkv_proj = nn.Linear(D, q_out + 2 * kv_out, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(D, q_out, bias=config.qkv_bias)
            self.k_proj = nn.Linear(D, kv_out, bias=config.qkv_bias)
            self.v_proj = nn.Linear(D, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, D, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = rms_norm(config, hd)
            self.k_norm = rms_norm(config, hd)
        self.qk_norm = config.qk_norm
        self.rope = rope  # one module shared by all layers: its cos/sin table is built once a pass

    def __call__(
        self,
        x: mx.array,
        cache: KVCache | RotatingKVCache | None = None,
        masks: dict[tuple, Mask] | None = None,
    ) -> mx.array:
        """`masks` is shared by the layers of one forward pass, so each distinct mask is built once."""
        B, T, _ = x.shape  # x: [B, T, D]
        offset = cache.offset if cache is not None else 0
        q, k, v = self.project(x, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, KV, S, hd], or quantized tuples
            mask = _shared(masks, cache.mask_key(T, self.window), cache.make_mask, T, self.window)
        else:
            mask = _shared(masks, ("none", T, self.window), causal_mask, T, T, self.window)

        if self.softcap is not None:
            if cache is not None and cache.bits is not None:  # (packed, scales, biases)
                k = mx.dequantize(*k, group_size=cache.group_size, bits=cache.bits)
                v = mx.dequantize(*v, group_size=cache.group_size, bits=cache.bits)
            out = self.ops.softcapped_attention(q, k, v, self.scale, self.softcap, mask)
        elif cache is not None and cache.bits is not None:  # k, v: (packed, scales, biases)
            out = self.ops.quantized_attention(
                q, k, v, self.scale, mask, cache.group_size, cache.bits
            )
        else:
            out = self.ops.attention(q, k, v, self.scale, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, H * hd]
        out = self.o_proj(out)  # [B, T, D]
        if self.group is not None:  # each rank's heads: a partial sum of o_proj
            out = mx.distributed.all_sum(out, group=self.group)
        return out

    def project(self, x: mx.array, offset) -> tuple[mx.array, mx.array, mx.array]:
        """Queries `[B, H, T, hd]`, keys and values `[B, KV, T, hd]` of `x` `[B, T, D]` at
        positions offset.., normed (q/k norm) and rotated."""
        B, T, _ = x.shape
        if self.fused:
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), [q_out, q_out + kv_out], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(0, 2, 1, 3)  # [B, H, T, hd]
        k = k.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
        v = v.transpose(0, 2, 1, 3)
        return self.rope(q, offset), self.rope(k, offset), v

    def probabilities(self, x: mx.array) -> mx.array:
        """The attention probabilities of a whole sequence `x` `[B, T, D]` (positions 0..T-1, no
        cache): `[B, H, T, T]` float32, each row softmaxed over the keys the model lets that query
        see (causal, and this layer's sliding window). For looking inside the model; generation
        never calls it (the fused kernels never form these)."""
        T = x.shape[1]
        q, k, _ = self.project(x, 0)
        groups = self.n_heads // self.n_kv_heads  # GQA / MQA: each KV head serves a group
        k = mx.repeat(k, groups, axis=1) if groups > 1 else k
        scores = (q.astype(mx.float32) * self.scale) @ k.astype(mx.float32).transpose(0, 1, 3, 2)
        if self.softcap is not None:
            scores = softcap(scores, self.softcap)
        positions = mx.arange(T)
        visible = positions[None, :] <= positions[:, None]
        if self.window is not None:
            visible = visible & (positions[:, None] - positions[None, :] < self.window)
        scores = mx.where(visible, scores, -mx.inf)
        return mx.softmax(scores, axis=-1, precise=True)


def _shared(masks: dict | None, key: tuple, build, *args) -> Mask:
    if masks is None:
        return build(*args)
    if key not in masks:
        masks[key] = build(*args)
    return masks[key]
