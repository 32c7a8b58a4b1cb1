"""batch_generate and the Engine: batched results equal each prompt run alone, whatever the batch
holds and whenever requests come and go; seeds belong to requests; cancellation, failures,
refusals, the prefix cache, the policies, admission and shutdown.

"Alone" is the single-sequence path (prefill, then decode_step one token at a time), which
test_model.py and test_cache.py check against transformers. Greedy tokens are compared up to the
first step where the alone run's top two logits are within MARGIN: past a near tie, float
rounding of a different batch shape may rightly pick the other token."""

from __future__ import annotations

import gc
import random
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer import SamplingParams
from mlxinfer.generate import decode_step, prefill

from .reference import make_tiny_checkpoint

pytestmark = pytest.mark.exactness  # CI runs these under each op set

MARGIN = 1e-3  # batched and alone logits differ by ~1e-5 here (test_batch_cache.py: 1e-6 relative)
GREEDY = SamplingParams(ignore_eos=True)

CASES = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", dict(sliding_window=8, head_dim=32)),
    "qwen2-moe": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(path, family, **overrides)
    return mlxinfer.load(path)


@pytest.fixture(params=[False, True], ids=["in-step", "run-ahead"])
def run_ahead(request, monkeypatch):
    """Both decode loops: read each step's tokens before the next (the CPU's), or queue step n+1
    before reading step n (a GPU's), which the CPU runs too when told."""
    import mlxinfer.runner

    monkeypatch.setattr(mlxinfer.runner, "pipelines_decode", lambda: request.param)
    return request.param


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint(path, "llama")
    return mlxinfer.load(path)


def prompts(n: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, int(rng.integers(low, high))).tolist() for _ in range(n)]


def alone(model, ids: list[int], n: int, **options) -> tuple[list[int], list[float]]:
    """Greedy tokens of one sequence through the single caches, and each step's top-2 margin."""
    cache = model.make_cache(**options)
    logits = prefill(model, mx.array([ids]), cache, 16)
    tokens, margins = [], []
    for _ in range(n):
        top2 = mx.sort(logits[0])[-2:].tolist()
        margins.append(top2[1] - top2[0])
        tokens.append(int(mx.argmax(logits[0]).item()))
        logits = decode_step(model, mx.array(tokens[-1:]), cache)
    return tokens, margins


def assert_same_greedy(got: list[int], expected: tuple[list[int], list[float]]) -> int:
    """Equal up to and including the first near tie; returns how many tokens were compared."""
    tokens, margins = expected
    near_tie = next((i for i, m in enumerate(margins) if m < MARGIN), len(tokens) - 1)
    assert got[: near_tie + 1] == tokens[: near_tie + 1]
    return near_tie + 1


# -- batch_generate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, dict(max_kv_size=12, kv_keep=2), dict(kv_bits=8, kv_group_size=32)],  # head_dim 16, 32
    ids=["growing", "sinks", "q8"],
)
def test_batch_generate_greedy_equals_each_prompt_alone(tiny, options):
    model, tokenizer = tiny
    if "kv_bits" in options and model.config.head_dim % 32:
        pytest.skip("head_dim not a multiple of the group size")
    batch = prompts(6, seed=1)
    results = mlxinfer.batch_generate(
        model, tokenizer, batch, max_tokens=16, sampling=GREEDY, **options
    )
    compared = 0
    for ids, result in zip(batch, results, strict=True):
        assert result.finish_reason == "length" and len(result.tokens) == 16
        compared += assert_same_greedy(result.tokens, alone(model, ids, 16, **options))
        assert result.text == tokenizer.decode(result.tokens)
        assert result.metrics.prompt_tokens == len(ids) and result.metrics.generated_tokens == 16
    assert compared >= 6 * 16 // 2  # near ties cut the comparison short only now and then


