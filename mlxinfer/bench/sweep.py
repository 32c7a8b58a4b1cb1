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
are the first request's; every request's TTFT, end-to-end time and gaps are kept too (latency
percentiles and goodput are computed over requests, not over means).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import machine
from .db import METRICS as _METRICS
from .db import RunsDB
from .grid import SAMPLING_AXES, config_key, expand, parse_kv, sampling_params

ENGINE = "mlxinfer"
BASELINE = "mlx-lm"
LONG_SWEEP_S = 3600.0  # a sweep estimated to take longer is warned of (CLI and dashboard)


def too_long(seconds: float | None) -> bool:
    """Whether a sweep estimated to take `seconds` (None: unknown) is to be warned of."""
    return seconds is not None and seconds > LONG_SWEEP_S


def engine_names(baseline: str | None) -> list[str]:
    """The engines a run measures: ours, and mlx-lm's when a baseline is asked for."""
    return [ENGINE] + ([BASELINE] if baseline else [])


TEXT = Path(__file__).with_name("kjv_genesis.txt")


@dataclass
class SweepEvent:
    """What happened: 'started' (a configuration is being set up: model, warm-up), 'measured',
    'failed', 'skipped' (a resumed run has it), 'finished' or 'stopped' (cancelled; resume with
    the run id). `step` of `steps` counts the measurements this call of run() makes."""

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
    step: int = 0
    steps: int = 0


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
        configs = list(expand(axes))
        self._models: dict = {}
        self._check(configs)
        db = db or RunsDB()
        run_id = db.start_run(command, machine.machine_facts(), reps, sweep_text, baseline)
        self._attach(db, run_id, configs, reps, seed, baseline)

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
        self._models = getattr(self, "_models", {})
        self._workers: dict = {}

    def estimated_seconds(self) -> float | None:
        """How long the run takes, from the database's past measurements (estimate()); None
        when it has none of some configuration's kind."""
        return estimate(self.configs, self.reps, engine_names(self.baseline), self.db)[0]

    @property
    def swept(self) -> list[str]:
        """The settings that differ between configurations (what a progress line shows)."""
        return [k for k in self.configs[0] if len({repr(c[k]) for c in self.configs}) > 1]

    def run(self, cancel: threading.Event | None = None) -> Iterator[SweepEvent]:
        """Measure what the run does not have yet, yielding an event after each measurement."""
        try:
            yield from self._run(cancel)
        finally:
            self.close()

    def _run(self, cancel: threading.Event | None) -> Iterator[SweepEvent]:
        done = self.db.done(self.run_id)
        engines = engine_names(self.baseline)
        total, start = len(self.configs), time.perf_counter()
        progress = {
            "step": 0,
            "steps": sum(
                (config_key(c), name, rep) not in done
                for c in self.configs
                for rep in range(self.reps)
                for name in engines
            ),
        }

        def event(kind, index, config=None, rep=None, metrics=None, error=None, engine=ENGINE):
            step, steps = progress["step"], progress["steps"]
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (steps - step) if step else None
            return SweepEvent(
                kind,
                self.run_id,
                index,
                total,
                dict(config or {}),
                rep,
                metrics,
                error,
                elapsed,
                eta,
                engine,
                step,
                steps,
            )

        for index, (config, config_id) in enumerate(
            zip(self.configs, self.config_ids, strict=True)
        ):
            key = config_key(config)
            missing = [
                (rep, name)
                for rep in range(self.reps)
                for name in engines
                if (key, name, rep) not in done
            ]
            if not missing:
                yield event("skipped", index, config)
                continue
            yield event("started", index, config)
            broken: dict[str, str] = {}  # engine -> why it cannot run this configuration
            engine = None
            try:
                engine, prompts = self._setup(config)
            except Exception as e:  # this configuration fails; the sweep goes on
                broken = dict.fromkeys(engines, _reason(e))
            try:
                for name in engines:  # warm-ups, not recorded
                    if name in broken:
                        continue
                    try:
                        self._measure_with(name, engine, prompts, config, rep=None)
                    except Exception as e:
                        broken[name] = _reason(e)
                for rep, name in missing:
                    if cancel is not None and cancel.is_set():
                        self.db.finish_run(self.run_id, "stopped")
                        yield event("stopped", index, config)
                        return
                    progress["step"] += 1
                    error = broken.get(name)
                    if error is None:
                        try:
                            metrics, tokens, times, requests = self._measure_with(
                                name, engine, prompts, config, rep
                            )
                        except Exception as e:
                            error = _reason(e)
                    if error is not None:
                        self.db.record(config_id, name, rep, error=error)
                        yield event("failed", index, config, rep, error=error, engine=name)
                        continue
                    self.db.record(config_id, name, rep, metrics, tokens, times, requests=requests)
                    yield event("measured", index, config, rep, metrics, engine=name)
            finally:
                if engine is not None:
                    engine.close(cancel=True)
        self.db.finish_run(self.run_id, "done")
        yield event("finished", total)

    def _check(self, configs: list[dict]) -> None:
        check_grid(configs, self._model)

    def _measure_with(self, name: str, engine, prompts, config: Mapping, rep: int | None):
        if name == ENGINE:
            return self._measure(engine, prompts, config, rep)
        return self._measure_baseline(config, prompts, rep)

    # -- one configuration -----------------------------------------------------------------------

    def _setup(self, config: Mapping):
        from ..cache import CacheSpec
        from ..engine import Engine

        model, tokenizer = self._model(config["model"], config["compute"])
        depth, n = config["depth"], config["prompt_tokens"]
        text = exact_tokens(tokenizer, depth + n * config["concurrency"])
        shared, rest = text[:depth], text[depth:]
        prompts = [shared + rest[i * n : (i + 1) * n] for i in range(config["concurrency"])]
        weights, kv = predicted_memory(model, config)
        self.predicted_mb = (weights + kv) / 2**20
        available = machine.available_memory_mb()
        if available is not None and self.predicted_mb > available:
            raise MemoryError(
                f"needs ~{self.predicted_mb:.0f} MB (weights {weights / 2**20:.0f} MB + KV "
                f"cache {kv / 2**20:.0f} MB), {available:.0f} MB available: not run"
            )
        engine = Engine(
            model,
            tokenizer,
            max_batch=config["concurrency"],
            prefix_cache_mb=1024 if depth else 0,
            cache=CacheSpec(**parse_kv(config["kv"])),
        )
        if depth:  # the context, computed once and kept by the prefix cache
            try:
                engine.submit(shared + [prompts[0][depth]], max_tokens=1).result()
            except BaseException:
                engine.close(cancel=True)
                raise
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
            if name in ("predicted_memory_mb", "output_tps"):
                continue
            values = [getattr(r.metrics, name) for r in results]
            metrics[name] = sum(values) / len(values)
        metrics["predicted_memory_mb"] = self.predicted_mb
        metrics["output_tps"] = output_tps(
            [len(r.tokens) for r in results], [r.metrics.e2e_ms for r in results]
        )
        first = results[0].metrics
        times = [first.ttft_ms + sum(first.itl_ms[:i]) for i in range(len(first.itl_ms) + 1)]
        requests = [request_figures(r.metrics.to_dict()) for r in results]
        return metrics, results[0].tokens, times, requests

    def _measure_baseline(self, config: Mapping, prompts: list[list[int]], rep: int | None):
        worker = self._worker(config["model"], config["compute"])
        sampling = {name: config[name] for name in SAMPLING_AXES}
        reply = worker.run(
            {
                "prompts": prompts,
                "gen": config["gen_tokens"],
                "sampling": sampling,
                "seed": self.seed + (0 if rep is None else rep) * 1000,
                "depth": config["depth"],
                "kv": parse_kv(config["kv"]),
            }
        )
        if "error" in reply:
            raise RuntimeError(reply["error"])
        requests = reply["requests"]
        metrics = {
            name: sum(r["metrics"][name] for r in requests) / len(requests)
            for name in _METRICS
            if name in requests[0]["metrics"]
        }
        metrics["predicted_memory_mb"] = self.predicted_mb
        metrics["output_tps"] = output_tps(
            [len(r["tokens"]) for r in requests], [r["metrics"]["e2e_ms"] for r in requests]
        )
        figures = [request_figures(r["metrics"]) for r in requests]
        return metrics, requests[0]["tokens"], requests[0]["times"], figures

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


