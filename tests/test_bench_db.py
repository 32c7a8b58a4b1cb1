"""The runs database: its schema, one committed row per measurement, crash safety (a writer
killed mid-sweep loses at most the measurement in progress) and what a resumed run skips."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from mlxinfer.bench.db import METRICS, SCHEMA_VERSION, RunsDB, default_db_path

MACHINE = {"cpu": "test cpu", "backend": "cpu", "mlx": "0.32.4"}


def test_schema_and_a_measurement_round_trip(tmp_path):
    db = RunsDB(tmp_path / "runs.sqlite")
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {
        "runs",
        "machines",
        "configurations",
        "measurements",
        "token_times",
        "requests",
    }
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    run = db.start_run("mlxinfer bench --temperature 0,0.8", MACHINE, reps=2)
    ids = db.add_configurations(run, [("a", {"temperature": 0.0}), ("b", {"temperature": 0.8})])
    metrics = {m: float(i) for i, m in enumerate(METRICS)}
    m = db.record(ids[1], "mlxinfer", 0, metrics, tokens=[5, 6, 7], token_times_ms=[10, 20, 30])
    db.record(ids[0], "mlx-lm", 0, error="worker crashed: boom")
    rows = db.measurements(run)
    assert [(r["settings"]["temperature"], r["engine"], r["status"]) for r in rows] == [
        (0.0, "mlx-lm", "failed"),
        (0.8, "mlxinfer", "ok"),
    ]
    assert rows[0]["error"] == "worker crashed: boom" and rows[0]["decode_tps"] is None
    assert all(rows[1][k] == v for k, v in metrics.items()) and rows[1]["tokens"] == [5, 6, 7]
    assert db.token_times(m) == [10.0, 20.0, 30.0]
    assert db.done(run) == {("b", "mlxinfer", 0), ("a", "mlx-lm", 0)}
    with pytest.raises(sqlite3.IntegrityError):  # one row per configuration, engine, repetition
        db.record(ids[1], "mlxinfer", 0, metrics)
    db.finish_run(run, "done")
    assert db.run(run)["status"] == "done" and db.run(run)["ended"] >= db.run(run)["started"]
    # the same machine is stored once; a resumed run keeps its configuration ids
    run2 = db.start_run("again", MACHINE, reps=1)
    assert db.run(run2)["machine_id"] == db.run(run)["machine_id"]
    assert db.add_configurations(run, [("a", {}), ("b", {})]) == ids


WRITER = """
import sys, time
from mlxinfer.bench.db import RunsDB
db = RunsDB(sys.argv[1])
run = db.start_run("killed sweep", {"cpu": "x"}, reps=1)
ids = db.add_configurations(run, [(str(i), {"i": i}) for i in range(1000)])
for i, cid in enumerate(ids):
    db.record(cid, "mlxinfer", 0, {"decode_tps": float(i)}, token_times_ms=range(50))
    print(i, flush=True)
    time.sleep(0.005)
"""


def test_a_killed_sweep_keeps_every_finished_measurement(tmp_path):
    path = tmp_path / "runs.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    reported = 0
    while reported < 20:
        reported = int(writer.stdout.readline()) + 1
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    db = RunsDB(path)
    (run,) = db.runs()
    assert run["status"] == "running"  # never finished: a resume finds it
    rows = db.measurements(run["id"])
    positions = [r["position"] for r in rows]
    assert positions == list(range(len(rows)))  # no gap, no half measurement
    assert len(rows) >= reported
    assert all(len(db.token_times(r["id"])) == 50 for r in rows)
    assert len(db.done(run["id"])) == len(rows)
    db.resume_run(run["id"])
    assert db.run(run["id"])["status"] == "running"


def test_bad_files_and_where_the_database_lives(tmp_path, monkeypatch):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="junk.sqlite is not a usable runs database"):
        RunsDB(junk)
    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "mine.sqlite"))
    assert default_db_path() == tmp_path / "mine.sqlite"
    monkeypatch.delenv("MLXINFER_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_db_path() == tmp_path / "data" / "mlxinfer" / "runs.sqlite"
    with pytest.raises(ValueError, match="no run 7"):
        RunsDB(tmp_path / "new.sqlite").run(7)


def test_a_database_of_another_program_is_refused_and_left_as_it_was(tmp_path):
    """An SQLite file with a `runs` table of its own: refused naming the file (before: our
    tables were added to it, its version set, and the first query failed on a missing column)."""
    path = tmp_path / "laps.sqlite"
    with sqlite3.connect(path) as theirs:
        theirs.execute("CREATE TABLE runs (lap INTEGER, seconds REAL)")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{path} is not a runs database: it has tables of its"):
        RunsDB(path)
    assert path.read_bytes() == before  # not switched to WAL, no table added
    with sqlite3.connect(path) as theirs:  # one with our version number and a table unlike ours
        theirs.execute("PRAGMA user_version=2")
    with pytest.raises(ValueError, match="its table 'runs' has no baseline, command, ended, id"):
        RunsDB(path)
    (tmp_path / "file").write_text("")
    with pytest.raises(
        ValueError, match="cannot create the directory .*file: a file is in the way"
    ):
        RunsDB(tmp_path / "file" / "runs.sqlite")


def test_a_run_whose_process_is_alive_is_not_taken_by_a_resume(tmp_path):
    """A 'running' run whose recorded process lives (here a sleeping child) is refused, naming
    the run and the pid; once that process has ended, the run is taken, with this pid."""
    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", MACHINE, reps=1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        db.conn.execute("UPDATE runs SET pid = ? WHERE id = ?", (child.pid, run))
        with pytest.raises(
            ValueError, match=f"run {run} is still being measured by process {child.pid}"
        ):
            db.resume_run(run)
        assert db.run(run)["pid"] == child.pid
    finally:
        child.kill()
        child.wait()
    assert db.resume_run(run)["pid"] == os.getpid()
    assert db.resume_run(run)["status"] == "running"  # this process's own run: taken again
    db.finish_run(run, "stopped")
    db.conn.execute("UPDATE runs SET pid = 1 WHERE id = ?", (run,))  # stopped: whoever has pid 1
    assert db.resume_run(run)["pid"] == os.getpid()


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    """Runs gained the pid of the process measuring them (schema 2); a database written by the
    first version keeps its runs and gains the column."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE runs (id INTEGER PRIMARY KEY, command TEXT NOT NULL, sweep TEXT, "
            "started REAL NOT NULL, ended REAL, status TEXT NOT NULL, machine_id INTEGER, "
            "reps INTEGER NOT NULL, baseline TEXT);"
            "INSERT INTO runs (command, started, status, reps) VALUES ('old', 1.0, 'done', 5);"
            "PRAGMA user_version=1;"
        )
    db = RunsDB(path)
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (run,) = db.runs()
    assert run["command"] == "old" and run["pid"] is None
    new = db.start_run("new", MACHINE, reps=1)
    assert db.run(new)["pid"] == os.getpid()
    again = RunsDB(path)  # opened again: already the current version
    assert [r["command"] for r in again.runs()] == ["old", "new"]


