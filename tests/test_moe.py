"""Mixture-of-experts models against transformers on tiny random checkpoints (mixtral, qwen2_moe,
qwen3_moe): full forward, cached decode and chunked prefill, under both weight policies; and
mlx-community's stacked, quantized MoE layout against mlx-lm."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlxinfer
from mlxinfer.generate import prefill
from mlxinfer.moe import SORT_THRESHOLD, QuantizedSwitchLinear, SparseMoE

from .reference import make_tiny_checkpoint, rel_err, torch_logits

pytestmark = pytest.mark.exactness  # CI runs these under each op set

TOL = 1e-4

CASES = {
    "mixtral-top2-of-8": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe-shared-expert": (
        "qwen2_moe",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            mlp_only_layers=[1],  # layer 1 dense
        ),
    ),
    "qwen2_moe-sparse-step-normalised": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,  # layer 0 dense, layer 1 MoE
            norm_topk_prob=True,
        ),
    ),
    "qwen3_moe-top3-qk-norm": (
        "qwen3_moe",
        dict(
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            head_dim=32,
        ),
    ),
}


def random_ids(batch: int = 2, length: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=(batch, length))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny_checkpoint(path, family, **overrides)
    return request.param, ref, path


@pytest.mark.parametrize("compute", ["float32", "native"])
def test_moe_matches_transformers(checkpoint, compute):
    """40 tokens x batch 2 x top-k >= 64 pairs: the full forward takes the expert-sorted path,
    decoding the unsorted one."""
    name, ref, path = checkpoint
    model, _ = mlxinfer.load(path, compute=compute)
    family, overrides = CASES[name]
    expected_moe = [
        i not in overrides.get("mlp_only_layers", [])
        and (i + 1) % overrides.get("decoder_sparse_step", 1) == 0
        for i in range(2)
    ]
    assert [isinstance(layer.mlp, SparseMoE) for layer in model.model.layers] == expected_moe
    ids = random_ids()
    expected = torch_logits(ref, ids)
    assert ids.size * model.config.num_experts_per_tok >= SORT_THRESHOLD

    assert rel_err(np.array(model(mx.array(ids))), expected) <= TOL

    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, :12]), cache))]
    steps += [np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(12, 40)]
    ours = np.concatenate(steps, axis=1)
    for t in range(40):
        assert rel_err(ours[:, t], expected[:, t]) <= TOL, f"position {t}"

    for chunk in (5, 16):
        last = prefill(model, mx.array(ids), model.make_cache(), chunk_size=chunk)
        assert rel_err(np.array(last), expected[:, -1]) <= TOL


def test_routing_matters_in_the_reference(tmp_path):
    """The tests above could not catch a wrong router if every expert computed the same thing:
    swapping two experts' weights must change the logits."""
    ref = make_tiny_checkpoint(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    for w in ("w1", "w2", "w3"):
        a = f"model.layers.0.block_sparse_moe.experts.0.{w}.weight"
        b = f"model.layers.0.block_sparse_moe.experts.1.{w}.weight"
        tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, file, metadata={"format": "pt"})
    model, _ = mlxinfer.load(tmp_path)
    ids = random_ids()
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref, ids)) > 1e-2


def test_fused_expert_tensors_load(tmp_path):
    """transformers-5 in-memory layout (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj`)."""
    ref = make_tiny_checkpoint(
        tmp_path, "qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    )
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for e in range(4):
            gate_up.append(
                np.concatenate(
                    [
                        tensors.pop(f"{prefix}.{e}.gate_proj.weight"),
                        tensors.pop(f"{prefix}.{e}.up_proj.weight"),
                    ]
                )
            )
            down.append(tensors.pop(f"{prefix}.{e}.down_proj.weight"))
        tensors[f"{prefix}.gate_up_proj"] = np.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = np.stack(down)
    save_file(tensors, file, metadata={"format": "pt"})
    model, _ = mlxinfer.load(tmp_path)
    ids = random_ids()
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref, ids)) <= TOL


def test_missing_expert_is_named(tmp_path):
    make_tiny_checkpoint(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(mlxinfer.ModelLoadError) as err:
        mlxinfer.load(tmp_path)
    message = str(err.value)
    assert "model.layers.1.mlp.experts.*.up_proj.weight" in message
    assert "missing experts [2]" in message and str(tmp_path) in message


def test_bad_top_k_is_named(tmp_path):
    make_tiny_checkpoint(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["num_experts_per_tok"] = 5
    config_file.write_text(json.dumps(config))
    with pytest.raises(mlxinfer.ModelLoadError, match=r"num_experts_per_tok must be in \[1, 4\]"):
        mlxinfer.load(tmp_path)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_mlx_community_quantized_moe_matches_mlx_lm(tmp_path, family):
    """mlx_lm.convert stacks and quantizes the experts (`switch_mlp`, 4-bit, router 8-bit for
    Qwen): our native policy multiplies them with gather_qmm, and must match mlx-lm's model."""
    from mlx_lm import convert
    from mlx_lm import load as mlx_lm_load

    overrides = {
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
        "qwen3_moe": dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=32
        ),
    }[family]
    hf = tmp_path / "hf"
    make_tiny_checkpoint(hf, family, **overrides)
    # mlx-lm reads only the classic spellings: top-level rope_theta (its qwen2_moe assumes 1e6
    # otherwise) and num_experts (transformers 5 writes num_local_experts for qwen3_moe).
    config = json.loads((hf / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    if family == "qwen3_moe":
        config["num_experts"] = config.pop("num_local_experts")
    (hf / "config.json").write_text(json.dumps(config))
    quantized = tmp_path / "q"
    convert(str(hf), str(quantized), quantize=True, q_group_size=32, q_bits=4)
    names = load_file(str(quantized / "model.safetensors")).keys()
    assert any("switch_mlp.gate_proj.scales" in n for n in names)

    reference, _ = mlx_lm_load(str(quantized))
    ids = mx.array(random_ids())
    expected = np.array(reference(ids).astype(mx.float32))
    native, _ = mlxinfer.load(quantized, compute="native")
    assert any(isinstance(m, QuantizedSwitchLinear) for _, m in native.named_modules())
    assert rel_err(np.array(native(ids).astype(mx.float32)), expected) <= 1e-3
    dequantized, _ = mlxinfer.load(quantized, compute="float32")
    assert not any(isinstance(m, QuantizedSwitchLinear) for _, m in dequantized.named_modules())
    assert rel_err(np.array(dequantized(ids)), expected) <= 1e-3
