"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers loading the same
file and against golden outputs that transformers produced (tests/tools/make_golden.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer.generate import generate_tokens

from .reference import rel_err, torch_logits

pytestmark = pytest.mark.exactness  # CI runs these under each op set

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "smollm2_golden.json").read_text())


def test_answers_capital_of_france(default_model):
    model, tokenizer = default_model
    text = mlxinfer.generate(model, tokenizer, "What is the capital of France?", chat=True)
    assert "Paris" in text
    assert text.endswith(".")  # a sentence, ended by EOS rather than max_tokens


def test_prompt_ids_match_reference_tokenizer(default_model):
    _, tokenizer = default_model
    assert tokenizer.encode(GOLDEN["plain_prompt"]) == GOLDEN["plain_prompt_ids"]
    chat = [{"role": "user", "content": GOLDEN["chat_prompt"]}]
    assert tokenizer.apply_chat_template(chat) == GOLDEN["chat_prompt_ids"]


NEAR_TIE = 0.05  # logits; float32 kernels (ours, transformers') agree within 1e-4 relative


def teacher_forced_logits(model, prompt_ids: list[int], generated: list[int]) -> np.ndarray:
    """The logits `[len(generated), vocab]` that chose each generated token, in one forward pass."""
    ids = prompt_ids + generated[:-1]
    return np.array(model(mx.array([ids]))[0, len(prompt_ids) - 1 :])


@pytest.mark.parametrize("case", ["plain", "chat"])
def test_greedy_ids_pinned(default_model, case):
    """transformers' greedy tokens, teacher-forced: each is our most likely token, or within 0.01
    logits of it (a near tie, where float rounding may choose either: the plain case has one of
    0.017 at its 9th token)."""
    model, _ = default_model
    expected = GOLDEN[f"{case}_greedy_ids"]
    logits = teacher_forced_logits(model, GOLDEN[f"{case}_prompt_ids"], expected)
    chosen = logits[np.arange(len(expected)), expected]
    assert (chosen >= logits.max(-1) - 0.01).all()
    assert (logits.argmax(-1) == expected).mean() >= 0.9


# Prompts whose exact greedy answer a test asserts (free-running, through the public API or CLI).
EXACT_ANSWERS = {
    "chat: What is the capital of France?": (GOLDEN["chat_prompt_ids"], GOLDEN["chat_greedy_ids"]),
    "raw: The quick brown fox, 3 tokens": (
        GOLDEN["plain_prompt_ids"],
        GOLDEN["plain_greedy_ids"][:3],
    ),
}


def test_exact_answer_with_an_8bit_cache_is_not_a_near_tie(default_model):
    """tests/test_cli.py asserts the answer to "What is the capital of Germany?" with a bounded
    8-bit cache: its narrowest step ("The" first) keeps 0.50-0.52 logits under either op set
    (0.66 with the float cache; the op sets move it by 0.02), so require half of that."""
    model, tokenizer = default_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Germany?"}]
    )
    answer = tokenizer.encode("The capital of Germany is Berlin.") + [2]  # <|im_end|>
    cache = model.make_cache(max_kv_size=64, kv_keep=4, kv_bits=8)
    logits = [np.array(model(mx.array([prompt]), cache)[0, -1])]
    logits += [np.array(model(mx.array([[t]]), cache)[0, -1]) for t in answer[:-1]]
    logits = np.stack(logits)
    assert (logits.argmax(-1) == answer).all()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() >= 0.25


@pytest.mark.parametrize("name", list(EXACT_ANSWERS))
def test_exact_answers_are_not_near_ties(default_model, name):
    """A test may assert an exact greedy answer only where every step's top two candidates are at
    least NEAR_TIE logits apart (measured: 0.082 for the chat answer's first token, "The" vs "L";
    0.29 for the three plain tokens), so the answer holds on any machine and either op set."""
    model, _ = default_model
    prompt, answer = EXACT_ANSWERS[name]
    logits = teacher_forced_logits(model, prompt, answer)
    assert (logits.argmax(-1) == answer).all()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() >= NEAR_TIE


def test_perplexity_pinned(default_model):
    model, tokenizer = default_model
    text = (DATA / GOLDEN["perplexity_text"]).read_text()
    ids = tokenizer.encode(text)[: GOLDEN["perplexity_tokens"]]
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)  # [T-1, vocab]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, mx.array(ids[1:])[:, None], axis=-1).mean()
    assert math.exp(nll.item()) == pytest.approx(GOLDEN["perplexity"], rel=1e-3)


def test_logits_match_transformers_on_same_gguf(default_model, smollm_reference):
    model, _ = default_model
    reference, _, _ = smollm_reference
    ids = np.array([GOLDEN["chat_prompt_ids"]])
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(reference, ids)) <= 1e-4


