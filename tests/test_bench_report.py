"""What the report derives from recorded measurements, checked against values worked out by hand:
latency by token position (its table and CSV)."""

from __future__ import annotations

import csv
import io

import pytest

from mlxinfer.bench import report
from mlxinfer.bench.db import RunsDB
from mlxinfer.bench.grid import config_key, expand, parse_axes


def test_latency_by_position(tmp_path):
    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", {"cpu": "test"}, reps=3)
    configs = list(expand(parse_axes({"temperature": "0,0.8"})))
    ids = db.add_configurations(run, [(config_key(c), c) for c in configs])
    # token arrival times (ms from the request's start) of three repetitions of 6 tokens
    reps = [
        [10, 12, 14, 16, 18, 30],  # gaps 10 | 2 2 2 2 12
        [20, 23, 26, 29, 32, 35],  # gaps 20 | 3 3 3 3 3
        [15, 16, 17, 18, 19, 20],  # gaps 15 | 1 1 1 1 1
    ]
    for rep, times in enumerate(reps):
        db.record(ids[0], "mlxinfer", rep, {"decode_tps": 1.0}, [0] * 6, times)
    db.record(ids[1], "mlxinfer", 0, error="boom")  # failed rows have no positions
    (item,) = report.latency_by_position(db, run)
    assert item["engine"] == "mlxinfer" and item["settings"]["temperature"] == 0.0
    assert item["p50_ms"] == pytest.approx([15, 2, 2, 2, 2, 3])
    # numpy's linear interpolation: 90th percentile of (a, b, c) sorted = b + 0.8 (c - b)
    assert item["p90_ms"] == pytest.approx([19, 2.8, 2.8, 2.8, 2.8, 10.2])
    table = report.position_table([item], buckets=2).splitlines()
    assert table[0] == "| engine | first (ms) | 1-3 | 4-5 |"
    assert table[2] == "| mlxinfer | 15.0 | 2.0 | 2.5 |"  # medians of (2,2,2) and (2,3)
    rows = list(csv.DictReader(io.StringIO(report.positions_csv([item]))))
    assert [float(r["p50_ms"]) for r in rows] == pytest.approx([15, 2, 2, 2, 2, 3])
    assert [int(r["token"]) for r in rows] == list(range(6))
