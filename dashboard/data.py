"""The runs database as pandas frames for the pages' tables and charts (mlxinfer.bench.report does
the statistics; this only reshapes). No Streamlit here."""

from __future__ import annotations

import datetime
import json

import charts
import pandas as pd

from mlxinfer.bench import jobs, report
from mlxinfer.bench.db import METRICS, RunsDB
from mlxinfer.bench.grid import SAMPLING_AXES, sampling_label
from mlxinfer.bench.stats import verdict


def summary_frame(items: list[dict]) -> pd.DataFrame:
    """One row per configuration and engine (report.summarize's items): the settings, `label`
    (the swept settings in words), `<metric>_mean` / `<metric>_std` and `n` (repetitions)."""
    swept = report.swept_axes(items)
    rows = []
    for item in items:
        row = _setting_columns(item, swept)
        row["failed"], row["error"] = item["failed"], item["error"]
        row["n"] = len(item["decode_tps"]["samples"]) if item["decode_tps"] else 0
        for m in METRICS:
            row[f"{m}_mean"] = item[m]["mean"] if item[m] else None
            row[f"{m}_std"] = item[m]["std"] if item[m] else None
        ratio = (item.get("vs_mlx_lm") or {}).get("decode_tps")
        row["decode_vs_mlx_lm"] = ratio["ratio"] if ratio else None
        row["sampling_cost"] = item.get("sampling_cost")
        rows.append(row)
    return pd.DataFrame(rows)


def _setting_columns(item: dict, swept: list[str]) -> dict:
    """A configuration's engine and settings as a frame's columns, with `sampling` and `label`
    (its swept settings in words), which the charts group and label by."""
    return {
        "engine": item["engine"],
        **item["settings"],
        "sampling": sampling_label(item["settings"]),
        "label": configuration_label(item["settings"], swept),
    }


def percentiles_frame(requests: list[dict]) -> pd.DataFrame:
    """One row per configuration and engine of a run's requests (`RunsDB.requests`): the settings
    (as summary_frame's), TTFT and ITL at p50 / p90 / p99 over every request and gap (`ttft_p50_ms`, ..., `itl_p99_ms`), `requests`.
    Empty for runs made before requests were recorded."""
    items = report.request_latencies(requests)
    swept = report.swept_axes(items)
    rows = []
    for item in items:
        row = _setting_columns(item, swept)
        row.update({k: v for k, v in item.items() if k not in ("engine", "settings")})
        rows.append(row)
    return pd.DataFrame(rows)


def goodput_frame(
    requests: list[dict], ttft_ms: float | None, itl_ms: float | None
) -> pd.DataFrame:
    """One row per configuration and engine of a run's requests (`RunsDB.requests`): the settings,
    `goodput_tps_mean` / `_std`, `n`
    (repetitions) and `good_share` (of requests within the targets). Empty for old runs."""
    items = report.goodput(requests, ttft_ms, itl_ms)
    swept = report.swept_axes(items)
    rows = []
    for item in items:
        row = _setting_columns(item, swept)
        goodput = item["goodput_tps"]
        row.update(
            goodput_tps_mean=goodput["mean"],
            goodput_tps_std=goodput["std"],
            n=len(goodput["samples"]),
            good_share=item["good_share"],
            requests=item["requests"],
        )
        rows.append(row)
    return pd.DataFrame(rows)


def configuration_label(settings: dict, swept: list[str]) -> str:
    """The swept settings of a configuration, short: "T 0.7, top-p 0.9 · prompt 256"."""
    parts = []
    if any(a in swept for a in SAMPLING_AXES):
        parts.append(sampling_label(settings))
    for axis in swept:
        if axis in SAMPLING_AXES:
            continue
        parts.append(f"{axis.replace('_tokens', '').replace('_', ' ')} {settings[axis]}")
    return " · ".join(parts) or "the configuration"


def x_axis_choices(items: list[dict]) -> list[str]:
    """What a chart's x axis can be: each swept setting, `sampling` when sampling settings were
    swept, and `label` (every swept setting together) when several were."""
    swept = report.swept_axes(items)
    sampling = [a for a in swept if a in SAMPLING_AXES]
    rest = [a for a in swept if a not in SAMPLING_AXES]
    choices = (["sampling"] if sampling else []) + rest
    if len(choices) != 1:
        choices = ["label"] + choices
    return choices


def runs_frame(db: RunsDB) -> pd.DataFrame:
    """Every run: id, when, status (a run whose process is gone is 'interrupted'), its models,
    configurations and measurements, its baseline and the server it measured (target), the
    machine, mlxinfer version and commit, the command."""
    counts = db.measurement_counts()
    rows = []
    for run in db.runs():
        facts = db.machine(run["machine_id"])
        configs = db.configurations(run["id"])
        models = sorted({c.get("model", "?") for c in configs})
        rows.append(
            {
                "run": run["id"],
                "started": datetime.datetime.fromtimestamp(run["started"]),
                "status": jobs.status(run),
                "model": ", ".join(models),
                "configurations": len(configs),
                "measurements": counts.get(run["id"], 0),
                "planned": planned(run, len(configs)),
                "baseline": run["baseline"] or "",
                "target": run["target"] or "",
                "machine": machine_label(facts),
                "version": f"{facts.get('mlxinfer', '?')} · {facts.get('commit', '?')}",
                "command": run["command"],
            }
        )
    return pd.DataFrame(rows)


