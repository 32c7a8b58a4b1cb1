"""Looking inside the model against transformers (eager attention, output_attentions,
output_hidden_states, output_router_logits) on tiny random checkpoints: GQA, MQA, a sliding window
shorter than the prompt, q/k norm, and mixture-of-experts routing; the logit lens against
transformers' hidden states through its own norm and head; each sampling stage against a numpy
definition written here; the architecture card against the checkpoint's own parameter count."""

from __future__ import annotations

import numpy as np
import pytest

import mlxinfer
from mlxinfer.inspect import architecture, logit_lens, logit_lens_layer, sampling_stages, trace
from mlxinfer.sampling import SamplingParams

from .reference import make_tiny_checkpoint

pytestmark = pytest.mark.exactness

TOL = 1e-4
PROMPT = " ".join(f"w{i}" for i in (5, 9, 17, 33, 64, 8, 100, 21, 3, 77, 45, 12, 90, 6, 58, 31))

CASES = {
    "gqa": ("llama", {}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
    "sliding-window": ("mistral", {"sliding_window": 6, "head_dim": 32}),
    "qk-norm": ("qwen3", {"head_dim": 32}),
    "gemma2": ("gemma2", {"head_dim": 32, "sliding_window": 6, "attn_logit_softcapping": 2.0}),
    "gemma3": ("gemma3_text", {"head_dim": 32, "sliding_window": 6, "sliding_window_pattern": 2}),
    "moe": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "moe-shared": (
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    import torch

    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    reference = make_tiny_checkpoint(path, family, **overrides)
    reference.set_attn_implementation("eager")
    model, tokenizer = mlxinfer.load(path)
    ours = trace(model, tokenizer, PROMPT)
    options = dict(output_attentions=True, output_hidden_states=True)
    if family in ("mixtral", "qwen2_moe"):
        options["output_router_logits"] = True
    with torch.no_grad():
        theirs = reference(torch.tensor([ours.token_ids]), **options)
    return request.param, reference, model, ours, theirs


def test_tokens_map_back_to_the_prompt(case):
    from mlxinfer.generate import encode_prompt

    _, _, _, ours, _ = case
    assert ours.token_ids == encode_prompt(ours.tokenizer, PROMPT)  # as generation reads it
    assert [int(w[1:]) for w in PROMPT.split()] == ours.token_ids  # the tiny tokenizer: wN -> N
    for _, piece, (start, end) in ours.tokens:
        assert ours.text[start:end] == piece


def test_attention_probabilities_equal_transformers(case):
    name, _, model, ours, theirs = case
    assert len(ours.attentions) == model.config.num_hidden_layers
    for layer, reference in enumerate(theirs.attentions):
        ref = reference[0].float().numpy()  # [heads, T, T]
        mine = ours.attentions[layer]
        assert mine.shape == ref.shape
        np.testing.assert_allclose(mine.sum(-1), 1.0, atol=1e-5)  # rows are distributions
        assert np.all(np.triu(mine, 1) == 0)  # causal
        np.testing.assert_allclose(mine, ref, atol=TOL, err_msg=f"{name} layer {layer}")
    if name == "sliding-window":  # the window hides what is 6 or more positions back
        T = mine.shape[-1]
        far = np.tril(np.ones((T, T), bool), -6)
        assert np.all(mine[:, far] == 0) and far.any()


def test_hidden_states_and_logits_equal_transformers(case):
    name, _, _, ours, theirs = case
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for i, (mine, reference) in enumerate(
        zip(ours.hidden_states, theirs.hidden_states, strict=True)
    ):
        ref = reference[0].float().numpy()  # |h| up to ~4; measured differences ~3e-6
        np.testing.assert_allclose(mine, ref, atol=TOL, rtol=0, err_msg=f"{name} state {i}")
    logits = theirs.logits[0].float().numpy()
    np.testing.assert_allclose(ours.logits, logits, atol=TOL, rtol=0)


def test_router_choices_equal_transformers(case):
    name, reference, _, ours, theirs = case
    if not name.startswith("moe"):
        assert ours.routing == {}
        pytest.skip("not a mixture of experts")
    k = reference.config.num_experts_per_tok
    compared = 0
    for layer, logits in enumerate(theirs.router_logits):
        probs = np.exp(logits.float().numpy() - logits.float().numpy().max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)  # [T, E]
        experts, weights = ours.routing[layer]
        for token in range(probs.shape[0]):
            ranked = np.sort(probs[token])[::-1]
            if ranked[k - 1] - ranked[k] < 1e-4:  # a near tie: either choice is right
                continue
            assert set(experts[token]) == set(np.argsort(-probs[token])[:k])
            compared += 1
    assert compared >= probs.shape[0]  # most tokens were clear choices


def test_logit_lens_equals_transformers_hidden_states_through_its_own_head(case):
    import torch

    name, reference, _, ours, theirs = case
    lens = logit_lens(ours, top=3)
    assert len(lens) == len(theirs.hidden_states)
    last = len(theirs.hidden_states) - 1
    for i, state in enumerate(theirs.hidden_states):
        with torch.no_grad():
            h = state if i == last else reference.model.norm(state)
            logits = reference.lm_head(h)[0].float()
            cap = getattr(reference.config, "final_logit_softcapping", None)
            if cap is not None:  # Gemma 2's head soft-caps what it gives (its forward does)
                logits = torch.tanh(logits / cap) * cap
            probs = torch.softmax(logits, -1).numpy()  # [T, V]
        for position, top in enumerate(lens[i]):
            ranked = np.sort(probs[position])[::-1]
            ids = [t for t, _, _ in top]
            np.testing.assert_allclose([p for _, _, p in top], ranked[:3], atol=1e-5)
            if ranked[0] - ranked[1] > 1e-4:  # the top token, where it is not a near tie
                assert ids[0] == int(np.argmax(probs[position]))
        # only some positions (what the page shows), in the order asked: the same rows
        positions = [probs.shape[0] - 1, 0]
        for position, top in zip(positions, logit_lens_layer(ours, i, 3, positions), strict=True):
            ranked = np.sort(probs[position])[::-1]
            np.testing.assert_allclose([p for _, _, p in top], ranked[:3], atol=1e-5)


def test_architecture_counts_the_checkpoints_parameters(case):
    name, reference, model, _, _ = case
    card = architecture(model)
    assert card["total_parameters"] == sum(p.numel() for p in reference.parameters())
    c = reference.config
    expected = {1: "MQA", c.num_attention_heads: "MHA"}.get(c.num_key_value_heads, "GQA")
    assert card["attention"] == expected
    assert card["experts"] == (4 if name.startswith("moe") else 0)
    attention = sum(
        p.numel() for n, p in reference.named_parameters() if "self_attn" in n and "norm" not in n
    )
    assert card["parameters"]["attention"] == attention
    assert sum(card["weight_bytes"].values()) == card["total_weight_bytes"] == model.nbytes


# -- the sampler's stages against numpy ----------------------------------------------------------


def softmax(x):
    x = np.where(np.isfinite(x), x, -np.inf)
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_stages(logits, params, history):
    """The chain written out in numpy, independently of mlxinfer.sampling."""
    x = logits.astype(np.float64).copy()
    out = {"raw": softmax(x)}
    recent = list(history)[-params.repetition_context_size :]
    for t in set(recent):
        x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    counts = np.bincount(np.asarray(history, dtype=int), minlength=x.size).astype(np.float64)
    x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    out["penalties"] = softmax(x)
    if 0 < params.top_k < x.size:
        x[np.argsort(-x, kind="stable")[params.top_k :]] = -np.inf
    out["top-k"] = softmax(x)
    if params.top_p < 1.0:
        p = softmax(x)
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        x[order[before >= params.top_p]] = -np.inf
    out["top-p"] = softmax(x)
    if params.min_p > 0:
        p = softmax(x)
        x[p < params.min_p * p.max()] = -np.inf
    out["min-p"] = softmax(x)
    out["temperature"] = softmax(x / params.temperature)
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=20, min_p=0.05),
        SamplingParams(
            temperature=0.5,
            top_k=50,
            top_p=0.8,
            min_p=0.02,
            repetition_penalty=1.3,
            presence_penalty=0.4,
            frequency_penalty=0.3,
        ),
    ],
)
def test_each_sampling_stage_equals_a_numpy_definition(params):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1000) * 3).astype(np.float32)
    history = list(rng.integers(0, 1000, 40)) + [int(np.argmax(logits))] * 3
    stages = sampling_stages(logits, params, history)
    expected = numpy_stages(logits, params, history)
    assert [name for name, _ in stages] == list(expected)
    for name, probs in stages:
        np.testing.assert_allclose(probs, expected[name], atol=1e-6, err_msg=name)
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    kept = [int((p > 0).sum()) for _, p in stages]
    assert kept == sorted(kept, reverse=True)  # each filter only removes


