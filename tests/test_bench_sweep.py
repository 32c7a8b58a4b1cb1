"""A sweep on a tiny random checkpoint: every configuration measured reps times into the database,
failures recorded and the sweep going on, cancellation, and a resumed run measuring only what is
missing."""

from __future__ import annotations

import threading

import pytest

from mlxinfer.bench.db import RunsDB
from mlxinfer.bench.grid import parse_axes
from mlxinfer.bench.sweep import Sweep

from .reference import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama")
    return str(path)


def test_every_configuration_and_repetition_is_recorded(tiny, tmp_path):
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes({
        "model": tiny, "temperature": "0,0.8", "prompt_tokens": "8", "gen_tokens": "5",
        "concurrency": "1,2", "depth": "0,16", "kv": "full,q8",
    })  # fmt: skip
    sweep = Sweep(axes, reps=2, db=db)
    events = list(sweep.run())
    measured = [e for e in events if e.kind == "measured"]
    assert len(measured) == 8 * 2 and events[-1].kind == "finished"  # the 8 without q8
    failed = [e for e in events if e.kind == "failed"]  # tiny head_dim 16: 8-bit groups of 64
    assert failed and all("kv_group_size" in e.error for e in failed)
    rows = db.measurements(sweep.run_id)
    assert len(rows) == 16 * 2  # every configuration x rep, failed or measured
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["decode_tps"] > 0 and r["ttft_ms"] > 0 for r in ok)
    assert all(len(r["tokens"]) == 5 and len(db.token_times(r["id"])) == 5 for r in ok)
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


def test_bad_settings_are_refused_before_anything_runs(tiny, tmp_path):
    with pytest.raises(ValueError, match="reps must be an integer >= 1"):
        Sweep(parse_axes({"model": tiny}), reps=0, db=RunsDB(tmp_path / "r.sqlite"))


def test_memory_is_predicted_and_a_configuration_that_cannot_fit_is_not_run(
    tiny, tmp_path, monkeypatch
):
    import mlxinfer.bench.sweep as sweep_module

    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes({"model": tiny, "prompt_tokens": "8", "gen_tokens": "4",
                       "concurrency": "1,4"})  # fmt: skip
    events = list(Sweep(axes, reps=1, db=db).run())
    rows = [r for r in db.measurements(1) if r["status"] == "ok"]
    # tiny llama: the same weights, and one 256-slot block of 512 bytes a token per row
    single, four = (r["predicted_memory_mb"] for r in rows)
    assert (four - single) * 2**20 == pytest.approx(3 * 512 * 256)
    assert all(r["peak_memory_mb"] > 0 for r in rows)
    monkeypatch.setattr(sweep_module, "available_memory_mb", lambda: 0.01)
    events = list(Sweep(axes, reps=1, db=db).run())
    failed = [e for e in events if e.kind == "failed"]
    assert len(failed) == 2 and all("MB available: not run" in e.error for e in failed)
