"""Speculative decoding (mlxinfer/speculative.py, the runner's verify pass): greedy tokens equal
plain decoding's, whoever proposes (prompt lookup; an oracle always right; one always wrong),
alone and batched, for every cache kind; the caches keep exactly the accepted tokens (against a
cold prefill); sampled rows draw from exactly the plain sampling distribution (chi-square); the
same seed gives the same tokens alone and batched. Every family mlxinfer loads, dense and MoE.

Greedy runs are compared with plain decoding (single caches, one token a step: test_engine.py's
`alone`) up to the first near tie, as test_engine.py does: a verify pass computes a row's logits
with other kernels than a decode step (T queries at once), and past a near tie float rounding may
rightly pick the other token."""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
import mlxinfer.runner
from mlxinfer import SamplingParams
from mlxinfer.batch_cache import RING_SLACK, make_batch_cache
from mlxinfer.cache import KVCache
from mlxinfer.sampling import Sampler
from mlxinfer.speculative import DraftModel, PassCost, PromptLookup, verify
from mlxinfer.steps import prefill, verify_step

from .reference import make_tiny_checkpoint
from .test_engine import alone, assert_same_greedy, prompts
from .test_model import CASES as TEST_MODEL_CASES
from .test_moe import CASES as TEST_MOE_CASES
from .test_sampling import CHI2_CRITICAL

