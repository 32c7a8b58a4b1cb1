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


def _requests_run(tmp_path):
    """A run of two configurations (concurrency 2 and 4), two repetitions each, whose requests'
    figures are chosen so percentiles and goodput can be worked out by hand."""
    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", {"cpu": "test"}, reps=2)
    configs = list(expand(parse_axes({"concurrency": "2,4"})))
    ids = db.add_configurations(run, [(config_key(c), c) for c in configs])

    def request(ttft, gap, tokens=5):  # evenly spaced tokens
        return {
            "ttft_ms": ttft,
            "e2e_ms": ttft + gap * (tokens - 1),
            "tokens": tokens,
            "gaps": [gap] * (tokens - 1),
        }

    # concurrency 2: TTFTs 10, 20 | 30, 40; every gap 5 ms except one request's 50 ms
    two = [[request(10, 5), request(20, 5)], [request(30, 5), request(40, 50)]]
    # concurrency 4: TTFTs 100..400 and 500..800, gaps 20 ms
    four = [
        [request(100 * k, 20) for k in (1, 2, 3, 4)],
        [request(100 * k, 20) for k in (5, 6, 7, 8)],
    ]
    for config_id, reps in zip(ids, (two, four), strict=True):
        for rep, requests in enumerate(reps):
            metrics = {"decode_tps": 1.0}
            db.record(config_id, "mlxinfer", rep, metrics, [0] * 5, [], None, requests)
    return db, run


def test_latency_percentiles_are_over_every_request_and_gap(tmp_path):
    db, run = _requests_run(tmp_path)
    two, four = report.request_latencies(db.requests(run))
    assert (two["settings"]["concurrency"], two["requests"], two["gaps"]) == (2, 4, 16)
    # TTFTs 10 20 30 40: linear interpolation, p50 = 25, p90 = 30 + 0.7 * 10, p99 = 30 + 0.97 * 10
    assert (two["ttft_p50_ms"], two["ttft_p90_ms"], two["ttft_p99_ms"]) == pytest.approx(
        (25, 37, 39.7)
    )
    # gaps: twelve of 5 ms, four of 50 ms: p50 5; p90 at rank 13.5 of 0..15, among the 50s
    assert (two["itl_p50_ms"], two["itl_p90_ms"], two["itl_p99_ms"]) == pytest.approx((5, 50, 50))
    # TTFTs 100..800: p50 450, p90 730 (rank 6.3), p99 793 (rank 6.93)
    assert (four["ttft_p50_ms"], four["ttft_p90_ms"], four["ttft_p99_ms"]) == pytest.approx(
        (450, 730, 793)
    )
    assert four["itl_p99_ms"] == pytest.approx(20) and four["requests"] == 8


def test_goodput_counts_only_the_requests_within_the_targets(tmp_path):
    db, run = _requests_run(tmp_path)
    # no target: every request's tokens over the wall time (the slowest request's end)
    two, four = report.goodput(db.requests(run))
    # concurrency 2, rep 0: 10 tokens / 40 ms (20 + 4 * 5); rep 1: 10 tokens / 240 ms (40 + 200)
    assert two["goodput_tps"]["samples"] == pytest.approx([10 / 0.040, 10 / 0.240])
    assert two["good_share"] == 1.0 and two["requests"] == 4
    # TTFT <= 35 ms and mean gap <= 10 ms: rep 0 both good; rep 1 only the 30 ms one (the other
    # waits 40 ms and gaps 50 ms)
    two, four = report.goodput(db.requests(run), ttft_ms=35, itl_ms=10)
    assert two["goodput_tps"]["samples"] == pytest.approx([10 / 0.040, 5 / 0.240])
    assert two["good_share"] == 0.75
    # concurrency 4: TTFT <= 350 leaves 100, 200, 300 in rep 0 (wall 400 + 80) and none in rep 1
    _, four = report.goodput(db.requests(run), ttft_ms=350)
    assert four["goodput_tps"]["samples"] == pytest.approx([15 / 0.480, 0.0])
    assert four["good_share"] == 3 / 8
    # the inter-token target alone: concurrency 4's gaps of 20 ms all miss 10 ms
    _, four = report.goodput(db.requests(run), itl_ms=10)
    assert four["goodput_tps"]["mean"] == 0.0 and four["good_share"] == 0.0


def test_a_run_without_request_figures_has_no_percentiles_or_goodput(tmp_path):
    """Runs made before schema 4 kept means only: nothing is made up for them."""
    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", {"cpu": "test"}, reps=1)
    (config_id,) = db.add_configurations(run, [("a", {"concurrency": 1})])
    db.record(config_id, "mlxinfer", 0, {"decode_tps": 1.0}, [0, 0], [10.0, 20.0])
    assert (
        report.request_latencies(db.requests(run)) == [] and report.goodput(db.requests(run)) == []
    )