def test_greedy_puts_all_the_mass_on_the_top_token():
    logits = np.array([0.1, 2.0, -1.0, 1.5], np.float32)
    *_, (name, final) = sampling_stages(logits, SamplingParams())
    assert name == "temperature" and final.tolist() == [0, 1, 0, 0]


def test_draws_follow_the_final_distribution():
    """20,000 draws through the real sampler's stages: each token's frequency within 4 standard
    errors of the probability sampling_stages computes, and no filtered-out token drawn."""
    from mlxinfer.inspect import draw

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(200) * 2).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9)
    final = sampling_stages(logits, params)[-1][1]
    n = 20_000
    counts = np.bincount(draw(logits, params, n=n, seed=3), minlength=200) / n
    assert np.all(counts[final == 0] == 0)
    error = np.sqrt(final * (1 - final) / n)
    assert np.all(np.abs(counts - final) <= 4 * error + 1e-9)


def test_architecture_of_a_quantized_checkpoint(tmp_path):
    """An mlx-community style 4-bit directory (written by mlx_lm.convert): the same parameter
    count as the float checkpoint (packed weights counted as the values they hold), its bytes
    under "4-bit (groups of 32)", and every byte accounted for."""
    import mlx_lm

    src = tmp_path / "float"
    reference = make_tiny_checkpoint(src, "llama")
    out = tmp_path / "q4"
    mlx_lm.convert(str(src), str(out), quantize=True, q_group_size=32, q_bits=4)
    model, _ = mlxinfer.load(out, compute="native")
    card = architecture(model)
    assert card["total_parameters"] == sum(p.numel() for p in reference.parameters())
    assert card["weight_bytes"]["4-bit (groups of 32)"] > 0
    assert sum(card["weight_bytes"].values()) == card["total_weight_bytes"] == model.nbytes