def test_gguf_and_safetensors_give_same_logits(default_model, smollm_reference):
    """The same weights as GGUF (interleaved q/k, Q4_1 quantized matmuls) and as a Hugging Face
    safetensors export (half-split q/k, float32) give the same logits and token ids."""
    gguf_model, gguf_tokenizer = default_model
    _, _, export = smollm_reference
    hf_model, hf_tokenizer = mlxinfer.load(export)
    assert not hf_model.config.rope_traditional and gguf_model.config.rope_traditional
    ids = mx.array([GOLDEN["chat_prompt_ids"]])
    assert rel_err(np.array(hf_model(ids)), np.array(gguf_model(ids))) <= 1e-4
    text = (DATA / GOLDEN["perplexity_text"]).read_text()
    assert hf_tokenizer.encode(text) == gguf_tokenizer.encode(text)


def test_cached_decode_matches_full_forward(default_model):
    model, tokenizer = default_model
    ids = tokenizer.encode((DATA / GOLDEN["perplexity_text"]).read_text())[:48]
    full = np.array(model(mx.array([ids])))[0]
    cache = model.make_cache()
    steps = [np.array(model(mx.array([ids[:20]]), cache))[0]]
    for t in range(20, len(ids)):
        steps.append(np.array(model(mx.array([ids[t : t + 1]]), cache))[0])
    assert rel_err(np.concatenate(steps), full) <= 1e-4


@pytest.mark.parametrize("extra", [1, 0])
def test_prompt_that_fills_the_context_is_an_error(default_model, extra):
    """Longer than the context, or exactly as long (nothing could be generated: it used to give
    an empty generation and no metrics)."""
    model, _ = default_model
    too_long = [1] * (model.config.max_position_embeddings + extra)
    with pytest.raises(ValueError, match="leaves no room in the model's context of 8192 tokens"):
        next(generate_tokens(model, too_long, 4))


def test_seeded_requests_draw_the_same_tokens_alone_and_batched(default_model):
    """The same seed gives the same tokens alone or in a batch, up to real near ties. Before the
    draw's noise followed each candidate's rank (top-k's partial selection returned candidates in
    an order that moves with a rounding of the logits), 20 of 32 seeded top-k requests drew
    other tokens in a batch of 8 than alone; now none of 32 (at most 1 of 8 may differ here)."""
    model, tokenizer = default_model
    rng = np.random.default_rng(0)
    words = "the a river city history began music long ago people bridge light".split()
    prompts = [" ".join(rng.choice(words, 12)) for _ in range(8)]
    params = [
        mlxinfer.SamplingParams(temperature=0.7, top_k=40, seed=100 + i, ignore_eos=True)
        for i in range(8)
    ]
    batched = mlxinfer.batch_generate(model, tokenizer, prompts, sampling=params, max_tokens=12)
    differ = sum(
        mlxinfer.batch_generate(model, tokenizer, [p], sampling=s, max_tokens=12)[0].tokens
        != b.tokens
        for p, s, b in zip(prompts, params, batched, strict=True)
    )
    assert differ <= 1


def reencode(source: Path, target: Path, kind: str) -> list[str]:
    """The default model's file again, its matrices with rows of a multiple of 256 (the MLPs'
    down projections: its hidden size, 576, is not one) as `kind` (Q4_K or Q6_K, our own plain
    quantizer from their float weights), everything else as stored, as llama.cpp's quantizer
    leaves rows that are not whole K blocks. Returns the re-encoded tensors' names."""
    import gguf

    from .tools.kquants import quantize_q4_k, quantize_q6_k

    quantize = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}[kind]
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(
            name, field.contents(), field.types[0], sub_type=field.types[-1] if array else None
        )
    changed = []
    for tensor in reader.tensors:
        rows_of = int(tensor.shape[0])  # GGUF order: the row length first
        if tensor.data.ndim == 2 and rows_of % 256 == 0:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            raw = quantize(weights.reshape(-1, rows_of))
            writer.add_tensor(tensor.name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
            changed.append(tensor.name)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_the_default_model_re_encoded_as_k_quants_loads_and_answers(tmp_path, kind):
    """Against transformers loading the same re-encoded file (logits within 1e-4, but for Q6_K
    under the native policy), and the capital of France under both compute policies."""
    import gguf

    path = tmp_path / f"smollm2-{kind}.gguf"
    changed = reencode(mlxinfer.default_model_path(), path, kind)
    assert len(changed) == 30  # every layer's ffn_down
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {types[name] for name in changed} == {kind}
    from .reference import transformers_gguf_reference

    reference, _ = transformers_gguf_reference(path)
    ids = np.array([GOLDEN["chat_prompt_ids"]])
    expected = torch_logits(reference, ids)
    for compute in ("float32", "native"):
        model, tokenizer = mlxinfer.load(path, compute=compute)
        # native: Q4_K blocks become MLX groups without loss; Q6_K ones are quantized again to
        # 8 bits (gguf.REQUANTIZE_BITS): measured 1.4e-2
        tolerance = 0.05 if compute == "native" and kind == "Q6_K" else 1e-4
        assert rel_err(np.array(model(mx.array(ids))), expected) <= tolerance, compute
        text = mlxinfer.generate(model, tokenizer, "What is the capital of France?", chat=True)
        assert "Paris" in text, (compute, text)
