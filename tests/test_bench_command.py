"""`mlxinfer bench` end to end on a tiny random checkpoint: a sweep from flags or a TOML file,
the table, the JSON and CSV exports, list and compare, and bad input refused before anything runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest


def bench(*args, db, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "mlxinfer", "bench", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def two_runs_of_a_small_grid(model: str, db, timeout: float = 300) -> None:
    """`mlxinfer bench` twice on the same grid (top-k 0 and 5, 8-token prompts, 5 tokens, 2
    repetitions): two runs for the Results page to list and compare."""
    for _ in range(2):
        grid = ["--top-k", "0,5", "--prompt-tokens", "8", "--gen-tokens", "5", "--reps", "2"]
        result = bench("--model", model, *grid, db=db, timeout=timeout)
        assert result.returncode == 0, result.stderr


def test_a_sweep_from_flags_then_list_export_and_compare(tiny, tmp_path):
    db, out = tmp_path / "runs.sqlite", tmp_path / "out.json"
    grid = ["--model", tiny, "--temperature", "0,0.8", "--prompt-tokens", "8", "--gen-tokens", "4"]
    result = bench(*grid, "--reps", "2", "--json", str(out), db=db)
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert table[0].startswith(
        "| engine | temperature | prefill tok/s | decode tok/s | total tok/s"
    )
    assert len(table) == 4 and "| mlxinfer | 0.8 |" in result.stdout
    items = json.loads(out.read_text())
    assert [(i["engine"], i["temperature"]) for i in items] == [
        ("mlxinfer", 0.0),
        ("mlxinfer", 0.8),
    ]
    assert all(len(i["decode_tps"]["samples"]) == 2 and i["decode_tps"]["mean"] > 0 for i in items)
    assert items[0]["sampling_cost"] == pytest.approx(1.0)  # the greedy one is its own baseline
    assert items[1]["sampling_cost"] > 0
    again = bench(*grid, "--reps", "1", db=db)
    assert again.returncode == 0, again.stderr
    listed = bench("list", db=db).stdout.splitlines()
    assert len(listed) == 2 and all("done" in line for line in listed)
    csv_path = tmp_path / "run1.csv"
    assert bench("export", "1", "--csv", str(csv_path), db=db).returncode == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    positions = bench("positions", "1", "--buckets", "2", db=db)
    assert positions.returncode == 0, positions.stderr
    assert positions.stdout.splitlines()[0] == "| engine | temperature | first (ms) | 1-2 | 3-3 |"
    compared = bench("compare", "1", "2", db=db)
    assert compared.returncode == 0 and len(compared.stdout.splitlines()) == 2


def test_a_sweep_file(tiny, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'model = "{tiny}"\ntop_k = [0, 5]\nprompt_tokens = 8\ngen_tokens = 3\n')
    result = bench("--sweep", str(sweep), "--reps", "1", db=tmp_path / "runs.sqlite")
    assert result.returncode == 0, result.stderr
    assert "| mlxinfer | 5 |" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "0,-1"], "sweep axis 'temperature'"),
        (["--kv", "q3"], "sweep axis 'kv': 'q3'"),
        (["--reps", "0"], "--reps must be >= 1"),
        (["--resume", "9"], "no run 9"),
        (["export", "1"], "no run 1"),
        (["--sweep", "/nonexistent.toml"], "cannot read sweep file /nonexistent.toml"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(tmp_path, args, message):
    result = bench(*args, db=tmp_path / "runs.sqlite")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_mlx_lm_runs_beside_with_ratios_and_token_agreement(tiny, tmp_path):
    """--baseline mlx-lm: every configuration through mlx-lm too (its own process, same weights),
    a paired ratio with its interval, and for greedy rows whether both gave the same tokens."""
    out = tmp_path / "out.json"
    result = bench(
        "--model",
        tiny,
        "--temperature",
        "0,0.8",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "5",
        "--reps",
        "2",
        "--baseline",
        "mlx-lm",
        "--json",
        str(out),
        db=tmp_path / "runs.sqlite",
    )
    assert result.returncode == 0, result.stderr
    items = json.loads(out.read_text())
    assert sorted((i["engine"], i["temperature"]) for i in items) == [
        ("mlx-lm", 0.0),
        ("mlx-lm", 0.8),
        ("mlxinfer", 0.0),
        ("mlxinfer", 0.8),
    ]
    assert all(i["failed"] == 0 and len(i["decode_tps"]["samples"]) == 2 for i in items)
    for ours in (i for i in items if i["engine"] == "mlxinfer"):
        ratio = ours["vs_mlx_lm"]["decode_tps"]
        assert ratio["low"] <= ratio["ratio"] <= ratio["high"] and ratio["n"] == 2
    greedy = next(i for i in items if i["engine"] == "mlxinfer" and i["temperature"] == 0)
    assert isinstance(greedy["same_tokens"], bool)
    assert greedy["same_tokens"] or isinstance(greedy["first_difference"], int)
    assert "decode vs mlx-lm (95% CI)" in result.stdout.splitlines()[0]


def test_ctrl_c_stops_cleanly_and_the_run_resumes(tiny, tmp_path):
    """SIGINT mid-sweep: exit 130, no traceback, the run marked stopped with the command that
    resumes it; resuming measures every configuration and repetition exactly once."""
    import signal
    import sqlite3
    import time

    from mlxinfer.bench.db import RunsDB

    db = tmp_path / "runs.sqlite"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxinfer",
            "bench",
            "--model",
            tiny,
            "--top-k",
            "0,2,4,6,8,10",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "200",
            "--reps",
            "4",
            "--db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
        try:
            with sqlite3.connect(db) as connection:
                if connection.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] >= 2:
                    break
        except sqlite3.OperationalError:  # not created yet
            continue
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"resume with: mlxinfer bench --resume 1 --db {db}" in stderr
    runs = RunsDB(db)
    assert runs.run(1)["status"] == "stopped"
    stopped_at = len(runs.measurements(1))
    assert 2 <= stopped_at < 24
    resumed = bench("--resume", "1", db=db)
    assert resumed.returncode == 0, resumed.stderr
    rows = runs.measurements(1)
    assert sorted((r["position"], r["rep"]) for r in rows) == [
        (p, k) for p in range(6) for k in range(4)
    ]
    assert all(r["status"] == "ok" for r in rows) and runs.run(1)["status"] == "done"


def one_line(result, code=2) -> str:
    """The single stderr line of a command that failed with `code`, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def limited_memory():
    """The child may have 4 GB of address space (MLX imported: ~0.4 GB): a sweep that expands a
    huge grid fails there quickly instead of filling the machine."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ValueError, OSError):  # not enforced everywhere (macOS)
        pass


def test_a_huge_grid_is_refused_at_once_with_its_size(tmp_path):
    """Four axes of 100 values (100 million configurations): refused before anything runs, with
    the count and how to shrink it (before: expanded into a list, 3 GB in 18 s, silently)."""
    from .test_bench_grid import HUGE

    flags = [
        item for axis, values in HUGE.items() for item in (f"--{axis.replace('_', '-')}", values)
    ]
    result = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "bench", *flags, "--db", str(tmp_path / "runs.sqlite")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited_memory,
    )
    line = one_line(result)
    assert "the grid has 100,000,000 configurations" in line and "fewer values" in line


def test_a_sweep_estimated_past_an_hour_is_said_so_before_it_starts(tiny, tmp_path):
    """The database's past measurements of this model say the sweep takes hours: a warning
    with the estimate and how to stop and resume, then the sweep runs."""
    from mlxinfer.bench.db import METRICS, RunsDB
    from mlxinfer.bench.grid import DEFAULTS

    db = RunsDB(tmp_path / "runs.sqlite")
    past = db.start_run("earlier", {"cpu": "test"}, reps=1)
    (config,) = db.add_configurations(past, [("k", {**DEFAULTS, "model": tiny})])
    slow = {m: 1.0 for m in METRICS} | {"prefill_tps": 1.0, "decode_tps": 0.001}
    db.record(config, "mlxinfer", 0, slow)  # 4 tokens at 0.001 tok/s: over an hour a rep
    db.finish_run(past, "done")
    result = bench(
        "--model",
        tiny,
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--reps",
        "1",
        db=tmp_path / "runs.sqlite",
    )
    assert result.returncode == 0, result.stderr
    warning = result.stderr.splitlines()[0]
    assert warning.startswith("mlxinfer bench: warning: this sweep takes ~2h13m at the speeds")
    assert warning.endswith("Ctrl-C stops it, and --resume 2 continues it")


def test_the_progress_warns_once_when_the_pace_says_more_than_an_hour():
    """No past measurements to estimate from: once a configuration is measured, a time left of
    more than an hour gets a warning line of its own, once."""
    import io

    from mlxinfer.bench.command import Progress
    from mlxinfer.bench.grid import DEFAULTS
    from mlxinfer.bench.sweep import SweepEvent

    def measured(index, eta_s):
        return SweepEvent(
            "measured",
            3,
            index,
            1000,
            dict(DEFAULTS),
            0,
            {},
            eta_s=eta_s,
            step=index + 1,
            steps=1000,
        )

    out = io.StringIO()
    show = Progress(["temperature"], 1, out)
    for event in [measured(0, 9e5), measured(1, 3000), measured(2, 205200), measured(3, 9e5)]:
        show(event)
    warnings = [line for line in out.getvalue().splitlines() if "warning" in line]
    assert warnings == [
        "mlxinfer bench: warning: ~57h00m left at this pace; Ctrl-C stops it, and --resume 3 "
        "continues it"
    ]


def test_resuming_a_run_another_process_is_measuring_is_refused(tiny, tmp_path):
    """A second `--resume` of a run whose process is alive and measuring: refused in one line
    naming the run and the process (before: taken, the owner's pid overwritten, so the
    dashboard's Stop signalled the wrong process); the owner goes on and the run resumes once
    it has stopped."""
    import signal
    import time

    from mlxinfer.bench.db import RunsDB

    db_path = tmp_path / "runs.sqlite"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxinfer",
            "bench",
            "--model",
            tiny,
            "--top-k",
            "0,2,4,6",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "200",
            "--reps",
            "4",
            "--db",
            str(db_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and owner.poll() is None:
            time.sleep(0.05)
            if db_path.exists() and RunsDB(db_path).measurements(1):
                break
        db = RunsDB(db_path)
        assert db.run(1)["pid"] == owner.pid and db.run(1)["status"] == "running"
        second = bench("--resume", "1", db=db_path)
        line = one_line(second)
        assert line == (
            f"mlxinfer bench: error: run 1 is still being measured by process {owner.pid}: stop "
            "that one first (Ctrl-C there, or Stop on the dashboard), or let it finish"
        )
        assert db.run(1)["pid"] == owner.pid and owner.poll() is None  # untouched
        owner.send_signal(signal.SIGINT)
        _, stderr = owner.communicate(timeout=120)
    finally:
        owner.kill()
    assert owner.returncode == 130, stderr
    resumed = bench("--resume", "1", db=db_path)
    assert resumed.returncode == 0, resumed.stderr
    assert len(db.measurements(1)) == 16 and db.run(1)["status"] == "done"


def unwritable_directory(tmp_path) -> Path:
    """A directory this process cannot create a file in: a read-only one, or for root (whom
    permissions do not stop) sysfs."""
    import os

    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o500)
        return directory
    if Path("/sys/kernel").is_dir():
        return Path("/sys")
    pytest.skip("root, and no sysfs to be refused by")


@pytest.mark.parametrize(
    "where", ["missing directory", "a file as directory", "unwritable", "a directory"]
)
def test_output_files_that_cannot_be_written_are_refused_before_any_work(tiny, tmp_path, where):
    """--json of a sweep, export's --csv and --json, positions' --csv: one line naming the flag
    and the file, exit 2 (before: a traceback; a sweep's --json only after the whole sweep)."""
    (tmp_path / "a-file").write_text("")
    target = {
        "missing directory": tmp_path / "missing" / "out",
        "a file as directory": tmp_path / "a-file" / "out",
        "unwritable": unwritable_directory(tmp_path) / "out",
        "a directory": tmp_path,
    }[where]
    db_path = tmp_path / "runs.sqlite"
    grid = ["--model", tiny, "--prompt-tokens", "8", "--gen-tokens", "2", "--reps", "1"]
    line = one_line(bench(*grid, "--json", str(target), db=db_path))
    assert line.startswith(f"mlxinfer bench: error: --json {target}: cannot write there: ")
    from mlxinfer.bench.db import RunsDB

    assert RunsDB(db_path).runs() == []  # refused before measuring
    assert bench(*grid, db=db_path).returncode == 0  # run 1, to export
    for args, flag in [
        (["export", "1", "--csv", str(target)], "--csv"),
        (["export", "1", "--json", str(target)], "--json"),
        (["positions", "1", "--csv", str(target)], "--csv"),
    ]:
        line = one_line(bench(*args, db=db_path))
        assert line.startswith(f"mlxinfer bench: error: {flag} {target}: cannot write there: ")


@pytest.mark.parametrize(
    "kind",
    ["another program's SQLite", "not SQLite", "a parent that is a file", "an unwritable parent"],
)
def test_a_database_that_cannot_be_the_runs_database_is_one_line_naming_it(tmp_path, kind):
    import sqlite3

    if kind == "another program's SQLite":
        path = tmp_path / "theirs.sqlite"
        with sqlite3.connect(path) as theirs:
            theirs.execute("CREATE TABLE runs (lap INTEGER, seconds REAL)")
    elif kind == "not SQLite":
        path = tmp_path / "notes.txt"
        path.write_text("not a database\n" * 100)
    elif kind == "a parent that is a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "runs.sqlite"
    else:
        path = unwritable_directory(tmp_path) / "mlxinfer" / "runs.sqlite"
    for args in (["list"], ["--resume", "1"], ["compare", "1", "2"]):
        line = one_line(bench(*args, db=path))
        assert str(path.parent if "parent" in kind else path) in line, line


def test_compare_with_an_unknown_metric_lists_the_metrics(tmp_path):
    """Before: a KeyError traceback once both runs existed."""
    from mlxinfer.bench.db import METRICS, RunsDB
    from mlxinfer.bench.grid import DEFAULTS

    db = RunsDB(tmp_path / "runs.sqlite")
    for _ in range(2):
        run = db.start_run("test", {"cpu": "test"}, reps=1)
        (config,) = db.add_configurations(run, [("k", dict(DEFAULTS))])
        db.record(config, "mlxinfer", 0, {m: 1.0 for m in METRICS})
        db.finish_run(run, "done")
    line = one_line(bench("compare", "1", "2", "--metric", "bogus", db=tmp_path / "runs.sqlite"))
    assert "--metric" in line and "'bogus'" in line
    assert all(f"'{m}'" in line for m in METRICS)
