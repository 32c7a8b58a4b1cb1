"""Tensor and pipeline parallelism over mx.distributed.

Tensor parallel: each rank of a group holds a slice of every block and the ranks add their partial
results (Megatron's layout, as mlx-lm's `shard` does):

    attention  q/k/v projections split by heads (column-parallel), o_proj by its input columns
               (row-parallel): each rank attends with its own heads; one all_sum of [B, T, D]
    MLP        gate/up split by columns, down by rows (each expert's, for MoE; the router and the
               shared expert's gate replicated): one all_sum of [B, T, D]
    the rest   embeddings, norms and the LM head replicated: every rank computes the same logits,
               so sampling needs no communication (a vocabulary-split head would need an all_gather
               of [B, vocab] logits a step; on the models this runs, the head is small enough)

Heads go to ranks by KV head, with their query groups, so every rank runs plain GQA: with at least
as many KV heads as ranks, each rank takes a contiguous run of KV heads (runs differ by at most one:
SmolLM2's 3 KV heads on 2 ranks are 2 + 1); with fewer (MQA), each KV head is copied to
ranks / kv_heads ranks, which split its query heads (mlx-lm refuses these models).

Sharding is a rewrite of the stored tensors (Hugging Face names, from safetensors or GGUF) and of
the config, before the model is built (`shard_weights`), so a rank holds only its own slices and
the model code only adds the two all_sums (`Attention.group`, the MLP's `group`).

Pipeline parallel: each rank holds a run of consecutive blocks (`layer_range`: an even split, the
first ranks taking one more) and their KV caches; a forward pass goes rank to rank:

    rank 0: embed -> its blocks -> send h to rank 1      rank r: recv h -> its blocks -> send
    last rank: recv -> its blocks;   then every rank: h = all_sum(the last rank's h, zeros elsewhere)

so every rank ends with the same final hidden states, computes the same logits with its own copy
of the final norm and LM head (replicated, as the embedding), and samples the same token: the
generation code runs unchanged on every rank. Per token: one send of [B, 1, D] per stage boundary
and one all_sum of it.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import os
import random
import re
import secrets
import sys

import mlx.core as mx
import numpy as np

from .config import ModelConfig, ModelLoadError

PARALLEL_MODES = ("tensor", "pipeline")
CONNECT_TIMEOUT_ENV = "MLXINFER_PARALLEL_TIMEOUT"  # seconds the ranks have to find each other
CONNECT_TIMEOUT_S = 60.0


_group: mx.distributed.Group | None = None  # init_group's, once made


def init_group(timeout_s: float | None = None) -> mx.distributed.Group:
    """MLX's distributed group, as `mlx.launch` (or MLX_HOSTFILE and MLX_RANK) describes it; a
    group of one without either. Made once per process: each mx.distributed.init() of the ring
    backend binds its ports and connects anew. MLX's ring backend waits for every rank forever,
    holding the interpreter's lock, so no Python timer can end the wait: faulthandler's watchdog
    thread (plain C) exits the process with status 1 and a traceback ending here if the ranks have
    not connected after `timeout_s` (default $MLXINFER_PARALLEL_TIMEOUT, else 60 s)."""
    global _group
    if _group is None:
        _group = _connect(timeout_s)
    return _group


def _connect(timeout_s: float | None) -> mx.distributed.Group:
    if "MLX_HOSTFILE" not in os.environ and "MLX_RANK" not in os.environ:
        return mx.distributed.init()  # no launcher: a group of one, nothing to wait for
    if timeout_s is None:
        timeout_s = float(os.environ.get(CONNECT_TIMEOUT_ENV) or CONNECT_TIMEOUT_S)
    print(
        f"mlxinfer: rank {os.environ.get('MLX_RANK', '?')} connecting to the other ranks "
        f"({os.environ.get('MLX_HOSTFILE', 'no hostfile')}); this process exits if they have not "
        f"connected within {timeout_s:g} s (${CONNECT_TIMEOUT_ENV})",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        return mx.distributed.init()  # the other ranks did not connect in time: see above
    finally:
        faulthandler.cancel_dump_traceback_later()


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a model is split: `mode` one of PARALLEL_MODES, over `group` (two or more ranks)."""

    mode: str
    group: mx.distributed.Group
    split: tuple[int, ...] | None = None  # pipeline: blocks per rank (None: an even split)


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads [q0, q1) and KV heads [kv0, kv1) of the full model."""

    q0: int
    q1: int
    kv0: int
    kv1: int


def head_shard(config: ModelConfig, rank: int, size: int) -> HeadShard:
    """Which heads rank `rank` of `size` runs (see the module docstring)."""
    H, KV = config.num_attention_heads, config.num_key_value_heads
    groups = H // KV
    if KV >= size:
        kv0, kv1 = _even_range(KV, rank, size)
        return HeadShard(kv0 * groups, kv1 * groups, kv0, kv1)
    if size % KV:
        raise ModelLoadError(
            f"tensor parallelism over {size} ranks: the model has {KV} KV heads, and {size} is "
            f"neither at most {KV} nor a multiple of it"
        )
    copies = size // KV  # ranks sharing each KV head
    kv = rank // copies
    if groups < copies:
        raise ModelLoadError(
            f"tensor parallelism over {size} ranks: KV head {kv} serves {groups} query heads, "
            f"fewer than the {copies} ranks that would share it"
        )
    q0, q1 = _even_range(groups, rank % copies, copies)
    return HeadShard(kv * groups + q0, kv * groups + q1, kv, kv + 1)


def _even_range(n: int, rank: int, size: int, unit: int = 1) -> tuple[int, int]:
    """Rank's part of range(n) split into `size` contiguous runs of whole `unit`s, sizes differing
    by at most one unit (the first runs take the extra)."""
    units = n // unit
    base, extra = divmod(units, size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start * unit, stop * unit


def shard_config(config: ModelConfig, rank: int, size: int, unit: int = 1) -> ModelConfig:
    """The config of one rank's slice: its heads and its share of each MLP's width (split in
    whole `unit`s: a quantized down projection's groups)."""
    heads = head_shard(config, rank, size)

    def width(n: int) -> int:
        start, stop = _even_range(n, rank, size, unit)
        return stop - start

    return dataclasses.replace(
        config,
        num_attention_heads=heads.q1 - heads.q0,
        num_key_value_heads=heads.kv1 - heads.kv0,
        intermediate_size=width(config.intermediate_size),
        moe_intermediate_size=width(config.moe_intermediate_size)
        if config.moe_intermediate_size
        else 0,
        shared_expert_intermediate_size=width(config.shared_expert_intermediate_size)
        if config.shared_expert_intermediate_size
        else 0,
    )


def _width_unit(config: ModelConfig, weights: dict[str, mx.array]) -> int:
    """MLP widths are split in whole quantization groups (a quantized down projection's columns
    are cut between groups), else freely: the largest group of any stored down projection."""
    unit = 1
    for name, scales in weights.items():
        match = re.search(r"mlp\.(shared_expert\.|switch_mlp\.)?down_proj\.scales$", name)
        if match:
            width = _mlp_width(config, match.group(1))
            unit = max(unit, width // scales.shape[-1])
    return unit


def _mlp_width(config: ModelConfig, prefix: str | None) -> int:
    if prefix == "switch_mlp.":
        return config.moe_intermediate_size
    if prefix == "shared_expert.":
        return config.shared_expert_intermediate_size
    return config.intermediate_size


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def shard_weights(
    config: ModelConfig, weights: dict[str, mx.array], rank: int, size: int, source: str
) -> tuple[ModelConfig, dict[str, mx.array]]:
    """Slice stored tensors (Hugging Face names) for rank `rank` of `size`: (its config, its
    tensors). Replicated tensors are passed through; nothing is evaluated here: the model built
    from them holds only this rank's slices."""
    heads = head_shard(config, rank, size)
    hd, unit = config.head_dim, _width_unit(config, weights)
    H, KV = config.num_attention_heads, config.num_key_value_heads
    q_rows = (heads.q0 * hd, heads.q1 * hd)
    kv_rows = (heads.kv0 * hd, heads.kv1 * hd)
    out: dict[str, mx.array] = {}
    for name, tensor in weights.items():
        match = _LAYER.match(name)
        if not match:
            out[name] = tensor  # embeddings, final norm, LM head: replicated
            continue
        part, kind = match.group(2).rsplit(".", 1)
        try:
            out[name] = _shard_tensor(
                part, kind, tensor, config, rank, size, q_rows, kv_rows, (H * hd, KV * hd), unit
            )
        except ValueError as e:
            raise ModelLoadError(f"{source}: {name}: {e}") from None
    return shard_config(config, rank, size, unit), out


def _shard_tensor(part, kind, t, config, rank, size, q_rows, kv_rows, widths, unit):
    """One layer tensor's slice. `part` is its module path within the layer (self_attn.q_proj,
    mlp.switch_mlp.down_proj, ...), `kind` weight / bias / scales / biases."""
    q_width, kv_width = widths
    if part in ("self_attn.q_proj",):
        return _rows(t, *q_rows)
    if part in ("self_attn.k_proj", "self_attn.v_proj"):
        return _rows(t, *kv_rows)
    if part == "self_attn.qkv_proj":  # Phi-3: [q; k; v] stacked along the output rows
        q, k, v = t[:q_width], t[q_width : q_width + kv_width], t[q_width + kv_width :]
        return mx.concatenate([_rows(q, *q_rows), _rows(k, *kv_rows), _rows(v, *kv_rows)])
    if part == "self_attn.o_proj":
        return _columns(t, kind, *q_rows, q_width, rank)
    mlp = re.match(
        r"^mlp\.(shared_expert\.|switch_mlp\.)?(gate_proj|up_proj|down_proj|gate_up_proj)$", part
    )
    if mlp:
        prefix, proj = mlp.groups()
        width = _mlp_width(config, prefix)
        lo, hi = _even_range(width, rank, size, unit)
        axis = 1 if prefix == "switch_mlp." else 0  # experts stacked [E, out, in]
        if proj == "down_proj":
            return _columns(t, kind, lo, hi, width, rank)
        if proj == "gate_up_proj":  # Phi-3: [gate; up] stacked along the output rows
            gate, up = mx.split(t, 2, axis=axis)
            return mx.concatenate([_rows(gate, lo, hi, axis), _rows(up, lo, hi, axis)], axis=axis)
        return _rows(t, lo, hi, axis)
    return t  # norms, q/k norms, the router, the shared expert's gate: replicated


def _rows(t: mx.array, lo: int, hi: int, axis: int = 0) -> mx.array:
    """Output rows lo..hi of a weight, bias, or quantization scales/biases (all indexed by output
    row first, after any experts axis)."""
    index = [slice(None)] * t.ndim
    index[axis] = slice(lo, hi)
    return t[tuple(index)]


def _columns(t: mx.array, kind: str, lo: int, hi: int, in_features: int, rank: int) -> mx.array:
    """Input columns lo..hi (of `in_features`) of a row-parallel layer (o_proj, down_proj). A bias
    is added once in the sum: rank 0 keeps it, the others hold zeros. Quantized (mlx-community or
    GGUF): the packed weight's last axis holds in_features * bits / 32 words and scales/biases one
    entry per group, so lo and hi are scaled by the stored width and must fall between groups."""
    if kind == "bias":
        return t if rank == 0 else mx.zeros_like(t)
    stored = t.shape[-1]
    if stored != in_features:  # packed words, or one scale per group
        per_entry = in_features // stored  # input features per stored entry
        if kind in ("scales", "biases") and (lo % per_entry or hi % per_entry):
            raise ValueError(
                f"columns {lo}..{hi} of this rank cut a quantization group of {per_entry}; use a "
                "number of ranks that splits the layer between groups"
            )
        lo, hi = lo * stored // in_features, hi * stored // in_features
    return t[..., lo:hi]


# The seeds of requests that give none (sampling.Sampler): fresh entropy, until join_group makes it
# one sequence shared by the ranks (each samples from the same logits and must pick the same token:
# the ranks start the same requests in the same order).
_unseeded: random.Random = random.SystemRandom()


def unseeded_seed() -> int:
    """A 32-bit seed for a request that gave none."""
    return _unseeded.getrandbits(32)


def shared_seed(group: mx.distributed.Group) -> int:
    """A random 32-bit seed drawn by rank 0 and known to every rank of `group` (its 4 bytes summed
    in float32 with the other ranks' zeros: exact)."""
    parts = list(secrets.randbits(32).to_bytes(4, "little")) if group.rank() == 0 else [0] * 4
    total = np.array(mx.distributed.all_sum(mx.array(parts, dtype=mx.float32), group=group))
    return int.from_bytes(bytes(int(b) for b in total), "little")


def layer_range(
    layers: int, rank: int, size: int, split: tuple[int, ...] | None = None
) -> tuple[int, int]:
    """The blocks [start, stop) rank `rank` of `size` holds in a pipeline: `split[r]` blocks for
    rank r, or an even split (the first ranks taking one more)."""
    if split is not None:
        check_split(split, layers, size)
        return sum(split[:rank]), sum(split[: rank + 1])
    if layers < size:
        raise ModelLoadError(
            f"pipeline parallelism over {size} ranks: the model has only {layers} layers"
        )
    return _even_range(layers, rank, size)


def check_split(split: tuple[int, ...], layers: int, size: int) -> None:
    """A pipeline split names each rank's block count: one per rank, each at least 1, adding up
    to the model's layers (ModelLoadError naming pipeline_split otherwise)."""
    given = ",".join(str(n) for n in split)
    if len(split) != size:
        raise ModelLoadError(
            f"pipeline_split {given} has {len(split)} parts for {size} ranks; give one per rank"
        )
    if any(n < 1 for n in split) or sum(split) != layers:
        raise ModelLoadError(
            f"pipeline_split {given}: each rank needs at least one block and the parts must add "
            f"up to the model's {layers} layers"
        )


def pipeline_weights(
    config: ModelConfig,
    weights: dict[str, mx.array],
    rank: int,
    size: int,
    split: tuple[int, ...] | None = None,
) -> tuple[ModelConfig, dict[str, mx.array]]:
    """Rank `rank`'s stage (layer_range): its blocks' tensors, renumbered from 0, and the
    replicated rest (embeddings, final norm, LM head); its config has those blocks' windows and
    MLP kinds."""
    start, stop = layer_range(config.num_hidden_layers, rank, size, split)
    out = {}
    for name, tensor in weights.items():
        match = _LAYER.match(name)
        if not match:
            out[name] = tensor
        elif start <= int(match.group(1)) < stop:
            out[f"model.layers.{int(match.group(1)) - start}.{match.group(2)}"] = tensor
    local = dataclasses.replace(
        config,
        num_hidden_layers=stop - start,
        layer_windows=config.layer_windows[start:stop],
        layer_moe=config.layer_moe[start:stop],
    )
    return local, out


def weights_fingerprint(config: ModelConfig, weights: dict[str, mx.array]) -> str:
    """A hash of the full model's config and tensor names, shapes and dtypes: ranks that load
    different models differ here (checked across the group before any rank runs)."""
    described = {
        "config": dataclasses.asdict(config),
        "tensors": sorted((k, list(v.shape), str(v.dtype)) for k, v in weights.items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def join_group(config: ModelConfig, weights: dict[str, mx.array], sharding: Sharding) -> None:
    """Before a rank shards its model: every rank has loaded the same model with the same split
    (else ModelLoadError on every rank), and unseeded requests draw the same seeds on every
    rank."""
    global _unseeded
    group = sharding.group
    plan = hashlib.sha256(f"{sharding.mode} {sharding.split}".encode()).hexdigest()
    fingerprint = hashlib.sha256((weights_fingerprint(config, weights) + plan).encode())
    check_same_model(fingerprint.hexdigest(), group)
    _unseeded = random.Random(shared_seed(group))


def check_same_model(fingerprint: str, group: mx.distributed.Group) -> None:
    """Every rank of `group` must have loaded the same model: their fingerprints are compared
    with one all_sum (each rank adds its fingerprint's bytes and their squares; equal sums mean
    equal fingerprints unless the ranks' differences cancel in both, which random hashes do not)."""
    digest = np.frombuffer(bytes.fromhex(fingerprint), dtype=np.uint8).astype(np.float64)
    mine = mx.array(np.concatenate([digest, digest**2]).astype(np.float32))
    total = np.array(mx.distributed.all_sum(mine, group=group))
    if not np.array_equal(total, np.array(mine) * group.size()):
        raise ModelLoadError(
            f"rank {group.rank()} of {group.size()}: the ranks loaded different models (their "
            "configs or tensor shapes differ) or split them differently (parallel, "
            "pipeline_split); give every rank the same model and settings"
        )
