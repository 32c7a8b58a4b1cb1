"""The scheduler decides, the runner runs: `schedule()` returns a plan without touching the model,
a request's status says where it is, and the options travel as checked objects (CacheSpec,
EngineOptions). What the tokens are is test_engine.py's business (against each prompt alone)."""

from __future__ import annotations

import pytest

import mlxinfer
from mlxinfer import CacheSpec, EngineOptions, SamplingParams
from mlxinfer.model import Model
from mlxinfer.scheduler import Request, Scheduler, Status

GREEDY = SamplingParams(ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from .reference import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint(path, "llama", head_dim=32)  # a multiple of the smallest KV group
    return mlxinfer.load(path)


def submit(scheduler: Scheduler, prompts: list[list[int]], max_tokens: int = 4) -> list[Request]:
    requests = []
    for i, ids in enumerate(prompts):
        request = Request(i, ids, GREEDY, max_tokens)
        scheduler.check(request)
        scheduler.add(request)
        requests.append(request)
    return requests


@pytest.fixture
def no_model_work(monkeypatch):
    """Turn on to make any forward pass fail the test: what schedule() must never run."""
    state = {"on": False}
    real_hidden, real_call = Model.hidden_states, Model.__call__

    def guard(real):
        def run(self, *args, **kwargs):
            assert not state["on"], "the model ran while scheduling"
            return real(self, *args, **kwargs)

        return run

    monkeypatch.setattr(Model, "hidden_states", guard(real_hidden))
    monkeypatch.setattr(Model, "__call__", guard(real_call))
    return state


def test_schedule_decides_without_running_the_model(llama, no_model_work):
    """Three short fresh prompts: one padded prefill pass for all; then, with all three running,
    one decode step. Planning alone leaves every cache and token untouched."""
    model, tokenizer = llama
    scheduler = Scheduler(model, tokenizer, EngineOptions(max_batch=4))
    requests = submit(scheduler, [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    assert [r.status for r in requests] == [Status.WAITING] * 3

    no_model_work["on"] = True
    plan = scheduler.schedule()
    no_model_work["on"] = False
    assert plan.prefill == requests and not plan.decode and not plan.failed
    assert [r.status for r in requests] == [Status.PREFILLING] * 3
    assert all(r.prefilled == 0 for r in requests) and scheduler.running == []

    scheduler.step()  # the plan again (nothing changed), now run
    assert [r.status for r in requests] == [Status.RUNNING] * 3
    assert scheduler.running == requests and scheduler.batch_rows >= 3
    no_model_work["on"] = True
    plan = scheduler.schedule()
    assert plan.decode and plan.prefill == []


def test_a_request_ends_finished_wherever_it_stops(llama):
    """Done by its token budget, cancelled while waiting, cancelled while running: FINISHED, out
    of every queue, and its batch row given back."""
    model, tokenizer = llama
    scheduler = Scheduler(model, tokenizer, EngineOptions(max_batch=2))
    done, running, waiting = submit(scheduler, [[5, 6, 7], [8, 9, 10], [11, 12]], max_tokens=3)
    running.max_tokens = 50
    scheduler.step()  # the first two prefilled together; the third waits for a row
    assert [done.status, running.status, waiting.status] == [
        Status.RUNNING,
        Status.RUNNING,
        Status.WAITING,
    ]
    [(request, response)] = scheduler.cancel(waiting)
    assert request is waiting and response.finish_reason == "cancelled"
    while done.status is not Status.FINISHED:
        scheduler.step()
    assert scheduler.running == [running] and scheduler.runner.batch_rows >= 1
    scheduler.cancel(running)
    assert {r.status for r in (done, running, waiting)} == {Status.FINISHED}
    assert not scheduler.has_work() and len(scheduler.runner.rows) == 0


def test_chunked_plans_a_decode_step_and_the_rest_of_the_tokens_for_a_prompt(llama):
    """vLLM's chunked prefill: with r rows running, a step also prefills prefill_chunk - r tokens
    of the next prompt (at least MIN_CHUNK)."""
    from mlxinfer.scheduler import MIN_CHUNK

    model, tokenizer = llama
    options = EngineOptions(max_batch=4, policy="chunked", prefill_chunk=20)
    scheduler = Scheduler(model, tokenizer, options)
    first = submit(scheduler, [[5, 6, 7]], max_tokens=30)
    while first[0].status is not Status.RUNNING:
        scheduler.step()
    long_prompt = Request(1, list(range(3, 60)), GREEDY, 4)
    scheduler.check(long_prompt)
    scheduler.add(long_prompt)
    plan = scheduler.schedule()
    assert plan.decode and plan.prefill == [long_prompt] and plan.chunk == 20 - 1
    scheduler.step()
    assert long_prompt.prefilled == 19 and long_prompt.status is Status.PREFILLING
    scheduler.prefill_chunk = MIN_CHUNK  # a step's budget all but taken by the running rows
    assert scheduler.schedule().chunk == MIN_CHUNK


def test_chunked_counts_a_speculating_rows_proposals_in_the_steps_tokens(llama):
    """A row that speculates may run its last token and num_draft proposals in the step's decode
    pass, and the pass pads every row to that width: the prefill chunk beside it is that much
    smaller, so the step's tokens stay bounded."""
    model, tokenizer = llama
    scheduler = Scheduler(
        model, tokenizer, EngineOptions(max_batch=4, policy="chunked", prefill_chunk=40)
    )
    spec = SamplingParams(ignore_eos=True, speculation="prompt-lookup", num_draft=5)
    running = [Request(0, [5, 6, 7], spec, 30), Request(1, [8, 9], GREEDY, 30)]
    for request in running:
        scheduler.check(request)
        scheduler.add(request)
    while any(r.status is not Status.RUNNING for r in running):
        scheduler.step()
    waiting = Request(2, list(range(3, 90)), GREEDY, 4)
    scheduler.check(waiting)
    scheduler.add(waiting)
    plan = scheduler.schedule()
    assert plan.decode and plan.prefill == [waiting] and plan.chunk == 40 - 2 * (1 + 5)


def test_decode_first_admits_nothing_while_a_batch_runs(llama):
    model, tokenizer = llama
    scheduler = Scheduler(model, tokenizer, EngineOptions(max_batch=4, policy="decode-first"))
    first = submit(scheduler, [[5, 6, 7]], max_tokens=10)[0]
    scheduler.step()
    late = Request(1, [8, 9, 10], GREEDY, 4)
    scheduler.add(late)
    plan = scheduler.schedule()
    assert plan.decode and plan.prefill == [] and late.status is Status.WAITING
    while first.status is not Status.FINISHED:
        scheduler.step()
    scheduler.schedule()
    assert late.status is Status.PREFILLING


# -- the options, as objects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(max_kv_size=4, kv_keep=4), "max_kv_size (4) must be larger than kv_keep (4)"),
        (dict(max_kv_size=0), "max_kv_size must be a positive integer"),
        (dict(max_kv_size=True), "max_kv_size must be a positive integer"),
        (dict(kv_keep=-1), "kv_keep must be an integer >= 0"),
        (dict(kv_bits=3), "kv_bits must be one of (4, 8)"),
        (dict(kv_bits=8, kv_group_size=48), "kv_group_size must be one of (32, 64, 128)"),
    ],
)
def test_a_cache_spec_is_checked_when_made(fields, message):
    with pytest.raises(ValueError) as err:
        CacheSpec(**fields)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(max_batch=0), "max_batch must be an integer >= 1"),
        (dict(policy="fastest"), "policy must be one of prefill-first, decode-first, chunked"),
        (dict(kv_budget_mb=float("nan")), "kv_budget_mb must be a positive number"),
        (dict(prefill_chunk=0), "prefill_chunk must be an integer >= 1"),
        (dict(prefix_cache_mb=-1), "prefix_cache_mb must be a number >= 0"),
        (dict(cache={"max_kv_size": 64}), "cache must be a CacheSpec, got dict"),
    ],
)
def test_engine_options_are_checked_when_made(fields, message):
    with pytest.raises(ValueError) as err:
        EngineOptions(**fields)
    assert message in str(err.value)


