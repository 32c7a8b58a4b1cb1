"""The decoder-only transformer: tokens -> embeddings -> blocks -> final norm -> LM head -> logits.

Module names equal Hugging Face weight names (`model.layers.0.self_attn.q_proj.weight`), so loading
a checkpoint is a plain dict update.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import Attention
from .cache import CacheSpec, KVCache, RotatingKVCache, cache_spec, make_cache
from .config import ModelConfig
from .mlp import SwiGLU
from .moe import SparseMoE
from .norms import rms_norm
from .ops import op_set, softcap
from .rope import RoPE, local_rope

Cache = KVCache | RotatingKVCache


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)). Layer `index` picks its attention
    window and whether its MLP is dense or mixture-of-experts.

    Gemma's blocks norm each output too: h = x + norm(attn(norm(x))), then
    h + norm(mlp(norm(h))). Its names follow transformers': `post_attention_layernorm` is then the
    norm after attention, and `pre_feedforward_layernorm` the one before the MLP."""

    def __init__(self, config: ModelConfig, rope: RoPE, index: int):
        super().__init__()
        D = config.hidden_size
        self.input_layernorm = rms_norm(config, D)
        self.self_attn = Attention(config, rope, window=config.layer_windows[index])
        self.post_attention_layernorm = rms_norm(config, D)
        self.sandwich = config.gemma_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = rms_norm(config, D)
            self.post_feedforward_layernorm = rms_norm(config, D)
        self.mlp = SparseMoE(config) if config.layer_moe[index] else SwiGLU(config)

    def __call__(self, x: mx.array, cache: Cache | None, masks: dict | None = None) -> mx.array:
        return self.parts(x, cache, masks)[0]

    def parts(
        self, x: mx.array, cache: Cache | None, masks: dict | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(output, the attention's input, the MLP's input): the block's result and the two
        normed activations that looking inside it needs (inspect.trace)."""
        attention_in = self.input_layernorm(x)
        attended = self.self_attn(attention_in, cache, masks)
        if self.sandwich:
            h = x + self.post_attention_layernorm(attended)
            mlp_in = self.pre_feedforward_layernorm(h)
            return h + self.post_feedforward_layernorm(self.mlp(mlp_in)), attention_in, mlp_in
        h = x + attended
        mlp_in = self.post_attention_layernorm(h)
        return h + self.mlp(mlp_in), attention_in, mlp_in


class DecoderStack(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, blocks and the final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rope = RoPE(config)  # shared: every layer rotates by the same positions
        local = local_rope(config) or rope  # sliding-window layers' own (Gemma 3)
        self.layers = [
            TransformerBlock(config, rope if config.layer_windows[i] is None else local, i)
            for i in range(config.num_hidden_layers)
        ]
        self.norm = rms_norm(config, config.hidden_size)


class Model(nn.Module):
    """`logits = model(tokens, cache=None)`: tokens `[B, T]` -> logits `[B, T, vocab]`."""

    def __init__(self, config: ModelConfig, kernels: str = "auto"):
        super().__init__()
        self.config = config  # this rank's part, when split over ranks (parallel.py)
        self.whole_config = config  # the whole model's (load() sets it on a split model)
        self.compute_policy = "native"  # set by load(): "native" or "float32"
        self.group: mx.distributed.Group | None = None  # tensor parallel's ranks (set_group)
        self.pipeline: mx.distributed.Group | None = None  # pipeline's ranks (set_pipeline)
        self.model = DecoderStack(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str) -> None:
        """Choose the op set: "mlx" (MLX's fast ops, what a Mac runs), "cpu" (the CPU-tuned
        kernels), or "auto" (MLXINFER_KERNELS if set, else "cpu" on the CPU, "mlx" elsewhere)."""
        ops = op_set(kernels)
        self.kernels = ops.name
        for _, module in self.named_modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def set_group(self, group: mx.distributed.Group | None) -> None:
        """Tensor parallel (parallel.py): each block's attention and MLP sum their ranks' partial
        outputs over `group`; None runs alone."""
        self.group = group
        for layer in self.model.layers:
            layer.self_attn.group = group
            layer.mlp.group = group  # SwiGLU or SparseMoE (whose shared expert is inside its sum)

    @property
    def ranks(self) -> mx.distributed.Group | None:
        """The group this model is split over (tensor or pipeline parallel), or None."""
        return self.group if self.group is not None else self.pipeline

    def set_pipeline(self, group: mx.distributed.Group | None) -> None:
        """Pipeline parallel (parallel.py): this model holds one stage's blocks; hidden_states
        receives the previous stage's output, sends its own on, and ends with the last stage's."""
        self.pipeline = group

    def __call__(self, tokens: mx.array, cache: list[Cache] | None = None) -> mx.array:
        return self.logits(self.hidden_states(tokens, cache))

    def hidden_states(
        self, tokens: mx.array, cache: list[Cache] | None = None, last_stage: bool = True
    ) -> mx.array:
        """Final-norm hidden states `[B, T, D]`; prefill uses this to skip the LM head on all but
        the last position. Without a cache, `tokens` are positions 0..T-1. Looking inside walks
        the same blocks one at a time: `walk`.

        In a pipeline, `last_stage=False` (a prompt chunk whose output nobody needs: only the
        caches) stops after this stage's blocks and their send to the next stage, without the
        final all_sum that waits for the last stage: evaluated, it returns once the next stage has
        the activations, so this stage can start the next chunk while the next one computes."""
        h = self.embed(tokens)  # [B, T, D]
        group = self.pipeline
        if group is not None and group.rank() > 0:  # a later stage: the previous one's output
            h = mx.distributed.recv_like(h, group.rank() - 1, group=group)
        layer_caches = cache if cache is not None else [None] * len(self.model.layers)
        masks: dict = {}  # one attention mask per distinct (cache state, window), shared by layers
        for layer, layer_cache in zip(self.model.layers, layer_caches, strict=True):
            h = layer(h, layer_cache, masks)
        if group is not None and not last_stage:
            if group.rank() < group.size() - 1:
                h = mx.distributed.send(h, group.rank() + 1, group=group)
            return h  # (not normed: nothing reads it but the send)
        if group is not None:
            h = _last_stage(h, group)
        return self.model.norm(h)

    def walk(
        self, tokens: mx.array, cache: list[Cache] | None = None
    ) -> Iterator[tuple[int, TransformerBlock | None, tuple]]:
        """hidden_states a block at a time, for looking inside: yields (-1, None, (embeddings,
        None, None)), then (index, block, (output, attention input, mlp input)) after each block;
        the final norm of the last output is hidden_states'. Nothing is computed until asked for,
        so a caller can run one block per turn of a shared engine (inspect.Tracing)."""
        h = self.embed(tokens)  # [B, T, D]
        yield -1, None, (h, None, None)
        layer_caches = cache if cache is not None else [None] * len(self.model.layers)
        masks: dict = {}
        for index, (layer, layer_cache) in enumerate(
            zip(self.model.layers, layer_caches, strict=True)
        ):
            parts = layer.parts(h, layer_cache, masks)
            h = parts[0]
            yield index, layer, parts

    def embed(self, tokens: mx.array) -> mx.array:
        """Token embeddings `[B, T, D]` in the compute dtype (Gemma: times sqrt(hidden_size), a
        factor rounded to the embeddings' dtype as in transformers)."""
        h = self.model.embed_tokens(tokens)
        if self.config.scale_embeddings:
            h = h * mx.array(self.config.hidden_size**0.5, dtype=h.dtype)
        return h.astype(self.compute_dtype)

    def logits(self, h: mx.array) -> mx.array:
        """LM head: `[B, T, D]` -> `[B, T, vocab]`, through the tied embedding when there is no
        lm_head; soft-capped where the family says (Gemma 2)."""
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.config.final_logit_softcap
        return logits if cap is None else softcap(logits, cap)

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The dtype activations run in: that of the final norm weight (float32 for GGUF models)."""
        return self.model.norm.weight.dtype

    def make_cache(self, cache: CacheSpec | None = None, **options) -> list[Cache]:
        """One KV cache per layer, of the kind `cache` (a CacheSpec) or its fields given as
        keywords (max_kv_size, kv_keep, kv_bits, kv_group_size) say: a rotating cache of the window
        on sliding-window layers; on the others a growing cache, or with `max_kv_size` a rotating
        one that keeps `kv_keep` sink tokens and the latest `max_kv_size - kv_keep`. `kv_bits`
        (8 or 4) stores keys and values quantized in groups of `kv_group_size`."""
        return make_cache(self.config, cache_spec(cache, **options))

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: everything but the embedding table, of which one row
        is read, unless the table is also the (tied) LM head; of each MoE layer's experts, only the
        top-k of them."""
        read = self.nbytes
        if not self.config.tie_word_embeddings:
            read -= _nbytes(self.model.embed_tokens.parameters())
        c = self.config
        for layer in self.model.layers:
            if isinstance(layer.mlp, SparseMoE):
                experts = _nbytes(layer.mlp.switch_mlp.parameters())
                read -= experts * (c.num_experts - c.num_experts_per_tok) // c.num_experts
        return read

    @property
    def nbytes(self) -> int:
        """Bytes of all weights as stored (packed for quantized layers)."""
        return _nbytes(self.parameters())


def _last_stage(h: mx.array, group: mx.distributed.Group) -> mx.array:
    """Every stage ends with the last stage's output: the others send theirs on, then all add
    zeros to the last one's (the zeros computed from what was sent, so the send runs first)."""
    rank, last = group.rank(), group.size() - 1
    if rank < last:
        sent = mx.distributed.send(h, rank + 1, group=group)
        h = mx.where(mx.array(False), sent, mx.zeros_like(sent))  # zeros, NaN-safe, after the send
    return mx.distributed.all_sum(h, group=group)


def _nbytes(tree) -> int:
    """Bytes of the arrays in a tree of parameters."""
    flat = cast(list[tuple[str, mx.array]], tree_flatten(tree))
    return sum(v.nbytes for _, v in flat)