def machine_label(facts: dict) -> str:
    """ "Intel(R) Xeon(R) Processor @ 2.80GHz · cpu" (not "... (Device(cpu, 0))")."""
    backend = str(facts.get("backend", "?"))
    device = backend.removeprefix("Device(").split(",")[0].rstrip(")")
    return f"{facts.get('cpu', '?')} · {device}"


def planned(run, configurations: int) -> int:
    """The measurements a run makes: every configuration, repetition and engine."""
    return configurations * run["reps"] * (2 if run["baseline"] else 1)


def run_progress(db: RunsDB, run) -> tuple[int, int]:
    """(measurements made, measurements planned) of one run."""
    return len(db.done(run["id"])), planned(run, len(db.configurations(run["id"])))


def positions_frame(db: RunsDB, run_id: int) -> pd.DataFrame:
    """Latency by token position for every configuration and engine of a run: token, p50_ms,
    p90_ms, engine, label, series ("engine · label")."""
    items = report.latency_by_position(db, run_id)
    swept = report.swept_axes(items)
    frames = []
    for item in items:
        label = configuration_label(item["settings"], swept)
        frames.append(
            pd.DataFrame(
                {
                    "token": range(len(item["p50_ms"])),
                    "p50_ms": item["p50_ms"],
                    "p90_ms": item["p90_ms"],
                    "engine": item["engine"],
                    "label": label,
                    "series": f"{item['engine']} · {label}",
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_frame(db: RunsDB, run_a: int, run_b: int, metric: str) -> pd.DataFrame:
    """The configurations two runs share: A's and B's mean of `metric`, B/A and its 95% interval
    (paired by repetition when both have as many)."""
    rows = []
    items = report.compare(db, run_a, run_b, metric)
    swept = report.swept_axes(items) if items else []
    unit = charts.metric_unit(metric)
    for row in items:
        interval = row["interval"]
        rows.append(
            {
                "engine": row["engine"],
                "configuration": configuration_label(row["settings"], swept),
                f"run {run_a} ({unit})": row["a"],
                f"run {run_b} ({unit})": row["b"],
                "B / A": row["ratio"],
                "95% CI": f"[{interval['low']:.2f}, {interval['high']:.2f}]" if interval else "",
                "repetitions": "{} / {}".format(*row["n"]),
                "verdict": verdict(interval),
            }
        )
    return pd.DataFrame(rows)


def across_runs_frame(db: RunsDB, run_ids: list[int], metric: str) -> pd.DataFrame:
    """A metric's mean per run for each configuration (engine and settings) found in at least
    two of the runs, runs in time order labelled "#id version · commit"."""
    versions = runs_frame(db).set_index("run")["version"].to_dict() if run_ids else {}
    rows = []
    for run_id in sorted(run_ids):
        for item in report.summarize(db, run_id):
            if item[metric] is None:
                continue
            key = json.dumps(item["settings"], sort_keys=True)
            rows.append(
                {
                    "run": run_id,
                    "run_label": f"#{run_id} {versions.get(run_id, '')}",
                    "key": key,
                    "engine": item["engine"],
                    "settings": item["settings"],
                    "mean": item[metric]["mean"],
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    shared = frame.groupby(["key", "engine"])["run"].transform("nunique") >= 2
    frame = frame[shared].copy()
    swept = report.swept_axes([{"settings": s} for s in frame["settings"]]) if len(frame) else []
    frame["series"] = [
        f"{e} · {configuration_label(s, swept)}"
        for e, s in zip(frame["engine"], frame["settings"], strict=True)
    ]
    return frame.drop(columns=["settings", "key"])


def measurements_frame(db: RunsDB, run_id: int) -> pd.DataFrame:
    """A run's successful measurements: id, engine, label, rep (from 1), for choosing one."""
    rows = [r for r in db.measurements(run_id) if r["status"] == "ok"]
    swept = report.swept_axes([{"settings": r["settings"]} for r in rows]) if rows else []
    return pd.DataFrame(
        [
            {
                "id": r["id"],
                "engine": r["engine"],
                "rep": r["rep"] + 1,
                "label": configuration_label(r["settings"], swept),
            }
            for r in rows
        ]
    )


def gaps_frame(db: RunsDB, measurement_id: int) -> pd.DataFrame:
    """One measurement's latency by position: token 0's is its TTFT, then each gap (ms)."""
    gaps = report.position_latencies(db.token_times(measurement_id))
    return pd.DataFrame({"token": range(len(gaps)), "ms": gaps})