# Every family mlxinfer loads (config.FAMILIES), each with what sets it apart; head_dim 32 where
# the family takes it, so that the q8 cache (groups of 32) runs too.
CASES = {
    "llama": ("llama", dict(head_dim=32)),
    "mistral-window": ("mistral", dict(sliding_window=8, head_dim=32)),
    "gemma2": ("gemma2", {}),  # soft-capped attention and logits, sandwich norms
    "gemma3-local-rope": ("gemma3_text", TEST_MODEL_CASES["gemma3-local-rope"][1]),
    "qwen2-qkv-bias": ("qwen2", dict(hidden_size=128, tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=32)),
    "phi3-fused-partial-rotary": (
        "phi3",
        dict(hidden_size=128, num_key_value_heads=4, partial_rotary_factor=0.5),
    ),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=32)),
    "qwen2-moe-shared": ("qwen2_moe", TEST_MOE_CASES["qwen2_moe-shared-expert"][1]),
    "qwen3-moe": ("qwen3_moe", TEST_MOE_CASES["qwen3_moe-top3-qk-norm"][1]),
}
CACHES = {
    "growing": {},
    "sinks": dict(max_kv_size=12, kv_keep=2),
    "q8": dict(kv_bits=8, kv_group_size=32),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(path, family, **overrides)
    return mlxinfer.load(path)


# -- the proposer ----------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    #          0  1  2  3  4  5  6  7  8  9 10 11 12
    history = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 6, 7]
    # the suffix (6, 7) last appeared at 6-7 (followed by 2, 3, 4); (4, 6, 7) never did
    assert lookup.propose(history, 3) == [2, 3, 4]
    assert lookup.propose(history, 1) == [2]
    assert lookup.propose([*history[:-1], 8, 9], 5) == [1, 6, 7, 2, 3]  # (8, 9) at 3-4
    assert lookup.propose([1, 2, 3, 4], 4) == []  # no bigram repeats
    assert lookup.propose([1, 2, 1], 4) == []  # a lone token is not evidence enough here
    assert PromptLookup(1, 1).propose([1, 2, 1], 4) == [2, 1]
    longest = PromptLookup(max_ngram=3, min_ngram=1)
    # (2, 3) matches at the start and later; the 3-gram (1, 2, 3) only at the start
    assert longest.propose([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 2) == [9, 2]
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(2, 3)


def test_speculation_settings_are_checked():
    with pytest.raises(ValueError, match="speculation must be None or 'prompt-lookup' or 'draft'"):
        SamplingParams(speculation="draft-model")
    with pytest.raises(ValueError, match=f"num_draft must be at most {RING_SLACK}"):
        SamplingParams(speculation="prompt-lookup", num_draft=RING_SLACK + 1)
    with pytest.raises(ValueError, match="num_draft must be an integer >= 1"):
        SamplingParams(num_draft=0)
    with pytest.raises(ValueError, match="lookup_ngram must be an integer >= 1"):
        SamplingParams(lookup_ngram=0)


# -- greedy: the same tokens -------------------------------------------------------------------


class Oracle:
    """Proposes plain decoding's own continuation (always right up to a near tie), or with
    `wrong`, a token that is never it (every proposal rejected)."""

    def __init__(self, references: dict[tuple, list[int]], vocab: int, wrong: bool = False):
        self.references, self.vocab, self.wrong = references, vocab, wrong

    def propose(self, history, k):
        for prompt, tokens in self.references.items():
            if tuple(history[: len(prompt)]) == prompt:
                done = len(history) - len(prompt)
                proposed = tokens[done : done + k]
                return [(t + 1) % self.vocab for t in proposed] if self.wrong else proposed
        raise AssertionError("no reference for this history")


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat themselves, so that prompt lookup finds n-grams to propose."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        phrase = rng.integers(3, 128, int(rng.integers(3, 7))).tolist()
        out.append((phrase * 6)[: int(rng.integers(12, 30))])
    return out


@pytest.mark.exactness
@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("proposer", ["lookup", "oracle", "wrong"])
def test_greedy_tokens_are_plain_decodings_alone_and_batched(tiny, cache, proposer, monkeypatch):
    model, tokenizer = tiny
    options = CACHES[cache]
    if "kv_bits" in options and model.config.head_dim % options["kv_group_size"]:
        pytest.skip("head_dim not a multiple of the group size")
    n = 20
    batch = repetitive_prompts(3, seed=2) + prompts(2, seed=3)
    expected = {tuple(ids): alone(model, ids, n, **options) for ids in batch}
    if proposer != "lookup":
        references = {prompt: tokens for prompt, (tokens, _) in expected.items()}
        oracle = Oracle(references, model.config.vocab_size, wrong=proposer == "wrong")
        monkeypatch.setattr(mlxinfer.runner, "make_proposer", lambda *args: oracle)
    spec = SamplingParams(ignore_eos=True, speculation="prompt-lookup", num_draft=5)
    plain = SamplingParams(ignore_eos=True)
    # alone, and batched with a row that does not speculate
    results = [
        mlxinfer.batch_generate(model, tokenizer, [ids], max_tokens=n, sampling=spec, **options)[0]
        for ids in batch[:2]
    ]
    mixed = [spec] * len(batch) + [plain]
    results += mlxinfer.batch_generate(
        model, tokenizer, [*batch, batch[-1]], max_tokens=n, sampling=mixed, **options
    )
    compared = proposed = accepted = 0
    for ids, result in zip(batch[:2] + batch + batch[-1:], results, strict=True):
        assert result.finish_reason == "length" and len(result.tokens) == n
        compared += assert_same_greedy(result.tokens, expected[tuple(ids)])
        proposed += result.metrics.draft_tokens
        accepted += result.metrics.accepted_draft_tokens
    assert compared >= len(results) * n // 2
    assert results[-1].metrics.draft_tokens == 0  # the plain row
    if proposer == "wrong":
        assert proposed > 0 and accepted == 0
    elif proposer == "oracle":
        assert accepted > 0.5 * proposed > 0
    else:
        assert proposed > 0  # the repetitive prompts give lookups something to find


# -- rollback -------------------------------------------------------------------------------------


@pytest.mark.exactness
@pytest.mark.parametrize("cache", sorted(CACHES))
def test_after_rejections_the_caches_hold_exactly_the_accepted_tokens(tiny, cache):
    """Two rows run a verify pass of 1 + 5 tokens; row 0 keeps 2 of them, row 1 keeps 6; then
    a verify pass again (keeping 4 and 1) and one decode step: each row's logits equal a cold
    prefill of the tokens it kept, over a window and a ring that wrap."""
    model, _ = tiny
    options = CACHES[cache]
    if "kv_bits" in options and model.config.head_dim % options["kv_group_size"]:
        pytest.skip("head_dim not a multiple of the group size")
    rng = np.random.default_rng(7)
    histories = [rng.integers(3, 128, 9).tolist(), rng.integers(3, 128, 14).tolist()]
    template = model.make_cache(**options)
    rows, batch = make_batch_cache(template, 4, RING_SLACK)
    for ids in histories:
        single = model.make_cache(**options)
        prefill(model, mx.array([ids[:-1]]), single, 16)
        rows.add(single[0].offset)
        for b, s in zip(batch, single, strict=True):
            b.add_row(s)
    for keep in ([2, 6], [4, 1]):
        fed = [rng.integers(3, 128, 6).tolist() for _ in histories]
        for row, history in enumerate(histories):
            fed[row][0] = history[-1]  # each row's last token comes first
        verify_step(model, mx.array(fed), batch)
        rows.advance(keep)
        for row, n in enumerate(keep):
            # kept: the last token and n - 1 proposals; the model's own token comes next
            histories[row] = histories[row][:-1] + fed[row][:n] + [int(rng.integers(3, 128))]
    logits = verify_step(model, mx.array([[h[-1]] for h in histories]), batch)[:, -1]
    for row, history in enumerate(histories):
        cold = prefill(model, mx.array([history]), model.make_cache(**options), 16)[0]
        assert mx.allclose(logits[row], cold, atol=2e-4 if "kv_bits" not in options else 0.05)


# -- sampling: the same distribution ---------------------------------------------------------


@pytest.mark.exactness
def test_sampled_tokens_follow_plain_samplings_distribution(llama_model):
    """The first two tokens after a fixed prefix, 20,000 seeded draws through `verify` with two
    proposals (a likely token, then a plausible one), with top-k, top-p, min-p, temperature and
    the three penalties on: their frequencies against the distribution plain sampling draws from
    (computed from the model's logits by `reference_distribution`), by chi-square."""
    model = llama_model
    V = model.config.vocab_size
    prompt = [5, 9, 17, 33, 9, 17, 64, 9]
    params = SamplingParams(
        temperature=0.9,
        top_k=24,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
    )

    def chain(history: list[int]) -> np.ndarray:
        """Plain sampling's distribution of the token after `history`, from the model's logits
        by the chain's definitions in numpy (not sampling.py's code)."""
        logits = np.array(model(mx.array([history]))[0, -1], dtype=np.float64)
        return reference_distribution(logits, params, history, history[len(prompt) :])

    first = chain(prompt)
    d1 = int(np.argsort(-first)[1])  # the second most likely: accepted about half the time
    second_after_d1 = chain(prompt + [d1])
    d2 = int(np.argsort(-second_after_d1)[0])
    expected = {}
    for t1 in np.flatnonzero(first):
        after = second_after_d1 if t1 == d1 else chain(prompt + [int(t1)])
        for t2 in np.flatnonzero(after):
            expected[(int(t1), int(t2))] = first[t1] * after[t2]

    logits = model(mx.array([prompt + [d1, d2]]))[0, len(prompt) - 1 :]  # [3, V]
    second_logits = {}
    counts: dict[tuple[int, int], int] = {}
    draws = 20_000
    for seed in range(draws):
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), V, prompt)
        verdict = verify(sampler, logits, [d1, d2])
        kept, invalid = verdict.tokens()
        assert not invalid
        if len(kept) == 1:  # rejected at once: the second token comes from a plain step
            sampler.record(kept)
            sampler.key = verdict.key_after(1)  # (as the runner moves it)
            t1 = kept[0]
            if t1 not in second_logits:
                second_logits[t1] = model(mx.array([prompt + [t1]]))[:, -1]
            kept.append(int(sampler(second_logits[t1]).item()))
        pair = (kept[0], kept[1])
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) <= set(expected)  # nothing outside the filters' support
    # the 8 likeliest pairs and the rest pooled: 8 degrees of freedom
    top = sorted(expected, key=expected.get, reverse=True)[:8]
    observed = np.array([counts.get(pair, 0) for pair in top] + [0], dtype=float)
    observed[-1] = draws - observed[:-1].sum()
    wanted = np.array([expected[pair] for pair in top] + [0.0]) * draws
    wanted[-1] = draws - wanted[:-1].sum()
    assert wanted.min() >= 5  # a distribution, not a near-certain pair
    stat = float(((observed - wanted) ** 2 / wanted).sum())
    assert stat < CHI2_CRITICAL[8], f"chi-square {stat:.1f} with 8 dof: {observed} {wanted}"
    accepted_first = sum(n for (t1, _), n in counts.items() if t1 == d1) / draws
    assert math.isclose(accepted_first, first[d1], abs_tol=0.02)


