"""A worker process spoken to in JSON lines: what every out-of-process measurement uses (the mlx-lm
baseline of a sweep, and the benchmarks' mlx-lm workers and A/B checkouts in benchmarks/).

    worker = JsonWorker([sys.executable, "-m", "mlxinfer.bench.baseline", path], env={...})
    worker.facts        # the first line the worker printed: it is ready (its BLAS, its path, ...)
    worker.ask({...})   # one request line, one reply line
    worker.close()

Each side of a comparison runs in its own process, so neither's libraries, threads or memory
reach the other's figures, and the two can be alternated (the protocol in BENCHMARKING.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


class WorkerError(RuntimeError):
    """The worker exited, or never said it was ready."""


class JsonWorker:
    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ):
        """Start `command` with the environment plus `env`, and wait for its first line (a JSON
        object: `facts`)."""
        self.command = list(command)
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        ready = self._read()
        if ready is None:
            self.close()
            raise WorkerError(f"the worker did not start: {' '.join(self.command)}")
        self.facts: dict = ready

    def ask(self, request: Mapping) -> dict:
        """Send one request, wait for its reply."""
        if self.process.stdin is None or self.process.poll() is not None:
            raise WorkerError(f"the worker has exited: {' '.join(self.command)}")
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        if reply is None:
            raise WorkerError(f"the worker exited: {' '.join(self.command)}")
        return reply

    def _read(self) -> dict | None:
        line = self.process.stdout.readline() if self.process.stdout else ""
        return json.loads(line) if line else None

    def close(self, timeout: float = 60) -> None:
        """Close its input (its loop ends) and wait; a worker still busy after `timeout` seconds
        (a long request) is killed."""
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> JsonWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