@pytest.mark.parametrize(
    "family, overrides, cache",
    [
        ("llama", {}, {}),
        ("llama", {}, {"max_kv_size": 40}),
        ("llama", {"head_dim": 32}, {"kv_bits": 8, "kv_group_size": 32, "max_kv_size": 300}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}, {}),
    ],
)
@pytest.mark.parametrize("tokens", [1, 30, 700])
def test_measured_kv_bytes_is_what_generation_leaves_in_the_caches(
    tmp_path, family, overrides, cache, tokens
):
    """The KV calculator's check fills real caches with random keys and values in generation's
    pieces (no forward pass: a 4,096-token check blocked every chat for 90 s): the same bytes as
    caches that a real prefill and decode step filled."""
    import mlx.core as mx

    from mlxinfer.cache import CacheSpec
    from mlxinfer.inspect import measured_kv_bytes
    from mlxinfer.steps import decode_step, prefill

    make_tiny_checkpoint(tmp_path, family, **overrides)
    model, _ = mlxinfer.load(tmp_path)
    spec = CacheSpec(**cache)
    caches = model.make_cache(spec)
    ids = mx.array(np.random.default_rng(0).integers(0, 128, (1, tokens)))
    if tokens > 1:
        prefill(model, ids[:, :-1], caches)
    decode_step(model, ids[:, -1], caches)
    mx.eval([c.state for c in caches])
    real = sum(c.nbytes for c in caches)
    assert measured_kv_bytes(model, tokens, spec) == real > 0


def test_a_trace_stepped_on_a_shared_engine_lets_a_generation_run_between_its_blocks(tiny):
    """The Inside page runs a trace one piece per engine call (embeddings, each block, the head):
    a chat on the same engine gets a decode step between any two, instead of waiting for the
    whole pass (the engine steps once after each batch of messages). The stepped trace is the
    one-call trace (itself checked against transformers above)."""
    from mlxinfer.engine import Engine
    from mlxinfer.inspect import Tracing

    model, tokenizer = mlxinfer.load(tiny)
    engine = Engine(model, tokenizer)
    try:
        chat = engine.submit(PROMPT, SamplingParams(ignore_eos=True), max_tokens=200)
        next(iter(chat))  # generating
        tracing = Tracing(model, tokenizer, PROMPT)
        assert tracing.steps == model.config.num_hidden_layers + 2
        made = []
        while True:
            finished = engine.call(tracing.step)
            made.append(engine.call(lambda: len(chat._request.stream.tokens)))
            if finished:
                break
        assert len(made) == tracing.steps
        # a decode step after every call: the chat advanced between every two trace steps
        assert all(b > a for a, b in zip(made, made[1:], strict=False)) and made[-1] < 200
        whole = engine.call(trace, model, tokenizer, PROMPT)
    finally:
        engine.close(cancel=True)
    np.testing.assert_array_equal(tracing.result.logits, whole.logits)
    for a, b in zip(tracing.result.hidden_states, whole.hidden_states, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_4096_token_kv_check_does_not_hold_up_a_chat_on_the_same_engine(default_model):
    """The issue's case: the Inside page's "Check against a real cache" at 4,096 tokens on the
    default model, run on the engine a chat shares: the chat's first token comes within 2 s (it
    waited 75 s while the check ran a forward pass of the whole length)."""
    import threading
    import time

    from mlxinfer.cache import CacheSpec
    from mlxinfer.engine import Engine
    from mlxinfer.inspect import measured_kv_bytes

    model, tokenizer = default_model
    with Engine(model, tokenizer) as engine:
        engine.submit("Hi", max_tokens=1).result()  # warm
        check = threading.Thread(
            target=engine.call, args=(measured_kv_bytes, model, 4096, CacheSpec())
        )
        check.start()
        started = time.perf_counter()
        chat = engine.submit("What is the capital of France?", chat=True, max_tokens=1)
        first = next(iter(chat))
        waited = time.perf_counter() - started
        check.join()
    assert first.token >= 0 and waited < 2.0, f"the chat waited {waited:.1f} s"