def test_batch_generate_takes_text_or_ids_and_per_prompt_settings(llama):
    model, tokenizer = llama
    texts = ["w5 w6 w7 w8", [11, 12, 13, 14, 15], "w9 w10"]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 3, 4)]
    results = mlxinfer.batch_generate(model, tokenizer, texts, sampling=params)
    assert [len(r.tokens) for r in results] == [5, 3, 4]
    assert [r.metrics.prompt_tokens for r in results] == [4, 5, 2]
    assert results[0].tokens == alone(model, tokenizer.encode(texts[0]), 5)[0]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        mlxinfer.batch_generate(model, tokenizer, texts, sampling=params[:2])
    with pytest.raises(ValueError, match="prompt 1: prompt token ids out of range"):
        mlxinfer.batch_generate(model, tokenizer, [[5, 6], [5, 999]])
    with pytest.raises(ValueError, match="list of prompts"):
        mlxinfer.batch_generate(model, tokenizer, "w5 w6")
    assert mlxinfer.batch_generate(model, tokenizer, []) == []


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(llama, run_ahead):
    """A request's random key is its own: the same seed gives the same tokens alone, in a batch of
    others with other settings, and at another place in the batch."""
    model, tokenizer = llama
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    others = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(
            temperature=1.3,
            top_k=20,
            repetition_penalty=1.2,
            seed=8,
            max_tokens=20,
            ignore_eos=True,
        ),
        GREEDY,
    ]
    ids = prompts(4, seed=3)
    solo = mlxinfer.batch_generate(model, tokenizer, [ids[0]], sampling=mine)[0].tokens
    first = mlxinfer.batch_generate(model, tokenizer, ids, sampling=[mine, *others], max_tokens=20)
    last = mlxinfer.batch_generate(
        model, tokenizer, ids[1:] + ids[:1], sampling=[*others, mine], max_tokens=20
    )
    assert first[0].tokens == solo == last[-1].tokens
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    draws = mlxinfer.batch_generate(model, tokenizer, [ids[0]] * 2, sampling=unseeded)
    assert draws[0].tokens != draws[1].tokens  # 20 draws at temperature 1 over 128 tokens


def test_penalties_use_each_rows_own_history(llama, run_ahead):
    """Repetition penalty in a batch: each row as that request alone (its own window)."""
    model, tokenizer = llama
    params = SamplingParams(repetition_penalty=1.5, max_tokens=12, ignore_eos=True)
    ids = prompts(3, seed=5)
    together = mlxinfer.batch_generate(model, tokenizer, ids, sampling=params)
    for one, result in zip(ids, together, strict=True):
        solo = mlxinfer.batch_generate(model, tokenizer, [one], sampling=params)[0]
        assert result.tokens == solo.tokens


# -- the engine ----------------------------------------------------------------------------------


def test_requests_from_many_threads_all_finish_with_the_right_tokens(llama, run_ahead):
    """32 requests submitted from 4 threads with random delays, max_batch 4: every one ends with
    the tokens it gets alone."""
    model, tokenizer = llama
    batch = prompts(32, seed=9)
    handles: dict[int, mlxinfer.RequestHandle] = {}
    with mlxinfer.Engine(model, tokenizer, max_batch=4) as engine:

        def client(k: int) -> None:
            rng = random.Random(k)
            for i in range(k, 32, 4):
                time.sleep(rng.uniform(0, 0.02))
                handles[i] = engine.submit(batch[i], sampling=GREEDY, max_tokens=10)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {i: h.result(timeout=120) for i, h in handles.items()}
    compared = 0
    for i, result in results.items():
        assert result.finish_reason == "length"
        compared += assert_same_greedy(result.tokens, alone(model, batch[i], 10))
    assert len(results) == 32 and compared >= 32 * 10 // 2
    assert max(r.metrics.queue_ms for r in results.values()) > 0  # some waited for room


def test_streaming_handle_yields_responses_like_stream_generate(llama):
    model, tokenizer = llama
    with mlxinfer.Engine(model, tokenizer) as engine:
        handle = engine.submit("w5 w6 w7", sampling=SamplingParams(max_tokens=6, ignore_eos=True))
        responses = list(handle)
    assert [r.finish_reason for r in responses] == [None] * 5 + ["length"]
    assert responses[-1].metrics.generated_tokens == 6
    assert handle.result().tokens == [r.token for r in responses]