def test_a_version_2_database_keeps_its_measurements_and_gains_output_tps(tmp_path):
    """Measurements gained the total output throughput (schema 3): a version 2 database keeps
    every measurement (output_tps None), and new ones record it."""
    path = tmp_path / "v2.sqlite"
    db = RunsDB(path)
    run = db.start_run("old", MACHINE, reps=1)
    (config,) = db.add_configurations(run, [("a", {"temperature": 0.0})])
    db.record(config, "mlxinfer", 0, {"decode_tps": 7.0}, [1, 2], [10.0, 20.0])
    db.conn.executescript(  # back to version 2, as that mlxinfer wrote it
        "ALTER TABLE measurements DROP COLUMN output_tps; ALTER TABLE runs DROP COLUMN target; "
        "ALTER TABLE measurements DROP COLUMN acceptance_rate; PRAGMA user_version=2;"
    )
    db.close()
    db = RunsDB(path)
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (old,) = db.measurements(run)
    assert old["decode_tps"] == 7.0 and old["output_tps"] is None
    (config2,) = db.add_configurations(run, [("b", {"temperature": 0.5})])
    db.record(config2, "mlxinfer", 0, {"decode_tps": 8.0, "output_tps": 30.0}, [1], [10.0])
    assert sorted(m["output_tps"] or 0 for m in db.measurements(run)) == [0, 30.0]


def test_every_request_of_a_measurement_is_kept(tmp_path):
    """Each concurrent request's TTFT, end-to-end time, token count and gaps (schema 4), read back
    with its measurement's settings; a failed measurement has none."""
    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", MACHINE, reps=1)
    ok, bad = db.add_configurations(run, [("a", {"concurrency": 2}), ("b", {"concurrency": 1})])
    requests = [
        {"ttft_ms": 50.0, "e2e_ms": 250.0, "tokens": 3, "gaps": [100.0, 100.0]},
        {"ttft_ms": 80.0, "e2e_ms": 300.0, "tokens": 2, "gaps": [220.0]},
    ]
    m = db.record(ok, "mlxinfer", 0, {"decode_tps": 9.0}, [1, 2, 3], [50, 150, 250], None, requests)
    db.record(bad, "mlxinfer", 0, error="boom")
    rows = db.requests(run)
    assert [(r["measurement_id"], r["request"], r["engine"], r["rep"]) for r in rows] == [
        (m, 0, "mlxinfer", 0),
        (m, 1, "mlxinfer", 0),
    ]
    assert [{k: r[k] for k in requests[0]} for r in rows] == requests
    assert rows[0]["settings"] == {
        "concurrency": 2,
        "parallel": "none",
        "spec": "none",
    }  # (axes added later:
    # at their defaults, grid.with_defaults)


