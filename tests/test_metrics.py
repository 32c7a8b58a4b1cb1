"""Metrics from hand-made timestamps, by the definitions in BENCHMARKS.md (Protocol)."""

from __future__ import annotations

import pytest

from mlxinfer.metrics import decode_tps, inter_token_latencies_ms, percentile, request_metrics


def test_metrics_from_hand_made_timestamps():
    # start at 10.0 s; first token after 0.5 s, then gaps of 0.1, 0.1, 0.2 s
    m = request_metrics(
        start=10.0,
        token_times=[10.5, 10.6, 10.7, 10.9],
        prompt_tokens=100,
        cached_prompt_tokens=20,
        weight_bytes_per_step=2_000_000_000,
        peak_memory_bytes=3 * 2**20,
        active_memory_bytes=2**20,
        kv_cache_bytes=2**19,
    )
    assert m.ttft_ms == pytest.approx(500.0)
    assert m.prefill_tps == pytest.approx(80 / 0.5)  # cached prompt tokens are not counted
    assert m.decode_tps == pytest.approx(3 / 0.4)
    assert m.tpot_ms == pytest.approx((900.0 - 500.0) / 3)
    assert m.e2e_ms == pytest.approx(900.0)
    assert m.itl_ms == pytest.approx([100.0, 100.0, 200.0])
    assert m.itl_p50_ms == pytest.approx(100.0)
    assert m.itl_p90_ms == pytest.approx(180.0)  # linear interpolation between 100 and 200
    assert m.itl_p99_ms == pytest.approx(198.0)
    assert m.generated_tokens == 4 and m.prompt_tokens == 100
    assert m.peak_memory_mb == 3.0 and m.active_memory_mb == 1.0 and m.kv_cache_mb == 0.5
    assert m.bandwidth_gbs == pytest.approx(2.0 * 7.5)


def test_single_token_has_no_decode_rate():
    m = request_metrics(start=0.0, token_times=[0.25], prompt_tokens=10)
    assert m.ttft_ms == pytest.approx(250.0) and m.e2e_ms == pytest.approx(250.0)
    assert m.decode_tps == 0.0 and m.tpot_ms == 0.0 and m.itl_ms == []
    assert m.itl_p99_ms == 0.0


def test_helpers():
    assert inter_token_latencies_ms([1.0, 1.002, 1.005]) == pytest.approx([2.0, 3.0])
    assert decode_tps([0.0, 1.0, 2.0]) == pytest.approx(1.0)
    assert decode_tps([5.0]) == 0.0
    assert percentile([], 50) == 0.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)


def test_to_dict_has_every_documented_name():
    names = set(request_metrics(0.0, [0.1, 0.2], 5).to_dict())
    documented = {
        "ttft_ms",
        "prefill_tps",
        "decode_tps",
        "tpot_ms",
        "itl_ms",
        "itl_p50_ms",
        "itl_p90_ms",
        "itl_p99_ms",
        "e2e_ms",
        "peak_memory_mb",
        "active_memory_mb",
        "kv_cache_mb",
        "prompt_tokens",
        "generated_tokens",
        "bandwidth_gbs",
    }
    assert documented <= names