def test_the_cache_is_given_whole_or_by_its_fields_never_both(llama):
    model, tokenizer = llama
    spec = CacheSpec(max_kv_size=32, kv_keep=2, kv_bits=8, kv_group_size=32)
    with mlxinfer.Engine(model, tokenizer, cache=spec) as whole:
        assert whole.options.cache == spec
    with mlxinfer.Engine(
        model, tokenizer, max_kv_size=32, kv_keep=2, kv_bits=8, kv_group_size=32
    ) as fields:
        assert fields.options.cache == spec
    with pytest.raises(ValueError, match="give cache= or max_kv_size, not both"):
        mlxinfer.Engine(model, tokenizer, cache=spec, max_kv_size=64)
    with pytest.raises(ValueError, match="cache must be a CacheSpec"):
        mlxinfer.generate(model, tokenizer, [5, 6], max_tokens=1, cache={"kv_bits": 8})
    # the same cache through every entry point
    ids = [5, 6, 7, 8]
    text = mlxinfer.generate(model, tokenizer, ids, max_tokens=6, sampling=GREEDY, cache=spec)
    [batched] = mlxinfer.batch_generate(model, tokenizer, [ids], 6, GREEDY, cache=spec)
    assert batched.text == text
    caches = model.make_cache(spec)
    assert [c.max_size for c in caches] == [32] * len(caches) and caches[0].bits == 8


def test_a_cache_spec_names_itself_and_predicts_its_bytes(llama):
    from mlxinfer.cache import kv_cache_bytes

    model, _ = llama
    assert [CacheSpec().label, CacheSpec(kv_bits=8).label] == ["full", "q8"]
    assert CacheSpec(kv_bits=4, max_kv_size=256).label == "q4:rotating:256"
    spec = CacheSpec(max_kv_size=40, kv_bits=8, kv_group_size=32)
    assert spec.nbytes(model.config, 300, 3) == kv_cache_bytes(model.config, 300, 3, 40, 8, 32)
