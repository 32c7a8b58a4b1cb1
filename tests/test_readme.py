"""The README's Python API example runs as written, in a fresh process (import order matters)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs():
    """The API example, then the batching example (which uses its model, tokenizer and params)."""
    text = README.read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    batching = re.search(r"## Many requests at once.*?```python\n(.*?)```", text, re.S).group(1)
    block += batching + 'print(result.finish_reason, response.finish_reason, end=" ")\n'
    block += "print(response.finish_reason, response.metrics.decode_tps)\n"
    result = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # e.g. mlx.core imported before mlxinfer
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.search(r"(eos|stop|length) \d+\.\d+$", last_line), last_line


def test_inside_the_model_example_runs():
    """The example of "Inside the model", as written, on the default model: its printed top
    prediction is ' Paris' (77% against 6% for the runner-up: no near tie)."""
    text = README.read_text()
    block = re.search(r"## Inside the model.*?```python\n(.*?)```", text, re.S).group(1)
    block += "assert [name for name, _ in stages][-1] == 'temperature' and len(tokens) == 200\n"
    result = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert result.stdout.startswith("(7042, ' Paris', 0.7"), result.stdout