def reference_distribution(
    logits: np.ndarray, params: SamplingParams, context: list[int], generated: list[int]
) -> np.ndarray:
    """The distribution sampling draws the next token from, straight from the definitions:
    repetition penalty over the last `repetition_context_size` tokens of the context (a positive
    logit divided, a negative one multiplied), OpenAI's presence and frequency penalties over the
    generated tokens, then top-k, top-p (the likeliest tokens until the mass before a token
    reaches p), min-p (probability >= min_p x the top one's) and the temperature."""
    x = logits.copy()
    for t in set(context[-params.repetition_context_size :]):
        x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    counts = np.bincount(np.array(generated, dtype=np.int64), minlength=len(x))
    x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    keep[order[: params.top_k]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    keep[order[mass_before >= params.top_p]] = False
    keep &= x >= x[keep].max() + math.log(params.min_p)
    q = np.where(keep, np.exp((x - x.max()) / params.temperature), 0.0)
    return q / q.sum()


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint(path, "llama")
    return mlxinfer.load(path)[0]


@pytest.mark.exactness
@pytest.mark.parametrize("proposer", ["lookup", "oracle"])
def test_the_same_seed_gives_plain_samplings_tokens_alone_and_batched(
    tmp_path, proposer, monkeypatch
):
    """Sampled rows with speculation draw plain sampling's own tokens for their seed (verify
    draws each position with the key plain sampling would use), alone and batched; an oracle
    that proposes exactly those tokens has them accepted."""
    make_tiny_checkpoint(tmp_path, "llama")
    model, tokenizer = mlxinfer.load(tmp_path)
    batch = repetitive_prompts(4, seed=5)
    params = [
        SamplingParams(
            temperature=0.8,
            top_p=0.95,
            repetition_penalty=1.1,
            seed=100 + i,
            ignore_eos=True,
            speculation="prompt-lookup",
            num_draft=4,
            lookup_ngram=1,  # (a random model rarely repeats a bigram of its prompt)
        )
        for i in range(len(batch))
    ]
    plain = [replace(p, speculation=None) for p in params]
    without = mlxinfer.batch_generate(model, tokenizer, batch, max_tokens=24, sampling=plain)
    if proposer == "oracle":
        references = {tuple(ids): r.tokens for ids, r in zip(batch, without, strict=True)}
        oracle = Oracle(references, model.config.vocab_size)
        monkeypatch.setattr(mlxinfer.runner, "make_proposer", lambda *args: oracle)
    together = mlxinfer.batch_generate(model, tokenizer, batch, max_tokens=24, sampling=params)
    for ids, p, result, reference in zip(batch, params, together, without, strict=True):
        lone = mlxinfer.batch_generate(model, tokenizer, [ids], max_tokens=24, sampling=p)[0]
        assert lone.tokens == result.tokens == reference.tokens
    proposed = sum(r.metrics.draft_tokens for r in together)
    accepted = sum(r.metrics.accepted_draft_tokens for r in together)
    assert proposed > 0
    if proposer == "oracle":
        assert accepted == proposed


@pytest.mark.exactness
def test_a_speculating_row_gives_each_tokens_logprobs_from_its_own_position(tmp_path, monkeypatch):
    """logprobs with speculation: every token of a verify pass (accepted proposals and the
    model's own) carries the model's log-softmax at its position, as a full forward gives it."""
    make_tiny_checkpoint(tmp_path, "llama")
    model, tokenizer = mlxinfer.load(tmp_path)
    prompt = repetitive_prompts(1, seed=11)[0]
    n = 16
    reference, _ = alone(model, prompt, n)
    oracle = Oracle({tuple(prompt): reference}, model.config.vocab_size)
    monkeypatch.setattr(mlxinfer.runner, "make_proposer", lambda *args: oracle)
    params = SamplingParams(ignore_eos=True, logprobs=3, speculation="prompt-lookup", num_draft=4)
    responses = list(mlxinfer.stream_generate(model, tokenizer, prompt, n, sampling=params))
    tokens = [r.token for r in responses]
    assert responses[-1].metrics.accepted_draft_tokens > 0  # passes of several tokens
    logits = np.array(model(mx.array([prompt + tokens])), dtype=np.float64)[0]
    for i, r in enumerate(responses):
        row = logits[len(prompt) - 1 + i]
        log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert r.logprobs.logprob == pytest.approx(log_softmax[r.token], abs=5e-4)
        fourth = np.sort(log_softmax)[-4]
        for token, value in r.logprobs.top:
            assert value == pytest.approx(log_softmax[token], abs=5e-4)
            assert value >= fourth - 1e-3  # among the three likeliest (up to rounding)


def test_a_verify_pass_penalises_each_position_as_if_the_proposals_were_generated():
    """`process_ahead` row i equals the penalty stage of a sampler that generated proposals
    0..i-1 (repetition window, presence and frequency counts, logit bias)."""
    params = SamplingParams(
        temperature=0.7,
        repetition_penalty=1.5,
        repetition_context_size=4,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={3: 1.0},
    )
    prompt, proposals = [1, 2, 3, 4, 5], [6, 6, 2]
    logits = mx.array(np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    ahead = Sampler(params, 16, prompt).process_ahead(logits, proposals)
    for i in range(4):
        plain = Sampler(params, 16, prompt, proposals[:i]).process(logits[i : i + 1])
        assert mx.array_equal(ahead[i : i + 1], plain), i


def test_a_row_checks_as_many_proposals_as_its_record_says_are_worth_it():
    from mlxinfer.speculative import acceptance, decayed, draft_length

    assert acceptance(0, 0) == 0.5
    assert draft_length(6, 0, 0, 0.5) == 1  # the prior: one proposal, a probe
    assert draft_length(6, 0, 1, 0.5) == 0  # rejected: none
    assert draft_length(6, 2, 0, 0.5) == 2  # 3/4: (3/4)^2 = 0.56, (3/4)^3 = 0.42
    assert draft_length(6, 30, 0, 0.5) == 6  # a run of copied text: num_draft
    assert draft_length(4, 30, 0, 0.5) == 4
    assert draft_length(6, 1, 1, 0.2) == 2  # a GPU's threshold: (1/2)^2 >= 0.2 > (1/2)^3
    rejected, steps = 1.0, 0
    while rejected:  # a row that gave up probes again after a while
        rejected, steps = decayed(rejected), steps + 1
    assert 20 < steps < 40 and draft_length(6, 0, rejected, 0.5) == 1


def test_a_batch_checks_the_width_that_keeps_the_most_tokens_a_second():
    from mlxinfer.speculative import PassCost, width

    cost = PassCost()
    proposals = {0: [1, 2, 3, 4], 2: [5, 6]}
    assert cost.predict(8) is None and width(cost, 4, proposals, {0: 0.9, 2: 0.9}) == 5
    for _ in range(5):  # a CPU: 10 ms a pass plus 5 ms a token
        cost.observe(4, 0.03)
        cost.observe(12, 0.07)
    assert cost.predict(20) == pytest.approx(0.11)
    assert width(cost, 4, proposals, {0: 0.3, 2: 0.3}) == 1  # a plain step does better
    # two rows of four copying: the others' padding costs more than the copies save
    assert width(cost, 4, proposals, {0: 0.99, 2: 0.99}) == 1
    every = {row: [1, 2, 3, 4] for row in range(4)}  # every row copying: all of them
    assert width(cost, 4, every, dict.fromkeys(range(4), 0.99)) == 5
    flat = PassCost()
    for _ in range(5):  # a GPU: a pass costs the same whatever it checks
        flat.observe(4, 0.02)
        flat.observe(12, 0.02)
    assert width(flat, 4, proposals, {0: 0.2, 2: 0.2}) == 5


@pytest.mark.exactness
def test_a_batch_a_plain_row_started_keeps_its_rings_tight_and_checks_nothing(tiny):
    """Rings get their slack only when the batch's first row speculates (the slack costs a
    mask every step); in a batch a plain row started, rows that ask for speculation decode
    plainly where the model has rings, and generate the same tokens."""
    model, tokenizer = tiny
    options = CACHES["sinks"]
    batch = repetitive_prompts(3, seed=4)
    plain = SamplingParams(ignore_eos=True)
    spec = SamplingParams(ignore_eos=True, speculation="prompt-lookup", num_draft=4)
    results = mlxinfer.batch_generate(
        model, tokenizer, batch, max_tokens=12, sampling=[plain, spec, spec], **options
    )
    for ids, result in zip(batch, results, strict=True):
        assert_same_greedy(result.tokens, alone(model, ids, 12, **options))
        assert result.metrics.draft_tokens == 0


# -- a draft model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafts(tiny, tmp_path_factory):
    """For each tiny target, a draft of the same family and vocabulary with other random weights
    (its greedy tokens are almost never the target's)."""
    model, _ = tiny
    family = model.config.model_type
    overrides = {**next(o for f, o in CASES.values() if f == family), "num_hidden_layers": 1}
    if "layer_types" in overrides:  # (one per layer)
        overrides["layer_types"] = overrides["layer_types"][:1]
    path = tmp_path_factory.mktemp(f"{family}-draft")
    make_tiny_checkpoint(path, family, seed=7, **overrides)
    return mlxinfer.load(path)[0]


@pytest.mark.exactness
def test_a_draft_model_proposes_its_greedy_continuation_and_forgets_rejected_tokens(tiny):
    """DraftModel.propose: the draft's own greedy continuation (here the target itself, so
    plain decoding's tokens, up to a near tie); when the history then departs from what it
    proposed, its caches are trimmed back and hold exactly what it has seen (against a cold
    prefill of those tokens)."""
    model, _ = tiny
    draft = DraftModel(model, model.config.vocab_size)
    history = prompts(1, seed=11)[0]
    assert_same_greedy(draft.propose(history, 5), alone(model, history, 5))
    rows = draft.batch.rows  # (its own batch: one row)
    assert len(draft.seen) == len(history) + 4 == rows.offsets[0]
    # the target kept 2 of the 5 proposals, then a token of its own (not the draft's third)
    kept = draft.seen[: len(history) + 2] + [6 if draft.seen[len(history) + 2] == 5 else 5]
    again = draft.propose(kept, 3)
    assert_same_greedy(again, alone(model, kept, 3))
    assert draft.seen == kept + again[:2]
    cold = [KVCache() for _ in model.model.layers]  # growing, as the draft's (windows masked)
    prefill(model, mx.array([draft.seen]), cold, 16)
    n = len(draft.seen)
    assert rows.offsets == [n]
    for ours, theirs in zip(draft.batch.caches, cold, strict=True):
        assert theirs.offset == n
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert mx.allclose(a[0][:1, :, :n], b[0][:, :, :n], atol=1e-5)  # (stored: (keys,))
    assert draft.propose(kept, 0) == []


@pytest.mark.exactness
def test_rows_drafting_together_get_what_each_would_alone_from_one_pass_a_token(tiny, monkeypatch):
    """A DraftBatch shared by several rows (the runner's): each row's proposals are its draft's
    greedy continuation of its own history (the draft here is the model: plain decoding's
    tokens, up to a near tie), whatever the others ask (k, or nothing this time); the draft runs
    one pass a proposal for all of them, not one a row; after rows are trimmed back past
    rejections and a row leaves, the rest hold exactly what they have seen (a cold prefill)."""
    import mlxinfer.speculative
    from mlxinfer.speculative import DraftBatch

    model, _ = tiny
    shared = DraftBatch(model, 4)
    members = [DraftModel(model, model.config.vocab_size, shared) for _ in range(3)]
    histories = prompts(3, seed=12, low=5, high=30)
    asks = [5, 3, 4]
    passes: list[int] = []  # the rows of each pass of the draft
    for name in ("verify_step", "decode_step"):
        step = getattr(mlxinfer.speculative, name)

        def counted(model, tokens, cache, step=step):
            passes.append(len(tokens))
            return step(model, tokens, cache)

        monkeypatch.setattr(mlxinfer.speculative, name, counted)
    for round_ in range(3):
        passes.clear()
        got = shared.propose(list(zip(members, histories, asks, strict=True)))
        assert passes == [3] * max(asks)  # one pass a proposal, every row in it
        for proposed, history, k, member in zip(got, histories, asks, members, strict=True):
            if k:
                assert_same_greedy(proposed, alone(model, history, k))
                # (a row asking fewer rides along the others' passes: it has seen more)
                assert len(member.seen) == len(history) + max(asks) - 1
            else:
                assert proposed == []
        # the target keeps some proposals of each, then a token of its own; one row sits out
        histories = [h + got[i][: (i + round_) % 3] + [7 + i] for i, h in enumerate(histories)]
        asks = [2, 0, 5] if round_ == 0 else [3, 4, 1]
    shared.retain({members[0], members[2]})  # members[1]'s request has gone
    assert shared.members == [members[0], members[2]] and len(shared.rows) == 2
    for row, member in enumerate(shared.members):
        cold = [KVCache() for _ in model.model.layers]
        prefill(model, mx.array([member.seen]), cold, 16)
        n = len(member.seen)
        assert shared.rows.offsets[row] == n
        for ours, theirs in zip(shared.caches, cold, strict=True):
            assert mx.allclose(ours.keys[0][row, :, :n], theirs.keys[0][0, :, :n], atol=1e-4)
    shared.retain(set())
    assert shared.members == [] and len(shared.rows) == 0


@pytest.mark.exactness
@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("which", ["itself", "other"])
def test_greedy_tokens_with_a_draft_model_are_plain_decodings(
    tiny, drafts, cache, which, monkeypatch
):
    """A draft model that is always right (the target itself, where its caches hold what the
    target's do) and one that is nearly always wrong (other random weights): the target's tokens
    are plain decoding's, alone and batched beside a row that does not speculate, for every
    cache kind."""
    model, tokenizer = tiny
    options = CACHES[cache]
    if "kv_bits" in options and model.config.head_dim % options["kv_group_size"]:
        pytest.skip("head_dim not a multiple of the group size")
    draft = model if which == "itself" else drafts
    # every pass drafts (on a CPU a draft this slow would soon not be worth its cost: affordable)
    monkeypatch.setattr(mlxinfer.runner, "affordable", lambda k, *costs: k)
    n = 16
    batch = prompts(3, seed=12)
    expected = {tuple(ids): alone(model, ids, n, **options) for ids in batch}
    spec = SamplingParams(ignore_eos=True, speculation="draft", num_draft=4)
    plain = SamplingParams(ignore_eos=True)
    run = dict(max_tokens=n, draft_model=draft, **options)
    results = [mlxinfer.batch_generate(model, tokenizer, [batch[0]], sampling=spec, **run)[0]]
    results += mlxinfer.batch_generate(
        model, tokenizer, [*batch, batch[-1]], sampling=[spec] * 3 + [plain], **run
    )
    proposed = accepted = 0
    for ids, result in zip(batch[:1] + batch + batch[-1:], results, strict=True):
        assert result.finish_reason == "length" and len(result.tokens) == n
        assert_same_greedy(result.tokens, expected[tuple(ids)])
        proposed += result.metrics.draft_tokens
        accepted += result.metrics.accepted_draft_tokens
    assert results[-1].metrics.draft_tokens == 0  # the plain row
    assert proposed > 0
    if which == "other":
        assert accepted <= 0.3 * proposed
    elif cache == "growing":
        assert accepted >= 0.8 * proposed  # (all of them but past a near tie)
    elif cache == "q8":  # the target reads its keys rounded to 8 bits
        assert accepted > 0
    # (bounded: the target sees 12 of its tokens, the draft all of them; nothing to expect)


@pytest.mark.exactness
def test_with_a_draft_model_the_same_seed_gives_plain_samplings_tokens(tmp_path, monkeypatch):
    """Sampled rows with a draft model draw plain sampling's own tokens for their seed, alone
    and batched (the draft's proposals are point masses, checked as prompt lookup's are)."""
    make_tiny_checkpoint(tmp_path, "llama")
    model, tokenizer = mlxinfer.load(tmp_path)
    batch = prompts(3, seed=13)
    params = [
        SamplingParams(
            temperature=0.7,
            top_k=20,
            min_p=0.05,
            seed=200 + i,
            ignore_eos=True,
            speculation="draft",
            num_draft=3,
        )
        for i in range(len(batch))
    ]
    plain = [replace(p, speculation=None) for p in params]
    without = mlxinfer.batch_generate(model, tokenizer, batch, max_tokens=20, sampling=plain)
    monkeypatch.setattr(mlxinfer.runner, "affordable", lambda k, *costs: k)  # (every pass drafts)
    run = dict(max_tokens=20, draft_model=model)
    together = mlxinfer.batch_generate(model, tokenizer, batch, sampling=params, **run)
    for ids, p, result, reference in zip(batch, params, together, without, strict=True):
        lone = mlxinfer.batch_generate(model, tokenizer, [ids], sampling=p, **run)[0]
        assert lone.tokens == result.tokens == reference.tokens
    assert sum(r.metrics.draft_tokens for r in together) > 0


def test_a_draft_model_is_asked_for_and_must_share_the_vocabulary(tmp_path):
    """speculation="draft" without a draft model, or a draft whose vocabulary lacks some of the
    tokenizer's ids: a clear error before anything runs. A larger one (padding) is fine."""
    make_tiny_checkpoint(tmp_path, "llama")
    model, tokenizer = mlxinfer.load(tmp_path)
    spec = SamplingParams(speculation="draft")
    with pytest.raises(ValueError, match="speculation='draft' needs a draft model"):
        mlxinfer.batch_generate(model, tokenizer, [[5, 6, 7]], max_tokens=2, sampling=spec)
    other = tmp_path / "other"
    make_tiny_checkpoint(other, "llama", vocab_size=64)
    wrong = mlxinfer.load(other)[0]
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(64 tokens\) is smaller"):
        mlxinfer.Engine(model, tokenizer, draft_model=wrong)
    padded = tmp_path / "padded"
    make_tiny_checkpoint(padded, "llama", vocab_size=160)
    mlxinfer.Engine(model, tokenizer, draft_model=mlxinfer.load(padded)[0]).close()
    with pytest.raises(ValueError, match="draft_model must be a loaded model"):
        mlxinfer.batch_generate(model, tokenizer, [[5]], max_tokens=1, draft_model="path")


def test_a_draft_is_asked_for_only_the_proposals_worth_its_cost():
    """A proposal a draft model must compute is drafted while alpha ** j times what an accepted
    token saves (a batch step's share of one row) is at least what drafting it costs."""
    from mlxinfer.speculative import affordable

    # alone, steps of 30 ms: a 3 ms draft token pays while alpha ** j >= 0.1
    assert affordable(8, 0.7, 0.030, 1, 0.003) == 6  # 0.7 ** 6 = 0.118, 0.7 ** 7 = 0.082
    assert affordable(3, 0.7, 0.030, 1, 0.003) == 3  # (never more than asked)
    assert affordable(8, 0.9, 0.030, 1, 0.030) == 0  # a draft as slow as the model: never
    # a batch of 8 makes 8 tokens a step: an accepted token saves an eighth of it
    assert affordable(8, 0.7, 0.060, 8, 0.003) == 2  # 0.7 ** 2 * 7.5 ms = 3.7 ms >= 3 ms


def test_a_proposal_costs_a_drafting_row_its_share_of_a_draft_step_and_a_wider_pass(tmp_path):
    """Runner._draft_cost: a step of the draft's batch and the position the proposal adds to the
    verify pass (from the timed passes), shared by the rows drafting; unknown until the draft
    was timed. On a CPU the wider pass is most of it, which is why no draft pays there."""
    from mlxinfer.cache import CacheSpec
    from mlxinfer.runner import Runner
    from mlxinfer.speculative import affordable

    make_tiny_checkpoint(tmp_path, "llama")
    model, _ = mlxinfer.load(tmp_path)
    runner = Runner(model, CacheSpec(), 8, draft=model)
    assert runner._draft_cost(runner.drafts, 8, 8) is None  # (the draft not timed yet)
    runner.drafts.step_seconds, runner.drafts.step_rows = 0.050, 8  # (a step of 8 drafting)
    assert runner._draft_cost(runner.drafts, 8, 8) is None  # (no step of the model timed yet)
    runner.step_seconds = 0.060  # a plain step, and no passes of two sizes: as on a CPU
    assert runner._draft_cost(runner.drafts, 8, 4) == pytest.approx((0.025 + 0.060) / 4)
    assert runner._draft_cost(runner.drafts, 8, 4, strict=True) is None
    runner.pass_cost.observe(8, 0.060)  # a step of 8 rows: 0.01 + 0.00625 a token
    runner.pass_cost.observe(16, 0.110)  # a pass of 8 rows x 2 positions
    assert runner._draft_cost(runner.drafts, 8, 8) == pytest.approx((0.050 + 0.050) / 8)
    # 2 rows drafting: the draft's step as the model's shrinks from 8 rows to 2 (0.0225 / 0.06)
    assert runner._draft_cost(runner.drafts, 8, 2) == pytest.approx((0.050 * 0.375 + 0.050) / 2)
    # such a row drafts nothing even when its proposals are always accepted: 7.5 ms saved < 12.5
    assert affordable(4, 1.0, 0.060, 8, runner._draft_cost(runner.drafts, 8, 8)) == 0


def test_the_kv_budget_counts_the_draft_models_caches(tmp_path):
    """A request that speculates with a draft model also holds the draft's caches (its own, as
    long as the request): the KV budget counts them when it admits requests, and a request they
    push past the budget is refused saying so. Here the draft is the model itself, so its caches
    are as large as the target's: a budget that runs two plain requests at once runs one."""
    from mlxinfer.cache import kv_bytes_per_token
    from mlxinfer.request import Status
    from mlxinfer.scheduler import DraftBudgetError, EngineOptions, Request, Scheduler

    make_tiny_checkpoint(tmp_path / "llama", "llama")
    model, tokenizer = mlxinfer.load(tmp_path / "llama")
    drafted = SamplingParams(ignore_eos=True, speculation="draft", num_draft=3)
    plain = replace(drafted, speculation=None)
    probe = Scheduler(model, tokenizer, EngineOptions(draft_model=model))
    assert probe.draft_bytes(1, 63) == probe.kv_bytes(1, 63) > 0  # (one block of 256 tokens)
    # a draft with sliding-window layers still grows them (DraftBatch): no window caps its bytes
    make_tiny_checkpoint(tmp_path / "windowed", "mistral", sliding_window=8, head_dim=32)
    windowed = mlxinfer.load(tmp_path / "windowed")[0]
    with_window = Scheduler(windowed, tokenizer, EngineOptions(draft_model=windowed))
    assert with_window.draft_bytes(2, 300) == 2 * 512 * kv_bytes_per_token(windowed.config)
    assert with_window.draft_bytes(2, 300) > 2 * with_window.kv_bytes(1, 300)  # (windowed)
    budget = 2.5 * probe.kv_bytes(1, 60) / 2**20 + 2 * probe.kv_bytes(1, 40) / 2**20
    batch = prompts(4, seed=19, low=30, high=40)
    most = {}
    for name, params in (("plain", plain), ("draft", drafted)):
        options = EngineOptions(max_batch=8, kv_budget_mb=budget, draft_model=model)
        scheduler = Scheduler(model, tokenizer, options)
        requests = [Request(i, ids, params, 20) for i, ids in enumerate(batch)]
        for r in requests:
            scheduler.check(r)
            scheduler.add(r)
        most[name], reasons = 0, {}
        while scheduler.has_work():
            for request, response in scheduler.step():
                if response.finish_reason is not None:
                    reasons[request.id] = response.finish_reason
            most[name] = max(most[name], len(scheduler.running) + len(scheduler.prefilling))
        assert reasons == dict.fromkeys(range(len(batch)), "length")
    assert most == {"plain": 2, "draft": 1}
    tight = (probe.kv_bytes(1, 60) + probe.kv_bytes(1, 40)) / 2**20  # the target's alone
    scheduler = Scheduler(model, tokenizer, EngineOptions(kv_budget_mb=tight, draft_model=model))
    scheduler.check(Request(0, [5] * 40, plain, 20))
    with pytest.raises(ValueError, match="the draft model's .* MB of it.*kv_budget_mb"):
        scheduler.check(Request(1, [5] * 40, drafted, 20))
    # What check() accepts, admission admits once alone: a block each for the target's row, its
    # prompt, the draft's row and the draft's prompt before it joins (under 4 blocks it was
    # accepted with 3, then waited forever)
    block = probe.kv_bytes(1, 63) / 2**20
    for blocks, runs in ((3.5, False), (4, True)):
        options = EngineOptions(kv_budget_mb=blocks * block, draft_model=model)
        scheduler = Scheduler(model, tokenizer, options)
        request = Request(0, [5] * 40, drafted, 20)
        if not runs:
            with pytest.raises(DraftBudgetError):
                scheduler.check(request)
            continue
        scheduler.check(request)
        scheduler.add(request)
        for _ in range(100):
            if not scheduler.has_work():
                break
            scheduler.step()
        assert request.status is Status.FINISHED and not scheduler.has_work()


def test_the_draft_prefills_a_prompt_beside_the_target_where_drafting_pays(tmp_path, monkeypatch):
    """A request that drafts, on an engine where drafting is known to pay: the draft prefills
    its prompt chunk by chunk as the target does, and its first proposal joins the draft's batch
    with those caches (no prefill of the prompt inside the batch's decode pass). Where that is
    not known (nothing timed yet) or not so, the draft prefills a row only when it first drafts.
    The tokens are plain decoding's either way."""
    import mlxinfer.speculative
    from mlxinfer.request import Status
    from mlxinfer.scheduler import EngineOptions, Request, Scheduler

    make_tiny_checkpoint(tmp_path, "llama")
    model, tokenizer = mlxinfer.load(tmp_path)
    monkeypatch.setattr(mlxinfer.runner, "affordable", lambda k, *costs: k)
    joins = []  # the draft's prefills when a row joins (of what it had not prefilled)
    real = mlxinfer.speculative.prefill
    monkeypatch.setattr(
        mlxinfer.speculative, "prefill", lambda *a, **k: joins.append(a) or real(*a, **k)
    )
    scheduler = Scheduler(model, tokenizer, EngineOptions(draft_model=model, prefill_chunk=8))
    runner = scheduler.runner
    prompt = prompts(1, seed=4, low=30, high=31)[0]  # (4 chunks of the target's)
    params = SamplingParams(ignore_eos=True, speculation="draft", num_draft=3)
    for pays in (False, True):
        if pays:  # a draft step and a wider pass cheap against a step (as on a GPU)
            runner.drafts.step_seconds, runner.drafts.step_rows = 0.001, 1
            runner.pass_cost = PassCost()
            runner.pass_cost.observe(1, 0.010)  # (0.009 + 0.001 a token)
            runner.pass_cost.observe(8, 0.017)
        joins.clear()
        request = Request(int(pays), prompt, params, 12)
        scheduler.check(request)
        scheduler.add(request)
        tokens = []
        while request.status is not Status.RUNNING:
            tokens += [response.token for _, response in scheduler.step()]
            member = request.proposer
            assert isinstance(member, DraftModel)
            assert member.seen == (prompt[: request.prefilled] if pays else [])
        assert (member.pending is not None) is pays
        tokens += [response.token for _, response in scheduler.step()]  # the first proposals
        assert member.pending is None and member in runner.drafts.members
        assert request.draft_tokens > 0
        assert len(joins) == (0 if pays else 1)
        while scheduler.has_work():
            tokens += [response.token for _, response in scheduler.step()]
        assert_same_greedy(tokens, alone(model, prompt, 12))
