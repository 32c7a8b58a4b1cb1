"""Running a sweep: every configuration of the grid, a warm-up then `reps` repetitions, each
measurement committed to the runs database the moment it exists; a resumed run skips what it has.

    sweep = Sweep(parse_axes({"temperature": "0,0.8"}), reps=5, db=RunsDB())
    for event in sweep.run(cancel=threading.Event()):   # progress events; the dashboard drives it
        print(event.kind, event.index, event.total, event.metrics)

Each measurement runs through an Engine (so concurrency is an axis like the others):
`concurrency` requests of exactly `prompt_tokens` tokens of public-domain text (KJV Genesis,
about 50,000 tokens, repeated as needed) submitted at once, each generating exactly `gen_tokens` tokens (EOS ignored),
seeded per repetition. With `depth`, a context of that many tokens is computed first (not timed)
and kept by the prefix cache: the measured prompt follows it, as a new turn follows a long
conversation. A measurement's metrics are the means over its concurrent requests; its token times
are the first request's; every request's TTFT, end-to-end time and gaps are kept too (latency
percentiles and goodput are computed over requests, not over means).

Over HTTP (`target`, a server's URL; or `baseline="mlx-lm-server"`, which starts `mlxinfer serve`
and `mlx_lm.server` on the same weights): the same grid as streamed /v1/completions requests, the
`concurrency` of them in flight at once, timed by the client (http.py). Each wave (the
warm-up, each repetition, each configuration) sends text no earlier wave of the run sent, until
the text's ~50,000 tokens are used up and it starts again (a server's prefix cache must not
turn a repetition into a cache hit); with `depth`, the context is sent once first and every prompt starts with it. The KV cache
kind and the compute policy are a server's own settings: a sweep of a --target leaves them at
their defaults, and the servers a sweep starts get them as flags.
"""

from __future__ import annotations

import statistics
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import machine
from .db import METRICS as _METRICS
from .db import RunsDB
from .grid import (
    DEFAULTS,
    SAMPLING_AXES,
    config_key,
    expand,
    parse_kv,
    parse_spec,
    sampling_params,
    spec_draft,
)

ENGINE = "mlxinfer"
BASELINE = "mlx-lm"
SERVER = "mlxinfer-server"  # `mlxinfer serve`, started by a sweep with the mlx-lm-server baseline
BASELINE_SERVER = "mlx-lm-server"
BASELINES = (BASELINE, BASELINE_SERVER)
LONG_SWEEP_S = 3600.0  # a sweep estimated to take longer is warned of (CLI and dashboard)


def too_long(seconds: float | None) -> bool:
    """Whether a sweep estimated to take `seconds` (None: unknown) is to be warned of."""
    return seconds is not None and seconds > LONG_SWEEP_S


def engine_names(baseline: str | None, target: str | None = None) -> list[str]:
    """The engines a run measures, in the order each repetition alternates them: the target
    server (its URL), or ours (in process; over HTTP beside mlx_lm.server), then the baseline."""
    check_engines(baseline, target)
    first = target or (SERVER if baseline == BASELINE_SERVER else ENGINE)
    return [first] + ([baseline] if baseline else [])


def check_engines(baseline: str | None, target: str | None) -> None:
    """ValueError for a baseline that is not one, or one that cannot stand beside `target`."""
    if baseline not in (None, *BASELINES):
        raise ValueError(
            f"baseline must be one of {', '.join(BASELINES)} or None, got {baseline!r}"
        )
    if target is not None and baseline == BASELINE:
        raise ValueError(
            f"baseline {BASELINE} runs in process, not over HTTP as the target does: use "
            f"{BASELINE_SERVER} beside a target"
        )