@pytest.mark.parametrize("policy", ["prefill-first", "decode-first", "chunked"])
def test_every_policy_gives_each_request_its_own_tokens(llama, policy, run_ahead):
    """Requests arriving while others decode, long prompts prefilled in chunks: same tokens."""
    model, tokenizer = llama
    batch = prompts(6, seed=11, low=20, high=90)
    with mlxinfer.Engine(model, tokenizer, max_batch=3, policy=policy, prefill_chunk=32) as engine:
        handles = []
        for ids in batch:
            handles.append(engine.submit(ids, sampling=GREEDY, max_tokens=8))
            time.sleep(0.01)
        results = [h.result(timeout=120) for h in handles]
    compared = sum(
        assert_same_greedy(result.tokens, alone(model, ids, 8))
        for ids, result in zip(batch, results, strict=True)
    )
    assert compared >= 6 * 8 // 2


def test_cancel_ends_one_request_and_leaves_the_others(llama, run_ahead):
    model, tokenizer = llama
    batch = prompts(4, seed=13)
    with mlxinfer.Engine(model, tokenizer, max_batch=4) as engine:
        handles = [engine.submit(ids, sampling=GREEDY, max_tokens=40) for ids in batch]
        it = iter(handles[1])
        next(it), next(it)  # it is running
        handles[1].cancel()
        results = [h.result(timeout=120) for h in handles]
    assert results[1].finish_reason == "cancelled" and 2 <= len(results[1].tokens) < 40
    for i in (0, 2, 3):
        assert results[i].finish_reason == "length"
        assert_same_greedy(results[i].tokens, alone(model, batch[i], 40))


def test_a_failing_request_leaves_the_others_untouched(llama, monkeypatch, run_ahead):
    """One request's sampler raises at its fifth token: it ends with 'error' and the reason, the
    others get their tokens."""
    import mlxinfer.runner as runner

    class Failing(runner.Sampler):
        calls = 0

        def __call__(self, logits):
            if self.params.seed == 666:
                Failing.calls += 1
                if Failing.calls == 5:
                    raise RuntimeError("boom")
            return super().__call__(logits)

    monkeypatch.setattr(runner, "Sampler", Failing)
    model, tokenizer = llama
    batch = prompts(3, seed=17)
    bad = SamplingParams(temperature=1.0, seed=666, max_tokens=12, ignore_eos=True)
    with mlxinfer.Engine(model, tokenizer) as engine:
        handles = [
            engine.submit(batch[0], sampling=GREEDY, max_tokens=12),
            engine.submit(batch[1], sampling=bad),
            engine.submit(batch[2], sampling=GREEDY, max_tokens=12),
        ]
        results = [h.result(timeout=120) for h in handles]
    assert results[1].finish_reason == "error" and "boom" in results[1].error
    assert len(results[1].tokens) == 4
    for i in (0, 2):
        assert_same_greedy(results[i].tokens, alone(model, batch[i], 12))


@pytest.mark.parametrize(
    "value, sampling, reason",
    [
        ("nan", GREEDY, "the model produced NaN"),
        ("inf", SamplingParams(temperature=0.7, seed=3, ignore_eos=True), "the model produced"),
        # finite logits that a temperature of 0.5 takes past float32's largest, 3.4e38
        ("3e38", SamplingParams(temperature=0.5, seed=3, ignore_eos=True), "sampling produced"),
    ],
)
def test_logits_that_cannot_be_sampled_end_their_own_request_only(
    llama, monkeypatch, value, sampling, reason
):
    """NaN or infinite logits in one row (injected into the batched forward pass at token 7 from
    the row's fourth token on), from the model or from a sampling stage, end that request with
    'error'; the other rows of the same steps go on unchanged."""
    from mlxinfer.model import Model

    model, tokenizer = llama
    batch = prompts(3, seed=37)
    victim = {"id": 1}  # the second request submitted (ids count from 0)
    real = Model.__call__

    def poisoned(self, tokens, cache=None):
        out = real(self, tokens, cache)
        running = engine.scheduler.running
        rows = [i for i, r in enumerate(running) if r.id == victim.get("id")]
        if rows and cache is engine.scheduler.batch and len(running[rows[0]].stream.tokens) >= 4:
            hit = (mx.arange(out.shape[0]) == rows[0])[:, None, None]
            hit = hit & (mx.arange(out.shape[-1]) == 7)[None, None, :]
            out = mx.where(hit, mx.array(float(value), out.dtype), out)
        return out

    monkeypatch.setattr(Model, "__call__", poisoned)
    with mlxinfer.Engine(model, tokenizer) as engine:
        handles = [
            engine.submit(ids, sampling=sampling if i == 1 else GREEDY, max_tokens=12)
            for i, ids in enumerate(batch)
        ]
        assert handles[1].id == victim["id"]
        results = [h.result(timeout=120) for h in handles]
    assert results[1].finish_reason == "error" and reason in results[1].error
    assert 4 <= len(results[1].tokens) < 12
    for i in (0, 2):
        assert results[i].finish_reason == "length"
        assert_same_greedy(results[i].tokens, alone(model, batch[i], 12))