def check_grid(configs: list[dict], load) -> None:
    """What the grid asks of each model, refused (ValueError naming the axis and value) before
    anything runs: a model that does not load, lengths beyond its context, a KV cache kind it
    cannot have. `load(name, compute)` gives (model, tokenizer)."""
    from ..cache import CacheSpec, make_cache

    for config in configs:
        try:
            model, _ = load(config["model"], config["compute"])
        except Exception as e:
            raise ValueError(f"sweep axis 'model': {config['model']!r}: {e}") from None
        context = model.config.max_position_embeddings
        tokens = config["depth"] + config["prompt_tokens"] + config["gen_tokens"]
        if tokens > context:
            raise ValueError(
                f"sweep axes depth + prompt_tokens + gen_tokens: {config['depth']} + "
                f"{config['prompt_tokens']} + {config['gen_tokens']} tokens exceed the context "
                f"of model {config['model']!r} ({context})"
            )
        try:
            make_cache(model.config, CacheSpec(**parse_kv(config["kv"])))
        except ValueError as e:
            raise ValueError(
                f"sweep axis 'kv': {config['kv']!r} on model {config['model']!r}: {e}"
            ) from None


def request_figures(metrics: Mapping) -> dict:
    """What the runs database keeps of each request (RequestMetrics.to_dict(), either engine)."""
    return {
        "ttft_ms": metrics["ttft_ms"],
        "e2e_ms": metrics["e2e_ms"],
        "tokens": metrics["generated_tokens"],
        "gaps": metrics["itl_ms"],
    }


