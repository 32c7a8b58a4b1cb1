"""The README's Python API example runs as written, in a fresh process (import order matters)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs():
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # e.g. mlx.core imported before mlxinfer
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.search(r"(eos|stop|length) \d+\.\d+$", last_line), last_line