def over_http(name: str, config: Mapping | None = None) -> bool:
    """Whether engine `name` is measured over HTTP (a server, not an in-process engine): ours is,
    in a configuration whose model is split over ranks (`mlxinfer serve --parallel` on them)."""
    if name == ENGINE and config is not None and config.get("parallel", "none") != "none":
        return True
    return name not in (ENGINE, BASELINE)


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
        target: str | None = None,
        api_key: str | None = None,
    ):
        if target is not None:
            from .http import normalized_url

            target = normalized_url(target)
        check_engines(baseline, target)
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise ValueError(f"reps must be an integer >= 1, got {reps!r}")
        configs = list(expand(axes))
        self._models: dict = {}
        check_grid(configs, self._model, target)
        db = db or RunsDB()
        facts = machine.machine_facts()
        split = sorted({c["parallel"] for c in configs} - {"none"})
        if split:  # the groups this run starts: ranks on this machine, MLX's ring over loopback
            facts["distributed"] = {"backend": "ring", "hosts": "127.0.0.1", "groups": split}
        run_id = db.start_run(command, facts, reps, sweep_text, baseline, target=target)
        self._attach(db, run_id, configs, reps, seed, baseline, target, api_key)

    @classmethod
    def resume(cls, db: RunsDB, run_id: int, seed: int = 0, api_key: str | None = None) -> Sweep:
        """A stopped run of `db`, with its own configurations, repetitions, baseline and target
        (`api_key`: the target's, which the database does not keep)."""
        run = db.resume_run(run_id)
        sweep = cls.__new__(cls)
        configs = db.configurations(run_id)
        sweep._attach(
            db, run_id, configs, run["reps"], seed, run["baseline"], run["target"], api_key
        )
        return sweep

    def _attach(self, db, run_id, configs, reps, seed, baseline, target, api_key) -> None:
        self.db, self.run_id, self.configs = db, run_id, configs
        self.reps, self.seed, self.baseline = reps, seed, baseline
        self.target, self.api_key = target, api_key
        self.engines = engine_names(baseline, target)
        self.config_ids = db.add_configurations(run_id, [(config_key(c), c) for c in configs])
        self._models = getattr(self, "_models", {})
        self._workers: dict = {}  # (model, compute) -> the mlx-lm worker
        self._exports: dict = {}  # (model, compute) -> a directory of its weights for mlx-lm
        self._servers: dict = {}  # engine name -> (the settings it was started with, process)
        self._target = None  # the run's target server (http.Target), once asked for
        # Over HTTP every wave of the run sends text no earlier wave sent (a server's prefix
        # cache must not answer a repetition): configuration i's waves start at offsets[key]
        # of the text, after the longest context.
        self._offsets, start = {}, max(c["depth"] for c in configs)
        for c in configs:
            self._offsets[config_key(c)] = start
            start += c["prompt_tokens"] * c["concurrency"] * (reps + 1)

    def estimated_seconds(self) -> float | None:
        """How long the run takes, from the database's past measurements (estimate()); None
        when it has none of some configuration's kind."""
        return estimate(self.configs, self.reps, self.engines, self.db)[0]

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
        engines = self.engines
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

        def event(kind, index, config=None, rep=None, metrics=None, error=None, engine=None):
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
                engine or engines[0],
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
                for name in engines:  # started (servers) and warmed up, not recorded
                    if name in broken:
                        continue
                    try:
                        if over_http(name, config):
                            self._server_for(name, config)
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

    def _measure_with(self, name: str, engine, prompts, config: Mapping, rep: int | None):
        if over_http(name, config):
            return self._measure_http(name, config, rep)
        if name == ENGINE:
            return self._measure(engine, prompts, config, rep)
        if name == BASELINE:
            return self._measure_baseline(config, prompts, rep)
        return self._measure_http(name, config, rep)

    # -- one configuration -----------------------------------------------------------------------

    def _setup(self, config: Mapping):
        from ..cache import CacheSpec
        from ..engine import Engine

        model, tokenizer = self._model(config["model"], config["compute"])
        depth, n = config["depth"], config["prompt_tokens"]
        text = exact_tokens(tokenizer, depth + n * config["concurrency"])
        shared, rest = text[:depth], text[depth:]
        prompts = [shared + rest[i * n : (i + 1) * n] for i in range(config["concurrency"])]
        draft = _draft_model(config, self._model)
        weights, kv = predicted_memory(model, config, draft)
        split = config["parallel"] != "none"  # (then each rank holds a part: not predicted)
        self.predicted_mb = None if self.target or split else (weights + kv) / 2**20
        available = machine.available_memory_mb()
        if (
            self.predicted_mb is not None
            and available is not None
            and self.predicted_mb > available
        ):
            raise MemoryError(
                f"needs ~{self.predicted_mb:.0f} MB (weights {weights / 2**20:.0f} MB + KV "
                f"cache {kv / 2**20:.0f} MB), {available:.0f} MB available: not run"
            )
        if ENGINE not in self.engines or over_http(ENGINE, config):  # measured over HTTP only
            return None, prompts
        if ENGINE in self._servers:  # a split configuration's ranks: not beside this one
            self._servers.pop(ENGINE)[1].close()
        engine = Engine(
            model,
            tokenizer,
            max_batch=config["concurrency"],
            prefix_cache_mb=1024 if depth else 0,
            cache=CacheSpec(**parse_kv(config["kv"])),
            draft_model=draft,
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
        figures = [r.metrics.to_dict() for r in results]
        metrics = measurement_metrics(figures, self.predicted_mb)
        first = results[0].metrics
        times = [first.ttft_ms + sum(first.itl_ms[:i]) for i in range(len(first.itl_ms) + 1)]
        return metrics, results[0].tokens, times, [request_figures(f) for f in figures]

    def _measure_baseline(self, config: Mapping, prompts: list[list[int]], rep: int | None):
        if config["spec"] != "none":
            raise RuntimeError(f"not measured on mlx-lm (spec {config['spec']})")
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
        figures = [r["metrics"] for r in requests]
        metrics = measurement_metrics(figures, self.predicted_mb)
        first = requests[0]
        return metrics, first["tokens"], first["times"], [request_figures(f) for f in figures]

    def _worker(self, name: str, compute: str):
        key = (name, compute)
        if key not in self._workers:
            from .baseline import MlxLmBaseline

            model, tokenizer = self._model(name, compute)
            path = None if name == "default" else name
            self._workers[key] = MlxLmBaseline(path, model, tokenizer)
        return self._workers[key]

    # -- over HTTP ---------------------------------------------------------------------------

    def _server_for(self, name: str, config: Mapping):
        """The http.Target engine `name` is measured at: the run's target, or a server started
        with this configuration's engine settings (kept while the next one's are the same)."""
        from .http import Target
        from .servers import ServerProcess

        if name == self.target:
            if self._target is None:
                self._target = Target(name, self.api_key)
            return self._target
        settings = {k: config[k] for k in ("model", "compute", "kv", "concurrency", "parallel")}
        settings["draft"] = spec_draft(config["spec"])
        settings["prefix_cache"] = bool(config["depth"])
        held = self._servers.get(name)
        if held is not None and held[0] == settings:
            return held[1].target
        if held is not None:
            self._servers.pop(name)[1].close()
        if name in (SERVER, ENGINE):  # (ours over HTTP: beside mlx_lm.server, or split)
            server = ServerProcess.mlxinfer(config["model"], config)
        else:
            server = ServerProcess.mlx_lm(
                self._mlx_lm_dir(config["model"], config["compute"]), config
            )
        self._servers[name] = (settings, server)
        return server.target

    def _mlx_lm_dir(self, name: str, compute: str) -> str:
        """A Hugging Face style directory of the model that mlx-lm can load: the model's own,
        or our weights exported (baseline.export_for_mlx_lm), once per model."""
        if name != "default" and (Path(name) / "config.json").is_file():
            return name
        key = (name, compute)
        if key not in self._exports:
            import tempfile

            from .baseline import export_for_mlx_lm

            model, tokenizer = self._model(name, compute)
            tmp = tempfile.TemporaryDirectory(prefix="mlxinfer-bench-")
            export_for_mlx_lm(model, tokenizer, Path(tmp.name))
            self._exports[key] = tmp
        return self._exports[key].name

    def _measure_http(self, name: str, config: Mapping, rep: int | None):
        if name == BASELINE_SERVER and config["spec"] != "none":
            raise RuntimeError(f"not measured on mlx_lm.server (spec {config['spec']})")
        target = self._server_for(name, config)
        _, tokenizer = self._model(config["model"], config["compute"])
        depth, n, c = config["depth"], config["prompt_tokens"], config["concurrency"]
        slot = 0 if rep is None else rep + 1  # the warm-up's prompts, then each repetition's
        offset = self._offsets[config_key(config)] + n * c * slot
        text = exact_tokens(tokenizer, offset + n * c)
        shared, fresh = text[:depth], text[offset:]
        prompts = [tokenizer.decode(shared + fresh[i * n : (i + 1) * n]) for i in range(c)]
        if depth and rep is None:  # the context, sent once and kept by the server's cache
            target.complete({"prompt": tokenizer.decode(shared), "max_tokens": 1})
        seed = self.seed + (0 if rep is None else rep) * 1000
        eos = sorted(tokenizer.eos_token_ids) if name == BASELINE_SERVER else None
        bodies = [http_body(config, p, seed + i, eos) for i, p in enumerate(prompts)]
        results = target.wave(bodies)
        for r in results:
            if r.finish_reason != "length" or r.completion_tokens != config["gen_tokens"]:
                raise RuntimeError(
                    f"a request ended after {r.completion_tokens} of {config['gen_tokens']} "
                    f"tokens (finish_reason {r.finish_reason!r}): the server does not honour "
                    "ignore_eos"
                )
        figures = [r.metrics() for r in results]
        metrics = measurement_metrics(figures, self.predicted_mb)
        first = results[0]
        times = [(t - first.start) * 1e3 for t in first.times]
        return metrics, None, times, [request_figures(f) for f in figures]

    def close(self) -> None:
        """Stop the baseline workers and the servers this sweep started."""
        for _, server in self._servers.values():
            server.close()
        self._servers.clear()
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()
        for export in self._exports.values():
            export.cleanup()
        self._exports.clear()

    def _model(self, name: str, compute: str):
        key = (name, compute)
        if key not in self._models:
            from ..loading import load

            self._models[key] = load(None if name == "default" else name, compute=compute)
        return self._models[key]


def check_grid(configs: list[dict], load, target: str | None = None) -> None:
    """What the grid asks of each model, refused (ValueError naming the axis and value) before
    anything runs: a model that does not load, lengths beyond its context, a KV cache kind it
    cannot have; against a `target` server, more than one model (the server has one) or a KV
    cache kind or compute policy other than the default (the server's own settings).
    `load(name, compute)` gives (model, tokenizer)."""
    from ..cache import CacheSpec, make_cache

    if target is not None:
        for axis in ("kv", "compute", "parallel"):
            values = sorted({c[axis] for c in configs} - {DEFAULTS[axis]})
            if values:
                raise ValueError(
                    f"sweep axis {axis!r}: {', '.join(values)} cannot be set on a --target "
                    f"server (it is the server's own setting): leave it at {DEFAULTS[axis]}"
                )
        specs = sorted({c["spec"] for c in configs} - {"none"})
        if specs:  # (a request field of ours alone: another server would ignore it)
            raise ValueError(
                f"sweep axis 'spec': {', '.join(specs)} cannot be measured on a --target server "
                "(speculative decoding is mlxinfer's request extension): measure it in process"
            )
        models = sorted({c["model"] for c in configs})
        if len(models) > 1:
            raise ValueError(
                f"sweep axis 'model': a --target server serves one model, got {', '.join(models)}"
            )
    for config in configs:
        try:
            model, tokenizer = load(config["model"], config["compute"])
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
        check_draft_value(config, model, tokenizer, load)


def check_draft_value(config: Mapping, model, tokenizer, load) -> None:
    """A configuration's draft model (spec "draft:PATH[:N]"), refused with a ValueError naming
    the axis when it does not load, cannot propose for `model`, or is asked with parallel."""
    from ..speculative import check_draft_pair

    path = spec_draft(config["spec"])
    if path is None:
        return
    where = f"sweep axis 'spec': {config['spec']!r}"
    if config["parallel"] != "none":
        raise ValueError(
            f"{where}: a draft model with parallel {config['parallel']!r} is not supported yet"
        )
    try:
        draft, draft_tokenizer = load(path, config["compute"])
        check_draft_pair(model, tokenizer, draft, draft_tokenizer)
    except Exception as e:
        raise ValueError(f"{where}: {e}") from None


def http_body(config: Mapping, prompt: str, seed: int, eos: list[int] | None = None) -> dict:
    """The /v1/completions body of one request of a configuration: its sampling settings (those
    at their neutral defaults left out: a server need not know top_k to be measured greedy), the
    seed only when sampling (a seed turns mlx_lm.server's batching off, its rule), exactly
    gen_tokens tokens: `ignore_eos` (ours, vLLM, llama.cpp), or `eos` (mlx_lm.server, which has no
    such field) banned through logit_bias."""
    body: dict = {"prompt": prompt, "max_tokens": config["gen_tokens"]}
    body["temperature"] = config["temperature"]
    for axis in SAMPLING_AXES[1:]:
        if config[axis] != DEFAULTS[axis]:
            body[axis] = config[axis]
    if config["temperature"] > 0:
        body["seed"] = seed
    speculation, num_draft = parse_spec(str(config.get("spec", "none")))
    if speculation is not None:  # (our server's extension; a baseline server refuses it)
        proposer = "draft" if speculation == "draft" else "prompt_lookup"
        body.update({proposer: True, "num_draft": num_draft})
    if eos is None:
        body["ignore_eos"] = True
    else:
        body["logit_bias"] = {str(t): -100.0 for t in eos}
    return body


def measurement_metrics(figures: list[Mapping], predicted_mb: float | None) -> dict:
    """A measurement's metrics from its concurrent requests' (RequestMetrics.to_dict(), from any
    engine): each metric's mean over the requests that report it (mlx-lm's worker does not say
    its KV cache's size, a client cannot see a server's memory), the predicted memory, and the
    total output of them all."""
    metrics = {}
    for name in _METRICS:
        values = [f[name] for f in figures if f.get(name) is not None]
        if values and name not in ("predicted_memory_mb", "output_tps", "acceptance_rate"):
            metrics[name] = sum(values) / len(values)
    metrics["predicted_memory_mb"] = predicted_mb
    # speculative decoding: over all the requests' proposals (None where none proposed)
    proposed = sum(f.get("draft_tokens") or 0 for f in figures)
    accepted = sum(f.get("accepted_draft_tokens") or 0 for f in figures)
    metrics["acceptance_rate"] = accepted / proposed if proposed else None
    metrics["output_tps"] = output_tps(
        [f["generated_tokens"] for f in figures], [f["e2e_ms"] for f in figures]
    )
    return metrics


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


def predicted_memory(model, config: Mapping, draft=None) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) a configuration needs: the KV of its `concurrency` rows as
    the batch allocates it, plus the prefix cache's copy of the context with `depth`; with a
    `draft` model (spec "draft:PATH"), its weights and its caches (speculative.DraftBatch's)."""
    from ..batch_cache import RING_SLACK
    from ..cache import CacheSpec
    from ..speculative import draft_cache_bytes

    spec = CacheSpec(**parse_kv(config["kv"]))
    itemsize = model.compute_dtype.size
    tokens = config["depth"] + config["prompt_tokens"] + config["gen_tokens"]
    kv = spec.nbytes(model.config, tokens, config["concurrency"], itemsize, RING_SLACK)
    if config["depth"]:
        kv += spec.nbytes(model.config, config["depth"], 1, itemsize)
    if draft is None:
        return model.nbytes, kv
    num_draft = parse_spec(str(config.get("spec", "none")))[1]  # (its row runs that far ahead)
    kv += draft_cache_bytes(draft, config["concurrency"], tokens + num_draft)
    return model.nbytes + (0 if draft is model else draft.nbytes), kv


def _draft_model(config: Mapping, load):
    """The configuration's draft model (spec "draft:PATH[:N]") through `load`, else None."""
    path = spec_draft(config["spec"])
    return None if path is None else load(path, config["compute"])[0]


def plan(
    axes: Mapping[str, list],
    reps: int,
    baseline: str | None = None,
    db: RunsDB | None = None,
    load=None,
    target: str | None = None,
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
    engines = engine_names(baseline, target)
    check_grid(configs, load, target)
    predicted = []
    for config in configs:
        model, _ = load(config["model"], config["compute"])
        weights, kv = predicted_memory(model, config, _draft_model(config, load))
        predicted.append(None if target else (weights + kv) / 2**20)
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
    ids = _text_ids(tokenizer)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_ids(tokenizer) -> list[int]:
    """The text's token ids under `tokenizer` (encoded once per tokenizer: 0.1 s each time)."""
    if tokenizer not in _IDS:
        _IDS[tokenizer] = tokenizer.encode(TEXT.read_text())
    return _IDS[tokenizer]


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
