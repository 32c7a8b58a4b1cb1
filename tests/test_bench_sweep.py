"""A sweep on a tiny random checkpoint: every configuration measured reps times into the database,
failures recorded and the sweep going on, cancellation, and a resumed run measuring only what is
missing."""

from __future__ import annotations

import shutil
import threading

import pytest

from mlxinfer.bench.db import RunsDB
from mlxinfer.bench.grid import parse_axes
from mlxinfer.bench.sweep import Sweep


def test_every_configuration_and_repetition_is_recorded(tiny, tmp_path):
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes(
        {
            "model": tiny,
            "temperature": "0,0.8",
            "prompt_tokens": "8",
            "gen_tokens": "5",
            "concurrency": "1,2",
            "depth": "0,16",
            "kv": "full,rotating:20",
        }
    )
    sweep = Sweep(axes, reps=2, db=db)
    events = list(sweep.run())
    measured = [e for e in events if e.kind == "measured"]
    assert len(measured) == 16 * 2 and events[-1].kind == "finished"
    assert [e.step for e in measured] == list(range(1, 33)) and measured[0].steps == 32
    assert [e.index for e in events if e.kind == "started"] == list(range(16))
    rows = db.measurements(sweep.run_id)
    assert len(rows) == 16 * 2 and all(r["status"] == "ok" for r in rows)
    assert all(r["decode_tps"] > 0 and r["ttft_ms"] > 0 for r in rows)
    assert all(len(r["tokens"]) == 5 and len(db.token_times(r["id"])) == 5 for r in rows)
    assert db.run(sweep.run_id)["status"] == "done"


def test_a_cancelled_sweep_resumes_where_it_stopped(tiny, tmp_path):
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes({"model": tiny, "top_k": "0,5,10", "prompt_tokens": "8", "gen_tokens": "4"})
    cancel = threading.Event()
    sweep = Sweep(axes, reps=2, db=db)
    seen = 0
    for event in sweep.run(cancel):
        if event.kind == "measured":
            seen += 1
            if seen == 3:
                cancel.set()
    assert event.kind == "stopped" and db.run(sweep.run_id)["status"] == "stopped"
    assert len(db.measurements(sweep.run_id)) == 3
    resumed = Sweep.resume(db, sweep.run_id)
    events = list(resumed.run())
    assert [e.kind for e in events].count("measured") == 3  # only the missing ones
    rows = db.measurements(sweep.run_id)
    assert sorted((r["position"], r["rep"]) for r in rows) == [
        (p, k) for p in range(3) for k in range(2)
    ]
    assert db.run(sweep.run_id)["status"] == "done"


@pytest.mark.parametrize(
    "axes,message",
    [
        (
            {"kv": "full,q8"},
            "sweep axis 'kv': 'q8' on model .*does not divide the model's head_dim",
        ),
        ({"gen_tokens": "4,300"}, r"0 \+ 8 \+ 300 tokens exceed the context of model .* \(256\)"),
        ({"model": "/nonexistent/model"}, "sweep axis 'model': '/nonexistent/model'"),
    ],
)
def test_a_grid_the_model_cannot_run_is_refused_before_anything_runs(tiny, tmp_path, axes, message):
    db = RunsDB(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match=message):
        Sweep(parse_axes({"model": tiny, "prompt_tokens": "8", **axes}), reps=1, db=db)
    assert db.runs() == []  # nothing recorded
    with pytest.raises(ValueError, match="reps must be an integer >= 1"):
        Sweep(parse_axes({"model": tiny}), reps=0, db=db)


def test_memory_is_predicted_and_a_configuration_that_cannot_fit_is_not_run(
    tiny, tmp_path, monkeypatch
):
    from mlxinfer.bench import machine

    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes(
        {"model": tiny, "prompt_tokens": "8", "gen_tokens": "4", "concurrency": "1,4"}
    )
    events = list(Sweep(axes, reps=1, db=db).run())
    rows = [r for r in db.measurements(1) if r["status"] == "ok"]
    # tiny llama: the same weights, and one 256-slot block of 512 bytes a token per row
    single, four = (r["predicted_memory_mb"] for r in rows)
    assert (four - single) * 2**20 == pytest.approx(3 * 512 * 256)
    assert all(r["peak_memory_mb"] > 0 for r in rows)
    monkeypatch.setattr(machine, "available_memory_mb", lambda: 0.01)
    events = list(Sweep(axes, reps=1, db=db).run())
    failed = [e for e in events if e.kind == "failed"]
    assert len(failed) == 2 and all("MB available: not run" in e.error for e in failed)


