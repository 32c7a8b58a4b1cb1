"""The `mlxinfer` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxinfer", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_chat_with_default_model():
    result = run_cli("generate", "--chat", "--prompt", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_respects_max_tokens():
    result = run_cli("generate", "--prompt", "The quick brown fox", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    # the first three golden greedy ids (tests/data/smollm2_golden.json): 351, 253, 2365
    assert result.stdout == " with a quick\n"


def test_missing_model_is_a_clear_error(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 1
    assert "mlxinfer: error:" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_max_tokens():
    result = run_cli("generate", "--prompt", "hi", "--max-tokens", "0")
    assert result.returncode == 2
    assert "max_tokens must be an integer >= 1, got 0" in result.stderr


def test_json_output_has_text_and_metrics():
    result = run_cli("generate", "--chat", "--prompt", "What is the capital of France?", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["text"] == "The capital of France is Paris."
    assert out["finish_reason"] == "eos"
    assert out["metrics"]["generated_tokens"] == len(out["token_ids"]) == 8
    assert out["metrics"]["ttft_ms"] > 0 and out["metrics"]["decode_tps"] > 0
    assert out["compute_policy"] in ("float32", "native") and out["blas"]


def test_stream_stop_and_sampling_flags():
    result = run_cli(
        "generate", "--chat", "--prompt", "What is the capital of France?", "--stream",
        "--stop", "Paris", "--temperature", "0.5", "--top-k", "1", "--seed", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is \n"


def test_ignore_eos_generates_exactly_max_tokens():
    result = run_cli(
        "generate", "--chat", "--prompt", "What is the capital of France?",
        "--ignore-eos", "--max-tokens", "10", "--json",
    )  # fmt: skip
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 10 and out["finish_reason"] == "length"


def test_invalid_sampling_flag_is_a_clear_error():
    result = run_cli("generate", "--prompt", "hi", "--top-p", "1.5")
    assert result.returncode == 2
    assert "top_p must be in (0, 1], got 1.5" in result.stderr
    assert "Traceback" not in result.stderr


def test_bounded_quantized_cache_flags():
    result = run_cli(
        "generate", "--chat", "--prompt", "What is the capital of France?", "--json",
        "--max-kv-size", "64", "--kv-keep", "4", "--kv-bits", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["text"] == "The capital of France is Paris."
    assert out["kv_cache"] == {"max_kv_size": 64, "keep": 4, "bits": 8, "group_size": 64}
    # 30 layers x (k, v) x 64 tokens x 3 kv heads x 64 dims, 8-bit + float32 scale/bias per 64
    expected_mb = 30 * 2 * 64 * 3 * (64 + 8) / 2**20
    assert abs(out["metrics"]["kv_cache_mb"] - expected_mb) < 1e-3


def test_bad_cache_flag_is_a_clear_error():
    result = run_cli("generate", "--prompt", "hi", "--max-kv-size", "3")
    assert result.returncode == 1
    assert "max_kv_size (3) must be larger than kv_keep (4)" in result.stderr
    assert "Traceback" not in result.stderr