def test_a_version_3_database_keeps_its_runs_and_gains_the_requests_table(tmp_path):
    """Schema 4 added every request's figures: a version 3 database keeps its measurements (with
    no requests: its charts say so) and records requests from then on."""
    path = tmp_path / "v3.sqlite"
    db = RunsDB(path)
    run = db.start_run("old", MACHINE, reps=1)
    (config,) = db.add_configurations(run, [("a", {"temperature": 0.0})])
    db.record(config, "mlxinfer", 0, {"decode_tps": 7.0}, [1, 2], [10.0, 20.0])
    db.conn.executescript(
        "DROP TABLE requests; ALTER TABLE runs DROP COLUMN target; "
        "ALTER TABLE measurements DROP COLUMN acceptance_rate; PRAGMA user_version=3;"
    )
    db.close()
    db = RunsDB(path)
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.measurements(run)[0]["decode_tps"] == 7.0 and db.requests(run) == []
    (config2,) = db.add_configurations(run, [("b", {"temperature": 0.5})])
    figures = {"ttft_ms": 10.0, "e2e_ms": 20.0, "tokens": 2, "gaps": [10.0]}
    db.record(config2, "mlxinfer", 0, {"decode_tps": 8.0}, [1], [10.0], requests=[figures])
    assert [r["ttft_ms"] for r in db.requests(run)] == [10.0]


def test_a_version_4_database_keeps_its_runs_and_gains_their_target(tmp_path):
    """Schema 5 added the server a run measured over HTTP: a version 4 database keeps its runs
    (target None: in process) and new runs record theirs."""
    path = tmp_path / "v4.sqlite"
    db = RunsDB(path)
    old = db.start_run("old", MACHINE, reps=1, baseline="mlx-lm")
    db.conn.executescript(
        "ALTER TABLE runs DROP COLUMN target; ALTER TABLE measurements DROP COLUMN acceptance_rate; "
        "PRAGMA user_version=4;"
    )
    db.close()
    db = RunsDB(path)
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.run(old)["target"] is None and db.run(old)["baseline"] == "mlx-lm"
    new = db.start_run("new", MACHINE, reps=1, target="http://127.0.0.1:8080")
    assert db.run(new)["target"] == "http://127.0.0.1:8080"


def test_a_version_5_database_keeps_its_measurements_and_gains_the_acceptance_rate(tmp_path):
    """Schema 6 added speculative decoding's acceptance rate: a version 5 database keeps its
    measurements (rate None) and new ones record it."""
    path = tmp_path / "v5.sqlite"
    db = RunsDB(path)
    run = db.start_run("old", MACHINE, reps=1)
    (config,) = db.add_configurations(run, [("a", {"temperature": 0.0})])
    db.record(config, "mlxinfer", 0, {"decode_tps": 7.0}, [1, 2], [10.0, 20.0])
    db.conn.executescript(
        "ALTER TABLE measurements DROP COLUMN acceptance_rate; PRAGMA user_version=5;"
    )
    db.close()
    db = RunsDB(path)
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    (old,) = db.measurements(run)
    assert old["decode_tps"] == 7.0 and old["acceptance_rate"] is None
    (config2,) = db.add_configurations(run, [("b", {"spec": "prompt-lookup"})])
    db.record(config2, "mlxinfer", 0, {"decode_tps": 8.0, "acceptance_rate": 0.75}, [1], [10.0])
    assert sorted(m["acceptance_rate"] or 0 for m in db.measurements(run)) == [0, 0.75]


def test_a_measurement_is_recorded_whole_or_not_at_all(tmp_path):
    """The measurement row and its token times are one transaction: a failure between them (here
    a bad token time; in life a signal) leaves nothing, so a resumed run measures it again."""
    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", MACHINE, reps=1)
    (config,) = db.add_configurations(run, [("a", {"temperature": 0.0})])
    with pytest.raises(ValueError):
        db.record(config, "mlxinfer", 0, {"decode_tps": 1.0}, [1, 2], ["10.0", "not a time"])
    assert db.measurements(run) == [] and db.done(run) == set()
    broken = {"ttft_ms": 1.0, "e2e_ms": 2.0, "tokens": 2}  # no gaps: fails after the rest
    with pytest.raises(KeyError):
        db.record(config, "mlxinfer", 0, {"decode_tps": 1.0}, [1, 2], [10.0, 20.0], None, [broken])
    assert db.measurements(run) == [] and db.requests(run) == []
    db.record(config, "mlxinfer", 0, {"decode_tps": 1.0}, [1, 2], [10.0, 20.0])
    assert len(db.measurements(run)) == 1


ROUNDS, OPENERS = 100, 6


def test_processes_creating_one_database_at_once_all_open_it(tmp_path):
    """Switching a new database to WAL takes a lock SQLite's busy timeout does not wait for:
    openers racing to create it failed "database is locked" in some rounds (RunsDB before the
    retry: 3 of 40 rounds of 4 openers; this test, 100 rounds of 6, failed 6 of 7 times). Each opener here is a thread with its own connection, as a process
    would be."""
    failures = []
    for round_ in range(ROUNDS):
        path = tmp_path / f"runs-{round_}.sqlite"
        barrier = threading.Barrier(OPENERS)

        def open_it(path=path, barrier=barrier, round_=round_):
            barrier.wait()
            try:
                RunsDB(path).close()
            except Exception as e:
                failures.append(f"round {round_}: {e}")

        openers = [threading.Thread(target=open_it) for _ in range(OPENERS)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(timeout=60)
    assert failures == []