def test_mlx_lm_measures_concurrent_requests_and_says_what_it_cannot_do(tiny, tmp_path):
    """The baseline at concurrency 2 goes through mlx-lm's BatchGenerator: every request
    generates exactly gen_tokens, with a growing or a rotating cache, after a context or not."""
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes(
        {
            "model": tiny,
            "prompt_tokens": "8",
            "gen_tokens": "6",
            "concurrency": "2",
            "depth": "0,16",
            "kv": "full,rotating:20",
        }
    )
    sweep = Sweep(axes, reps=1, db=db, baseline="mlx-lm")
    list(sweep.run())
    rows = {
        (r["settings"]["depth"], r["settings"]["kv"], r["engine"]): r
        for r in db.measurements(sweep.run_id)
    }
    assert len(rows) == 8
    for (depth, kv, engine), row in rows.items():
        assert row["status"] == "ok", (depth, kv, engine, row["error"])
        assert len(row["tokens"]) == 6 and len(db.token_times(row["id"])) == 6
        assert row["decode_tps"] > 0 and row["ttft_ms"] > 0 and row["prefill_tps"] > 0
    theirs = [r for r in rows.values() if r["engine"] == "mlx-lm"]
    assert all(r["kv_cache_mb"] is None for r in theirs)  # not measured, not 0
    for row in rows.values():  # both engines: 12 tokens over the slower request's time
        assert 12 / (row["e2e_ms"] / 1e3) >= row["output_tps"] > 6 / (row["e2e_ms"] / 1e3)
    # both engines keep each request: the row's means and total output are those requests'
    requests: dict[int, list] = {}
    for r in db.requests(sweep.run_id):
        requests.setdefault(r["measurement_id"], []).append(r)
    assert set(requests) == {row["id"] for row in rows.values()}
    for row in rows.values():
        pair = requests[row["id"]]
        assert [r["tokens"] for r in pair] == [6, 6] and all(len(r["gaps"]) == 5 for r in pair)
        assert sum(r["ttft_ms"] for r in pair) / 2 == pytest.approx(row["ttft_ms"])
        assert sum(r["e2e_ms"] for r in pair) / 2 == pytest.approx(row["e2e_ms"])
        assert row["output_tps"] == pytest.approx(12 / (max(r["e2e_ms"] for r in pair) / 1e3))
        for r in pair:  # the gaps add up to the time between the first token and the last
            assert sum(r["gaps"]) == pytest.approx(r["e2e_ms"] - r["ttft_ms"])


def test_total_output_is_every_generated_token_over_the_measurements_time(tiny, tmp_path):
    """output_tps (the number a concurrency sweep is for): alone, a request's tokens over its
    end-to-end time; at concurrency 4, every request's tokens over the slowest one's time, which
    is at least the mean end-to-end time the row records (their ratio: 4 x 6 tokens)."""
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes(
        {"model": tiny, "prompt_tokens": "8", "gen_tokens": "6", "concurrency": "1,4"}
    )
    sweep = Sweep(axes, reps=2, db=db)
    list(sweep.run())
    rows = db.measurements(sweep.run_id)
    assert len(rows) == 4
    for row in rows:
        n = row["settings"]["concurrency"]
        mean_e2e_s = row["e2e_ms"] / 1e3
        if n == 1:
            assert row["output_tps"] == pytest.approx(6 / mean_e2e_s, rel=1e-9)
        else:
            assert 0 < row["output_tps"] <= 4 * 6 / mean_e2e_s * (1 + 1e-9)


def test_a_draft_model_on_the_spec_axis_is_measured_with_its_acceptance(
    tiny, tmp_path, monkeypatch
):
    """spec "draft:PATH": the Engine of that configuration proposes with the model at PATH (here
    the model itself, so its proposals are the model's own argmax: accepted), and the acceptance
    rate is recorded beside the speeds; a draft that does not load, or one asked with parallel,
    is refused before anything runs, naming the axis and the value. (A draft as costly as its
    model is not worth drafting with: the cost gate, tested in test_speculative.py, is opened.)"""
    from mlx.utils import tree_flatten

    import mlxinfer.runner
    from mlxinfer import load

    monkeypatch.setattr(mlxinfer.runner, "affordable", lambda k, *costs: k)
    db = RunsDB(tmp_path / "runs.sqlite")
    draft = shutil.copytree(tiny, tmp_path / "draft")  # the same weights, a model of its own
    axes = {"model": tiny, "prompt_tokens": "8", "gen_tokens": "12"}
    sweep = Sweep(parse_axes({**axes, "spec": f"none,draft:{draft}:3"}), reps=1, db=db)
    assert list(sweep.run())[-1].kind == "finished"
    plain, drafted = db.measurements(sweep.run_id)
    assert plain["status"] == drafted["status"] == "ok"
    # the draft's weights, and its caches of 20 tokens in one 256-slot block (512 bytes a token)
    extra = drafted["predicted_memory_mb"] - plain["predicted_memory_mb"]
    weights = sum(v.nbytes for _, v in tree_flatten(load(tiny)[0].parameters()))
    assert extra * 2**20 == pytest.approx(weights + 512 * 256)
    assert plain["acceptance_rate"] is None
    assert drafted["acceptance_rate"] is not None and drafted["acceptance_rate"] > 0.5
    with pytest.raises(ValueError, match="sweep axis 'spec': 'draft:.*nope'"):
        Sweep(parse_axes({**axes, "spec": f"draft:{tmp_path / 'nope'}"}), reps=1, db=db)
    with pytest.raises(ValueError, match="a draft model with parallel 'tensor:2' is not supported"):
        Sweep(parse_axes({**axes, "spec": f"draft:{tiny}", "parallel": "tensor:2"}), reps=1, db=db)
