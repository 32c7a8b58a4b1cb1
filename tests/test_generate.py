"""Streaming generation on the real default model: responses, finish reasons, stop strings across
token boundaries, logprobs, metrics, seeds and threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer import SamplingParams
from mlxinfer.generate import StopStrings

GOLDEN = json.loads((Path(__file__).parent / "data" / "smollm2_golden.json").read_text())
QUESTION = "What is the capital of France?"


def test_stream_matches_golden_and_ends_with_eos(default_model):
    model, tokenizer = default_model
    responses = list(mlxinfer.stream_generate(model, tokenizer, QUESTION, chat=True))
    assert [r.token for r in responses] == GOLDEN["chat_greedy_ids"]  # ends with <|im_end|>
    assert "".join(r.text for r in responses) == "The capital of France is Paris."
    assert [r.finish_reason for r in responses] == [None] * (len(responses) - 1) + ["eos"]
    assert all(r.metrics is None for r in responses[:-1])
    metrics = responses[-1].metrics
    assert metrics.generated_tokens == len(responses)
    assert metrics.prompt_tokens == len(GOLDEN["chat_prompt_ids"])
    assert 0 < metrics.ttft_ms <= metrics.e2e_ms
    assert metrics.decode_tps > 0 and len(metrics.itl_ms) == len(responses) - 1
    assert metrics.kv_cache_mb > 0 and metrics.peak_memory_mb >= metrics.kv_cache_mb
    assert metrics.bandwidth_gbs > 0


def test_generate_returns_text_and_metrics(default_model):
    model, tokenizer = default_model
    text, metrics = mlxinfer.generate(model, tokenizer, QUESTION, chat=True, return_metrics=True)
    assert text == "The capital of France is Paris."
    assert metrics.generated_tokens == len(GOLDEN["chat_greedy_ids"])


def test_max_tokens_and_ignore_eos(default_model):
    model, tokenizer = default_model
    params = SamplingParams(ignore_eos=True, max_tokens=12)
    responses = list(
        mlxinfer.stream_generate(model, tokenizer, QUESTION, sampling=params, chat=True)
    )
    assert len(responses) == 12 and responses[-1].finish_reason == "length"
    assert [r.token for r in responses[:8]] == GOLDEN["chat_greedy_ids"]  # runs through EOS
    short = list(mlxinfer.stream_generate(model, tokenizer, QUESTION, max_tokens=3, chat=True))
    assert [r.token for r in short] == GOLDEN["chat_greedy_ids"][:3]
    assert short[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "stop, expected",
    [
        ("ance is", "The capital of Fr"),  # spans the tokens " France" and " is"
        ("Paris", "The capital of France is "),
        ("capital", "The "),
        ("not in the answer", "The capital of France is Paris."),
    ],
)
def test_stop_strings_across_token_boundaries(default_model, stop, expected):
    model, tokenizer = default_model
    params = SamplingParams(stop=(stop, "zzz"))
    responses = list(
        mlxinfer.stream_generate(model, tokenizer, QUESTION, sampling=params, chat=True)
    )
    text = "".join(r.text for r in responses)
    assert text == expected
    assert responses[-1].finish_reason == (
        "eos" if stop not in "The capital of France is Paris." else "stop"
    )


def test_stop_strings_unit():
    stops = StopStrings(("<end>", "xyz"))
    assert stops.feed("abc<e") == ("abc", False)  # "<e" might start "<end>"
    assert stops.feed("n") == ("", False)
    assert stops.feed("x") == ("<en", False)  # "<enx" is no stop; "x" might start "xyz"
    assert stops.feed("yz!") == ("", True)  # the stop string and what follows are dropped
    stops = StopStrings(("<end>",))
    assert stops.feed("hello <en") == ("hello ", False)
    assert stops.feed("d> more") == ("", True)
    stops = StopStrings(("<end>",))
    assert stops.feed("tail <e") == ("tail ", False)
    assert stops.finish("") == ("<e", False)  # generation ended: held text is text after all


def test_logprobs_are_the_models_log_softmax(default_model):
    model, tokenizer = default_model
    params = SamplingParams(logprobs=5, max_tokens=4)
    responses = list(
        mlxinfer.stream_generate(model, tokenizer, QUESTION, sampling=params, chat=True)
    )
    ids = GOLDEN["chat_prompt_ids"] + [r.token for r in responses]
    logits = np.array(model(mx.array([ids])), dtype=np.float64)[0]
    for i, r in enumerate(responses):
        row = logits[len(GOLDEN["chat_prompt_ids"]) - 1 + i]
        log_softmax = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        top = np.argsort(-log_softmax)[:5]
        assert [t for t, _ in r.logprobs.top] == top.tolist()
        # float32 cached decode vs a float64 log-softmax of the full forward: ~1e-4 apart
        np.testing.assert_allclose([v for _, v in r.logprobs.top], log_softmax[top], atol=5e-4)
        assert r.logprobs.logprob == pytest.approx(log_softmax[r.token], abs=5e-4)


def test_more_logprobs_than_vocabulary_is_a_clear_error(default_model):
    model, tokenizer = default_model
    with pytest.raises(ValueError, match="logprobs must be at most the vocabulary size 49152"):
        mlxinfer.generate(model, tokenizer, QUESTION, sampling=SamplingParams(logprobs=60000))


def test_seeded_sampling_is_reproducible(default_model):
    model, tokenizer = default_model

    def sample(seed):
        params = SamplingParams(
            temperature=1.0, top_p=0.95, seed=seed, max_tokens=16, ignore_eos=True
        )
        return [
            r.token
            for r in mlxinfer.stream_generate(model, tokenizer, "Once upon a time", sampling=params)
        ]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_generation_from_a_thread(default_model):
    """Streamlit runs scripts in worker threads; MLX streams are per thread."""
    model, tokenizer = default_model
    result = {}

    def worker():
        result["text"] = mlxinfer.generate(model, tokenizer, QUESTION, chat=True)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=120)
    assert result["text"] == "The capital of France is Paris."


def test_bad_prompt_ids(default_model):
    model, tokenizer = default_model
    with pytest.raises(ValueError, match="out of range"):
        mlxinfer.generate(model, tokenizer, [1, 10**6])
    with pytest.raises(ValueError, match="empty"):
        mlxinfer.generate(model, tokenizer, [])