def test_submit_clips_max_tokens_to_the_context(tmp_path):
    """One rule at every entry point (stream_generate, batch_generate, the Engine): max_tokens past
    the context the prompt leaves is clipped, and the reply ends there with "length". (The Engine
    refused such a request, so a long conversation worked through the API but not in the
    dashboard's chat.)"""
    make_tiny_checkpoint(tmp_path, "llama", max_position_embeddings=64)
    model, tokenizer = mlxinfer.load(tmp_path)
    params = SamplingParams(ignore_eos=True)
    with mlxinfer.Engine(model, tokenizer) as engine:
        handle = engine.submit(list(range(3, 53)), params, max_tokens=100)
        assert handle.max_tokens == 14
        result = handle.result(timeout=60)
    assert result.finish_reason == "length" and len(result.tokens) == 14
    alone = list(mlxinfer.stream_generate(model, tokenizer, list(range(3, 53)), 100, params))
    assert alone[-1].finish_reason == "length" and len(alone) == 14


def test_submit_refuses_what_can_never_run(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama", max_position_embeddings=1024)
    model, tokenizer = mlxinfer.load(tmp_path)
    # KV storage comes in blocks of 256 tokens: room for a short request, not for 700 tokens.
    per_block = 2**-20 * 512 * 256  # 2 layers x (k, v) x 2 heads x 16 dims x 4 bytes, per token
    with mlxinfer.Engine(model, tokenizer, kv_budget_mb=3 * per_block) as engine:
        with pytest.raises(ValueError, match="1024 tokens, which leaves no room in the model's"):
            engine.submit([5] * 1024)
        with pytest.raises(ValueError, match="kv_budget_mb"):
            engine.submit(list(range(3, 103)), max_tokens=600)
        with pytest.raises(ValueError, match="logit_bias"):
            engine.submit([5, 6], sampling=SamplingParams(logit_bias={500: 1.0}))
        with pytest.raises(ValueError, match="logprobs"):
            engine.submit([5, 6], sampling=SamplingParams(logprobs=1000))
        with pytest.raises(ValueError, match="empty"):
            engine.submit("")
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit([5, 6], max_tokens=0)
        assert engine.submit([5, 6], max_tokens=2).result(timeout=60).finish_reason
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([5, 6])
    for bad in (
        dict(max_batch=0),
        dict(policy="fastest"),
        dict(kv_budget_mb=-1),
        dict(kv_budget_mb=True),  # a bool is not a size
        dict(prefix_cache_mb=False),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mlxinfer.Engine(model, tokenizer, **bad)


def test_kv_budget_limits_what_runs_at_once(llama):
    """A budget for about two requests: the others wait (queue_ms), all finish correctly, and the
    batch never holds more KV than the budget."""
    from mlxinfer.scheduler import EngineOptions, Request, Scheduler

    model, tokenizer = llama
    probe = Scheduler(model, tokenizer)
    budget = 2.5 * probe.kv_bytes(1, 60) / 2**20 + 2 * probe.kv_bytes(1, 40) / 2**20
    scheduler = Scheduler(model, tokenizer, EngineOptions(max_batch=8, kv_budget_mb=budget))
    batch = prompts(6, seed=19, low=30, high=40)
    requests = [Request(i, ids, GREEDY, 20) for i, ids in enumerate(batch)]
    for r in requests:
        scheduler.check(r)
        scheduler.add(r)
    most, tokens = 0, {r.id: [] for r in requests}
    while scheduler.has_work():
        for request, response in scheduler.step():
            tokens[request.id].append(response.token)
        most = max(most, len(scheduler.running) + len(scheduler.prefilling))
        assert sum(c.nbytes for c in scheduler.batch) <= budget * 2**20
    assert most == 2
    compared = sum(
        assert_same_greedy(tokens[r.id], alone(model, r.prompt_ids, 20)) for r in requests
    )
    assert compared >= 6 * 20 // 2


def test_close_finishes_or_cancels_what_is_in_flight(llama):
    model, tokenizer = llama
    engine = mlxinfer.Engine(model, tokenizer, max_batch=2)
    handles = [engine.submit(ids, sampling=GREEDY, max_tokens=6) for ids in prompts(4, seed=23)]
    engine.close()
    assert [h.result(timeout=0).finish_reason for h in handles] == ["length"] * 4
    engine = mlxinfer.Engine(model, tokenizer, max_batch=2)
    handles = [engine.submit(ids, sampling=GREEDY, max_tokens=200) for ids in prompts(4, seed=23)]
    next(iter(handles[0]))
    engine.close(cancel=True)
    reasons = [h.result(timeout=0).finish_reason for h in handles]
    assert reasons.count("cancelled") == 4
    assert not engine._worker.thread.is_alive()


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mlxinfer-engine"]


def test_a_dropped_engine_stops_its_thread(llama):
    model, tokenizer = llama
    before = len(engine_threads())
    for _ in range(10):
        engine = mlxinfer.Engine(model, tokenizer)
        engine.submit([5, 6, 7], sampling=GREEDY, max_tokens=2).result(timeout=60)
    running = mlxinfer.Engine(model, tokenizer)  # dropped mid-request: cancelled, then stopped
    next(iter(running.submit([5, 6, 7], sampling=GREEDY, max_tokens=200)))
    del engine, running
    gc.collect()
    deadline = time.monotonic() + 30
    while len(engine_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine_threads()) == before


def test_close_frees_the_prefix_cache(llama):
    model, tokenizer = llama
    engine = mlxinfer.Engine(model, tokenizer)
    engine.submit(list(range(3, 100)), sampling=GREEDY, max_tokens=2).result(timeout=60)
    assert engine.stats["prefix_cache_mb"] > 0
    engine.close()
    assert engine.stats["prefix_cache_mb"] == 0
    assert engine.scheduler.prefix_cache.entries == {}


# -- the prefix cache ----------------------------------------------------------------------------


def test_prefix_cache_reuses_a_shared_prefix_with_the_same_results(llama, run_ahead):
    model, tokenizer = llama
    rng = np.random.default_rng(29)
    system = rng.integers(3, 128, 120).tolist()
    first, second = system + [7, 8, 9], system + [10, 11]
    with mlxinfer.Engine(model, tokenizer) as engine:
        a = engine.submit(first, sampling=GREEDY, max_tokens=8).result(timeout=60)
        b = engine.submit(second, sampling=GREEDY, max_tokens=8).result(timeout=60)
        again = engine.submit(second, sampling=GREEDY, max_tokens=8).result(timeout=60)
    assert a.metrics.cached_prompt_tokens == 0
    assert b.metrics.cached_prompt_tokens == 120
    assert again.metrics.cached_prompt_tokens == len(second) - 1  # all but the last token
    assert_same_greedy(b.tokens, alone(model, second, 8))
    assert again.tokens == b.tokens


def test_prefix_cache_hit_gives_the_logits_of_a_cold_prefill(llama):
    from mlxinfer.prefix_cache import PrefixCache

    model, _ = llama
    rng = np.random.default_rng(31)
    shared = rng.integers(3, 128, 70).tolist()
    cache = model.make_cache()
    prefill(model, mx.array([shared + [5, 6, 7]]), cache, 32)
    prefixes = PrefixCache(2**24)
    prefixes.store(shared + [5, 6, 7], cache)
    prompt = shared + [9, 10, 11, 12]
    matched, key = prefixes.lookup(prompt)
    assert matched == 70
    warm = model.make_cache()
    prefixes.restore(key, matched, warm)
    hit = prefill(model, mx.array([prompt[matched:]]), warm, 32)
    cold = prefill(model, mx.array([prompt]), model.make_cache(), 32)
    np.testing.assert_allclose(np.array(hit), np.array(cold), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_prefix_cache_hit_is_as_close_to_exact_as_a_cold_prefill(bits, tmp_path):
    """With 8- or 4-bit caches a hit is not bit-identical to a cold prefill: the prefix's keys,
    computed in passes of other shapes, can round across a quantization step (on the default model
    the first logits differed by up to 0.086 at 8 bits; benchmarks/prefix_cache_fidelity.py). What
    holds: the hit is as close to the unquantized answer as a cold quantized prefill is."""
    from mlxinfer.prefix_cache import PrefixCache

    make_tiny_checkpoint(tmp_path, "llama", head_dim=32)
    model, _ = mlxinfer.load(tmp_path)
    options = dict(kv_bits=bits, kv_group_size=32)
    for seed in range(3):
        shared = np.random.default_rng(seed).integers(3, 128, 70).tolist()
        cache = model.make_cache(**options)
        prefill(model, mx.array([shared + [5, 6, 7]]), cache, 32)
        prefixes = PrefixCache(2**24)
        prefixes.store(shared + [5, 6, 7], cache)
        prompt = shared + [9, 10, 11, 12]
        matched, key = prefixes.lookup(prompt)
        warm = model.make_cache(**options)
        prefixes.restore(key, matched, warm)
        hit = np.array(prefill(model, mx.array([prompt[matched:]]), warm, 32))
        cold = np.array(prefill(model, mx.array([prompt]), model.make_cache(**options), 32))
        exact = np.array(prefill(model, mx.array([prompt]), model.make_cache(), 32))
        cold_error = np.abs(cold - exact).max()  # measured 0.014-0.022 (8-bit), 0.18-0.34 (4-bit)
        assert cold_error > 0  # the cache is quantized
        assert np.abs(hit - exact).max() <= 1.5 * cold_error


def test_prefix_cache_is_bounded_and_evicts_the_least_recently_used(llama):
    from mlxinfer.prefix_cache import PrefixCache

    model, _ = llama
    entries = []
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(3, 128, 40).tolist()
        cache = model.make_cache()
        prefill(model, mx.array([ids]), cache, 64)
        entries.append((ids, cache))
    one = PrefixCache(2**30)
    one.store(*entries[0])
    prefixes = PrefixCache(int(2.5 * one.nbytes))
    prefixes.store(*entries[0])
    prefixes.store(*entries[1])
    assert prefixes.lookup(entries[0][0] + [1])[0] == 40  # entry 0 is now the most recent
    prefixes.store(*entries[2])  # no room for three: entry 1 goes
    assert prefixes.nbytes <= prefixes.max_bytes
    assert prefixes.lookup(entries[1][0] + [1])[0] == 0
    assert prefixes.lookup(entries[0][0] + [1])[0] == 40


def test_the_next_turn_reuses_the_previous_reply(llama, run_ahead):
    """A finished request's prompt and reply stay in the prefix cache: a follow-up that starts
    with both computes only what is new, with the tokens of a cold run."""
    model, tokenizer = llama
    first = np.random.default_rng(41).integers(3, 128, 40).tolist()
    with mlxinfer.Engine(model, tokenizer) as engine:
        reply = engine.submit(first, sampling=GREEDY, max_tokens=10).result(timeout=60)
        follow_up = first + reply.tokens + [7, 8, 9]
        again = engine.submit(follow_up, sampling=GREEDY, max_tokens=6).result(timeout=60)
    # everything the first request fed to the model: its prompt and all but its last token
    # (with a step run ahead, that one too)
    assert again.metrics.cached_prompt_tokens == len(first) + 10 - (0 if run_ahead else 1)
    assert_same_greedy(again.tokens, alone(model, follow_up, 6))


def test_result_timeout_is_a_deadline(llama):
    model, tokenizer = llama
    with mlxinfer.Engine(model, tokenizer) as engine:
        handle = engine.submit([5, 6, 7], sampling=GREEDY, max_tokens=240)
        with pytest.raises(TimeoutError, match="did not finish in 0.02 s"):
            handle.result(timeout=0.02)  # tokens keep coming, but not all of them in time
        assert handle.result(timeout=120).finish_reason == "length"


def test_a_request_that_cannot_start_fails_alone_when_prefilled_with_others(llama, monkeypatch):
    """Short prompts are prefilled together; one whose sampler cannot be built ends with 'error'
    and the engine goes on."""
    import mlxinfer.runner as runner

    class Picky(runner.Sampler):
        def __init__(self, params, *args):
            if params.seed == 666:
                raise RuntimeError("no such sampler")
            super().__init__(params, *args)

    monkeypatch.setattr(runner, "Sampler", Picky)
    model, tokenizer = llama
    bad = SamplingParams(temperature=1.0, seed=666, max_tokens=4)
    with mlxinfer.Engine(model, tokenizer) as engine:
        handles = [
            engine.submit([5, 6, 7], sampling=GREEDY, max_tokens=4),
            engine.submit([8, 9, 10], sampling=bad),
            engine.submit([11, 12], sampling=GREEDY, max_tokens=4),
        ]
        results = [h.result(timeout=60) for h in handles]
        later = engine.submit([5, 6], sampling=GREEDY, max_tokens=2).result(timeout=60)
    assert results[1].finish_reason == "error" and "no such sampler" in results[1].error
    assert [results[0].finish_reason, results[2].finish_reason, later.finish_reason] == [
        "length"
    ] * 3


def test_kv_cache_mb_counts_the_tokens_held(llama):
    """2 layers x (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 bytes a token, whether the request
    ends at its first token (its prefill cache) or later (its batch row)."""
    model, tokenizer = llama
    prompt = list(range(3, 13))  # 10 tokens
    with mlxinfer.Engine(model, tokenizer) as engine:
        one = engine.submit(prompt, sampling=GREEDY, max_tokens=1).result(timeout=60)
        five = engine.submit(prompt[::-1], sampling=GREEDY, max_tokens=5).result(timeout=60)
    assert one.metrics.kv_cache_mb * 2**20 == 512 * 10
    assert five.metrics.kv_cache_mb * 2**20 == 512 * (10 + 5 - 1)


def test_prefix_cache_keeps_one_entry_for_a_prompt_and_its_conversation(llama):
    from mlxinfer.prefix_cache import PrefixCache

    model, _ = llama
    ids = np.random.default_rng(43).integers(3, 128, 60).tolist()
    cache = model.make_cache()
    prefill(model, mx.array([ids]), cache, 64)
    prefixes = PrefixCache(2**24)
    prefixes.store(ids, cache)
    prefixes.store(ids[:40], cache)  # already covered by the longer entry
    assert len(prefixes.entries) == 1


def test_call_runs_work_on_the_engine_thread_between_steps(llama):
    """Engine.call: a function runs on the engine's own thread (where the model's MLX work
    belongs), its result or exception returned, while requests keep being served."""
    model, tokenizer = llama
    with mlxinfer.Engine(model, tokenizer, max_batch=2) as engine:
        handle = engine.submit([5, 6, 7], max_tokens=20, sampling=SamplingParams(ignore_eos=True))
        thread = engine.call(lambda: threading.current_thread().name)
        assert thread == "mlxinfer-engine"
        logits = engine.call(lambda: np.array(model(mx.array([[5, 6, 7]]))[0, -1]))
        assert logits.shape == (model.config.vocab_size,)
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0)
        assert handle.result(timeout=60).finish_reason == "length"
    with pytest.raises(RuntimeError, match="closed"):
        engine.call(lambda: None)


@pytest.mark.parametrize("exception", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_call_that_raises_any_base_exception_reaches_its_caller(llama, exception):
    """A called function that raises SystemExit (or any BaseException) used to kill the engine's
    thread, and its caller waited for ever: now the caller gets it, and the engine serves on."""
    model, tokenizer = llama

    def raise_it():
        raise exception

    with mlxinfer.Engine(model, tokenizer, max_batch=2) as engine:
        handle = engine.submit([5, 6, 7], max_tokens=20, sampling=SamplingParams(ignore_eos=True))
        with pytest.raises(type(exception)):
            engine.call(raise_it, timeout=60)
        assert engine.call(lambda: threading.current_thread().name, timeout=60) == "mlxinfer-engine"
        assert handle.result(timeout=60).finish_reason == "length"
        after = engine.submit([8, 9], max_tokens=5, sampling=SamplingParams(ignore_eos=True))
        assert len(after.result(timeout=60).tokens) == 5
