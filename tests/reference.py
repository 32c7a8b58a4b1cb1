"""Independent references: tiny random transformers checkpoints and helpers to compare with them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


GEMMA3_ROPE = {  # per layer type, as transformers 5 writes Gemma 3 configs
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def rel_err(ours, ref) -> float:
    """‖ours − ref‖ / ‖ref‖ over all elements, in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def write_tiny_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer.json whose vocabulary covers the tiny model's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )


def randomize_(model, seed: int = 0) -> None:
    """Random values for every parameter, norms and biases included: defaults (ones, zeros) would
    hide a missing bias or norm."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


def make_tiny_checkpoint(path: Path, family: str, seed: int = 0, **overrides):
    """Save a tiny random transformers model of `family` to `path`; return the torch model."""
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    kwargs = {**TINY, **overrides}
    if family == "phi3":
        kwargs.setdefault("pad_token_id", 0)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(path)
    write_tiny_tokenizer(path, config.vocab_size)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def transformers_gguf_reference(gguf_path: Path):
    """transformers' own loader on a GGUF file (it dequantizes with gguf-py and un-permutes q/k
    itself): (float32 model, tokenizer)."""
    import torch
    import transformers

    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    ).eval()
    return model, tokenizer
