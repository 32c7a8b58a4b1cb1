"""Running a sweep: every configuration of the grid, a warm-up then `reps` repetitions, each
measurement committed to the runs database the moment it exists; a resumed run skips what it has.

    sweep = Sweep(parse_axes({"temperature": "0,0.8"}), reps=5, db=RunsDB())
    for event in sweep.run(cancel=threading.Event()):   # progress events; the dashboard drives it
        print(event.kind, event.index, event.total, event.metrics)

Each measurement runs through an Engine (so concurrency is an axis like the others):
`concurrency` requests of exactly `prompt_tokens` tokens of public-domain text (KJV Genesis,
repeated as needed) submitted at once, each generating exactly `gen_tokens` tokens (EOS ignored),
seeded per repetition. With `depth`, a context of that many tokens is computed first (not timed)
and kept by the prefix cache: the measured prompt follows it, as a new turn follows a long
conversation. A measurement's metrics are the means over its concurrent requests; its token times
are the first request's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .db import METRICS as _METRICS
from .db import RunsDB
from .grid import SAMPLING_AXES, config_key, expand, parse_kv, sampling_params

ENGINE = "mlxinfer"
BASELINE = "mlx-lm"
TEXT = Path(__file__).with_name("kjv_genesis.txt")


@dataclass
class SweepEvent:
    """What happened: 'measured', 'failed', 'skipped' (a resumed run has it), 'finished' or
    'stopped' (cancelled; resume with the run id)."""

    kind: str
    run_id: int
    index: int  # configuration, 0-based
    total: int
    config: dict = field(default_factory=dict)
    rep: int | None = None
    metrics: dict | None = None
    error: str | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None  # time left, from the pace so far
    engine: str = ENGINE


class Sweep:
    """A new run of the grid `axes` (parse_axes' output) into `db`; `Sweep.resume` continues one."""

    def __init__(
        self,
        axes: Mapping[str, list],
        reps: int = 5,
        db: RunsDB | None = None,
        command: str = "mlxinfer.bench",
        sweep_text: str | None = None,
        seed: int = 0,
        baseline: str | None = None,
    ):
        if baseline not in (None, BASELINE):
            raise ValueError(f"baseline must be {BASELINE} or None, got {baseline!r}")
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise ValueError(f"reps must be an integer >= 1, got {reps!r}")
        db = db or RunsDB()
        run_id = db.start_run(command, machine_facts(), reps, sweep_text, baseline)
        self._attach(db, run_id, list(expand(axes)), reps, seed, baseline)

    @classmethod
    def resume(cls, db: RunsDB, run_id: int, seed: int = 0) -> Sweep:
        """A stopped run of `db`, with its own configurations, repetitions and baseline."""
        run = db.resume_run(run_id)
        sweep = cls.__new__(cls)
        sweep._attach(db, run_id, db.configurations(run_id), run["reps"], seed, run["baseline"])
        return sweep

    def _attach(self, db, run_id, configs, reps, seed, baseline) -> None:
        self.db, self.run_id, self.configs = db, run_id, configs
        self.reps, self.seed, self.baseline = reps, seed, baseline
        self.config_ids = db.add_configurations(run_id, [(config_key(c), c) for c in configs])
        self._models: dict = {}
        self._workers: dict = {}

    def run(self, cancel: threading.Event | None = None) -> Iterator[SweepEvent]:
        """Measure what the run does not have yet, yielding an event after each measurement."""
        try:
            yield from self._run(cancel)
        finally:
            self.close()

    def _run(self, cancel: threading.Event | None) -> Iterator[SweepEvent]:
        done = self.db.done(self.run_id)
        total, start, measured = len(self.configs), time.perf_counter(), 0
        engines = [ENGINE] + ([BASELINE] if self.baseline else [])
        todo = sum(
            1
            for c in self.configs
            for rep in range(self.reps)
            for name in engines
            if (config_key(c), name, rep) not in done
        )
        for index, (config, config_id) in enumerate(
            zip(self.configs, self.config_ids, strict=True)
        ):
            key = config_key(config)
            reps = [
                rep for rep in range(self.reps)
                if any((key, name, rep) not in done for name in engines)
            ]  # fmt: skip
            if not reps:
                yield SweepEvent("skipped", self.run_id, index, total, config)
                continue
            try:
                engine, prompts = self._setup(config)
            except Exception as e:  # this configuration fails; the sweep goes on
                for rep in reps:
                    for name in engines:
                        if (key, name, rep) not in done:
                            self.db.record(config_id, name, rep, error=_reason(e))
                yield SweepEvent("failed", self.run_id, index, total, config, error=_reason(e))
                continue
            engines = [ENGINE] + ([BASELINE] if self.baseline else [])
            try:
                self._measure(engine, prompts, config, rep=None)  # warm-ups, not recorded
                if self.baseline:
                    self._measure_baseline(config, prompts, rep=None)
                for rep in reps:
                    for name in engines:
                        if (key, name, rep) in done:
                            continue
                        if cancel is not None and cancel.is_set():
                            self.db.finish_run(self.run_id, "stopped")
                            yield SweepEvent("stopped", self.run_id, index, total, config)
                            return
                        try:
                            if name == ENGINE:
                                metrics, tokens, times = self._measure(engine, prompts, config, rep)
                            else:
                                metrics, tokens, times = self._measure_baseline(
                                    config, prompts, rep
                                )
                        except Exception as e:
                            self.db.record(config_id, name, rep, error=_reason(e))
                            yield SweepEvent(
                                "failed", self.run_id, index, total, config, rep, error=_reason(e),
                                engine=name,
                            )  # fmt: skip
                            continue
                        self.db.record(config_id, name, rep, metrics, tokens, times)
                        measured += 1
                        elapsed = time.perf_counter() - start
                        eta = elapsed / measured * max(todo - measured, 0)
                        yield SweepEvent(
                            "measured", self.run_id, index, total, config, rep, metrics,
                            elapsed_s=elapsed, eta_s=eta, engine=name,
                        )  # fmt: skip
            finally:
                engine.close(cancel=True)
        self.db.finish_run(self.run_id, "done")
        yield SweepEvent(
            "finished", self.run_id, total, total, elapsed_s=time.perf_counter() - start
        )

    # -- one configuration -----------------------------------------------------------------------

    def _setup(self, config: Mapping):
        from ..engine import Engine

        model, tokenizer = self._model(config["model"], config["compute"])
        depth, n, gen = config["depth"], config["prompt_tokens"], config["gen_tokens"]
        context = model.config.max_position_embeddings
        if depth + n + gen > context:
            raise ValueError(
                f"depth {depth} + prompt {n} + gen {gen} tokens exceed the model's context of "
                f"{context}"
            )
        text = exact_tokens(tokenizer, depth + n * config["concurrency"])
        shared, rest = text[:depth], text[depth:]
        prompts = [shared + rest[i * n : (i + 1) * n] for i in range(config["concurrency"])]
        options = parse_kv(config["kv"])
        engine = Engine(
            model, tokenizer, max_batch=config["concurrency"],
            prefix_cache_mb=1024 if depth else 0, **options,
        )  # fmt: skip
        # What the configuration needs: the weights, and the KV of its rows as the batch
        # allocates it (plus the prefix cache's copy of the context).
        tokens = depth + n + gen
        kv = engine.scheduler.kv_bytes(config["concurrency"], tokens)
        kv += engine.scheduler.kv_bytes(1, depth) if depth else 0
        self.predicted_mb = (model.nbytes + kv) / 2**20
        available = available_memory_mb()
        if available is not None and self.predicted_mb > available:
            engine.close()
            raise MemoryError(
                f"needs ~{self.predicted_mb:.0f} MB (weights {model.nbytes / 2**20:.0f} MB + KV "
                f"cache {kv / 2**20:.0f} MB), {available:.0f} MB available: not run"
            )
        if depth:  # the context, computed once and kept by the prefix cache
            engine.submit(shared + [prompts[0][depth]], max_tokens=1).result()
        return engine, prompts

    def _measure(self, engine, prompts: list[list[int]], config: Mapping, rep: int | None):
        seed = self.seed + (0 if rep is None else rep) * 1000
        handles = [
            engine.submit(p, sampling=sampling_params(config, seed + i))
            for i, p in enumerate(prompts)
        ]
        results = [h.result() for h in handles]
        for r in results:
            if r.finish_reason != "length":
                raise RuntimeError(f"a request ended with {r.finish_reason}: {r.error}")
        metrics = {}
        for name in _METRICS:
            if name == "predicted_memory_mb":
                continue
            values = [getattr(r.metrics, name) for r in results]
            metrics[name] = sum(values) / len(values)
        metrics["predicted_memory_mb"] = self.predicted_mb
        first = results[0].metrics
        times = [first.ttft_ms + sum(first.itl_ms[:i]) for i in range(len(first.itl_ms) + 1)]
        return metrics, results[0].tokens, times

    def _measure_baseline(self, config: Mapping, prompts: list[list[int]], rep: int | None):
        worker = self._worker(config["model"], config["compute"])
        sampling = {name: config[name] for name in SAMPLING_AXES}
        reply = worker.run({
            "prompt": prompts[0], "gen": config["gen_tokens"], "sampling": sampling,
            "seed": self.seed + (0 if rep is None else rep) * 1000, "depth": config["depth"],
            "kv": parse_kv(config["kv"]), "concurrency": config["concurrency"],
        })  # fmt: skip
        if "error" in reply:
            raise RuntimeError(reply["error"])
        metrics = {name: reply["metrics"][name] for name in _METRICS if name in reply["metrics"]}
        metrics["predicted_memory_mb"] = self.predicted_mb
        return metrics, reply["tokens"], reply["times"]

    def _worker(self, name: str, compute: str):
        key = (name, compute)
        if key not in self._workers:
            from .baseline import MlxLmBaseline

            model, tokenizer = self._model(name, compute)
            path = None if name == "default" else name
            self._workers[key] = MlxLmBaseline(path, model, tokenizer)
        return self._workers[key]

    def close(self) -> None:
        """Stop the baseline workers."""
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    def _model(self, name: str, compute: str):
        key = (name, compute)
        if key not in self._models:
            from ..loading import load

            self._models[key] = load(None if name == "default" else name, compute=compute)
        return self._models[key]


def machine_facts() -> dict:
    """The machine and software a run was measured on."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import mlx.core as mx

    from .. import __version__
    from ..backend import blas_status, cpu_name, gemv_shim_status

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    )
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "os": platform.platform(),
        "backend": str(mx.default_device()),
        "blas": blas_status(),
        "gemv_shim": gemv_shim_status(),
        "mlx": mx.__version__,
        "mlx_lm": package("mlx-lm"),
        "mlxinfer": __version__,
    }


def available_memory_mb() -> float | None:
    """Memory the system could still give (Linux: MemAvailable), or None where unknown (macOS
    reports its unified memory differently; MLX's own limit applies there)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def exact_tokens(tokenizer, n: int) -> list[int]:
    """Exactly `n` token ids of public-domain text (KJV Genesis, repeated as needed)."""
    ids = tokenizer.encode(TEXT.read_text())
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
