"""Servers a sweep starts for itself: `mlxinfer serve` and `mlx_lm.server` on the same weights,
each in its own process on a free loopback port (`--baseline mlx-lm-server`).

    with ServerProcess.mlxinfer(model="default", config=config) as server:
        server.target.wave([...])          # an http.Target at its URL

Both get the configuration's engine settings where they have them: ours its KV cache kind,
compute policy and `concurrency` rows; mlx-lm's its quantized KV cache (which turns its batching
off: its own rule) and no rotating cache (it has no flag for one: refused, naming it). mlx-lm's
server runs as its sweep worker does: float32 weights with OpenBLAS loaded first and without
mlxinfer's gemv shim (baseline.NO_SHIM).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .http import Target

READY_S = 300.0  # loading a model, at most
MLX_LM_SERVER = "import mlxinfer, sys; from mlx_lm.server import main; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as `command` (with `--port` added), ready when its /v1/models answers."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        model_id: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.name = name
        port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")  # its output, for the error if it dies
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.target = Target(f"http://127.0.0.1:{port}", model_id=model_id)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before it was ready: "
                    f"{self.output()[-600:].strip()}"
                )
            if self.target.ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {READY_S:.0f} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def mlxinfer(cls, model: str, config: Mapping) -> ServerProcess:
        """`mlxinfer serve` on `model` ("default" or a path) with the configuration's engine
        settings (rows = concurrency, KV cache kind, compute policy). Its prefix cache is on only
        with `depth`, as in process."""
        from .grid import parse_kv

        command = [sys.executable, "-m", "mlxinfer", "serve", "--compute", config["compute"]]
        command += [] if model == "default" else ["--model", model]
        command += ["--max-batch", str(config["concurrency"])]
        command += ["--prefix-cache-mb", "1024" if config["depth"] else "0"]
        kv = parse_kv(config["kv"])
        for flag, key in (
            ("--max-kv-size", "max_kv_size"),
            ("--kv-keep", "kv_keep"),
            ("--kv-bits", "kv_bits"),
        ):
            if kv.get(key) is not None:
                command += [flag, str(kv[key])]
        return cls("mlxinfer serve", command)

    @classmethod
    def mlx_lm(cls, model_dir: str | Path, config: Mapping) -> ServerProcess:
        """`mlx_lm.server` on the Hugging Face style directory `model_dir`."""
        from .baseline import NO_SHIM
        from .grid import parse_kv

        kv = parse_kv(config["kv"])
        if kv.get("max_kv_size"):
            raise ValueError("mlx_lm.server has no rotating KV cache (no --max-kv-size)")
        command = [sys.executable, "-c", MLX_LM_SERVER, "--model", str(model_dir)]
        if kv.get("kv_bits"):
            command += ["--kv-bits", str(kv["kv_bits"])]
        return cls("mlx_lm.server", command, model_id=str(model_dir), env=NO_SHIM)