def output_tps(generated: list[int], e2e_ms: list[float]) -> float:
    """All the tokens concurrent requests generated / the time until the last one ended (they are
    submitted together, so the longest end-to-end time is the measurement's wall time)."""
    return sum(generated) / (max(e2e_ms) / 1e3)


def predicted_memory(model, config: Mapping) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) a configuration needs: the KV of its `concurrency` rows as
    the batch allocates it, plus the prefix cache's copy of the context with `depth`."""
    from ..cache import CacheSpec

    spec = CacheSpec(**parse_kv(config["kv"]))
    itemsize = model.compute_dtype.size
    tokens = config["depth"] + config["prompt_tokens"] + config["gen_tokens"]
    kv = spec.nbytes(model.config, tokens, config["concurrency"], itemsize)
    if config["depth"]:
        kv += spec.nbytes(model.config, config["depth"], 1, itemsize)
    return model.nbytes, kv


def plan(
    axes: Mapping[str, list],
    reps: int,
    baseline: str | None = None,
    db: RunsDB | None = None,
    load=None,
) -> dict:
    """What a sweep would do, before it runs (the dashboard shows it): `configurations`,
    `measurements`, each configuration's `predicted_mb` (weights + KV cache), the memory
    `available_mb`, and `seconds`, an estimate from this database's past measurements of the same
    model, compute policy and concurrency (None where it has none: `unknown` lists those).
    `load(name, compute)` gives (model, tokenizer); default: mlxinfer.load. A grid that cannot
    run raises ValueError as the sweep itself would (check_grid)."""
    from ..loading import load as load_model

    load = load or (
        lambda name, compute: load_model(None if name == "default" else name, compute=compute)
    )
    configs = list(expand(axes))
    check_grid(configs, load)
    engines = engine_names(baseline)
    predicted = []
    for config in configs:
        model, _ = load(config["model"], config["compute"])
        weights, kv = predicted_memory(model, config)
        predicted.append((weights + kv) / 2**20)
    seconds, unknown = estimate(configs, reps, engines, db)
    return {
        "configurations": len(configs),
        "measurements": len(configs) * reps * len(engines),
        "predicted_mb": predicted,
        "available_mb": machine.available_memory_mb(),
        "seconds": seconds,
        "unknown": unknown,
    }


def estimate(
    configs: list[dict], reps: int, engines: list[str], db: RunsDB | None
) -> tuple[float | None, list[tuple]]:
    """(seconds, unknown): how long measuring `configs` takes (a warm-up and `reps` repetitions
    on each engine), from `db`'s past measurements of the same engine, model, compute policy and
    concurrency; None when some have none (`unknown` lists those)."""
    history = _speeds(db) if db is not None else {}
    seconds, unknown = 0.0, []
    for config in configs:
        for name in engines:
            speed = history.get((name, config["model"], config["compute"], config["concurrency"]))
            if speed is None:
                unknown.append((name, config["model"], config["concurrency"]))
                continue
            prefill, decode = speed
            one = config["prompt_tokens"] / prefill + config["gen_tokens"] / decode
            seconds += config["depth"] / prefill + (reps + 1) * one
    return (None if unknown else seconds), sorted(set(unknown))


def _speeds(db: RunsDB) -> dict:
    """(engine, model, compute, concurrency) -> median (prefill_tps, decode_tps) of the
    database's successful measurements."""
    samples: dict[tuple, list] = {}
    for engine, s, prefill, decode in db.successful_speeds():
        key = (engine, s.get("model"), s.get("compute"), s.get("concurrency"))
        samples.setdefault(key, []).append((prefill, decode))
    return {
        key: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
        for key, v in samples.items()
    }


def exact_tokens(tokenizer, n: int) -> list[int]:
    """Exactly `n` token ids of public-domain text (KJV Genesis, repeated as needed)."""
    ids = tokenizer.encode(TEXT.read_text())
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
