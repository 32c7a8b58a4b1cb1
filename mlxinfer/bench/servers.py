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

import json
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
        ranks: int = 1,
    ):
        """With `ranks` > 1, `command` runs once per rank as one MLX ring group on loopback (as
        `mlx.launch` starts it: MLX_HOSTFILE and MLX_RANK), and rank 0 serves; the ranks share
        this machine's cores (OMP_NUM_THREADS = cores / ranks each, unless it is set)."""
        self.name = name
        port = free_port()
        self.hosts: str | None = None  # the group's hostfile
        if ranks > 1:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as hosts:
                json.dump([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)], hosts)
            self.hosts = hosts.name
        self.logs, self.processes = [], []
        for rank in range(ranks):
            log = tempfile.TemporaryFile(mode="w+")  # its output, for the error if it dies
            group = {}
            if self.hosts is not None:
                group = {"MLX_HOSTFILE": self.hosts, "MLX_RANK": str(rank)}
                if "OMP_NUM_THREADS" not in os.environ:  # the ranks share this machine's cores
                    group["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
            self.logs.append(log)
            self.processes.append(
                subprocess.Popen(
                    [*command, "--host", "127.0.0.1", "--port", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {}), **group},
                )
            )
        self.log, self.process = self.logs[0], self.processes[0]  # rank 0: the server
        self.target = Target(f"http://127.0.0.1:{port}", model_id=model_id)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            for rank, process in enumerate(self.processes):
                if process.poll() is not None:
                    which = f" (rank {rank})" if len(self.processes) > 1 else ""
                    raise RuntimeError(
                        f"{self.name}{which} exited with {process.returncode} before it was "
                        f"ready: {self.output(rank)[-600:].strip()}"
                    )
            if self.target.ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {READY_S:.0f} s")

    def output(self, rank: int = 0) -> str:
        self.logs[rank].seek(0)
        return self.logs[rank].read()

    def close(self) -> None:
        """SIGTERM to every rank (as mlx.launch forwards it), then SIGKILL after 30 s."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()
        if self.hosts is not None:
            Path(self.hosts).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def mlxinfer(cls, model: str, config: Mapping) -> ServerProcess:
        """`mlxinfer serve` on `model` ("default" or a path) with the configuration's engine
        settings (`serve_command`)."""
        command, ranks = serve_command(model, config)
        return cls("mlxinfer serve", command, ranks=ranks)

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


def serve_command(model: str, config: Mapping) -> tuple[list[str], int]:
    """(the `mlxinfer serve` command line, its ranks) for `model` ("default" or a path) with a
    configuration's engine settings: rows = concurrency, KV cache kind, compute policy, its draft
    model (spec "draft:PATH[:N]"), split over ranks on this machine by `parallel`. Its prefix
    cache is on only with `depth`, as in process."""
    from .grid import parse_kv, spec_draft

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
    draft = spec_draft(str(config.get("spec", "none")))
    if draft is not None:  # (one argument: a path may start with "-")
        if draft == "default":
            from ..loading import default_model_path

            draft = str(default_model_path())
        command += [f"--draft-model={draft}"]
    ranks = 1
    if config.get("parallel", "none") != "none":
        mode, _, count = config["parallel"].partition(":")
        command += ["--parallel", mode]
        ranks = int(count)
    return command, ranks
