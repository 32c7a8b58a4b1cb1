"""Session fixtures: the default model as we load it, and as transformers loads the same GGUF."""

from __future__ import annotations

import json
import os

import pytest

import mlxinfer  # first, before any test module imports mlx.core: OpenBLAS must load first

# Exactness is float32 against float32 references: MLX's default lets GPUs that have them (NVIDIA
# tensor cores, Apple M5) run float32 matmuls in TF32, ~1e-3 relative per product.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model():
    """Our load of the default model (SmolLM2-135M-Instruct Q4_1 GGUF). Where it cannot be brought
    (a GPU machine reached through a 64 MiB copy), MLXINFER_TESTS_WITHOUT_DEFAULT_MODEL=1 skips the
    tests that need it; everywhere else a missing model is an error, as it must be in CI."""
    if os.environ.get("MLXINFER_TESTS_WITHOUT_DEFAULT_MODEL") == "1":
        try:
            mlxinfer.default_model_path()
        except FileNotFoundError:
            pytest.skip("the default model is not installed here")
    return mlxinfer.load()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """The path of a tiny random llama checkpoint (tests/reference.py), shared by the session.
    Test modules that need every family override `tiny` with their own parametrized fixture."""
    from .reference import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama")
    return str(path)


@pytest.fixture(scope="session")
def smollm_reference(tmp_path_factory):
    """transformers' own GGUF loader on the same file (it dequantizes with gguf-py and un-permutes
    q/k itself), plus its weights exported as a Hugging Face safetensors directory."""
    from safetensors.torch import save_file

    from .reference import transformers_gguf_reference

    model, tokenizer = transformers_gguf_reference(mlxinfer.default_model_path())
    export = tmp_path_factory.mktemp("smollm_hf")
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # unshare tied
    save_file(state, str(export / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (export / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(export)
    return model, tokenizer, export
