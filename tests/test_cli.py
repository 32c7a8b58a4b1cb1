"""The `mlxinfer` command, run as a user runs it."""

from __future__ import annotations

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
    assert "--max-tokens" in result.stderr
