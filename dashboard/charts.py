"""The dashboard's charts: Altair specs from pandas frames, every axis titled with its unit.
No Streamlit here, so they are tested as plain functions."""

from __future__ import annotations

import altair as alt
import pandas as pd

from mlxinfer.metrics import DEFINITIONS

LABELS = {d.name: d.label for d in DEFINITIONS}
LABELS.update({f"itl_p{q}_ms": f"inter-token latency p{q} (ms)" for q in (50, 90, 99)})


def itl_by_position(itl_ms: list[float]) -> alt.Chart:
    """Inter-token latency of one reply, token by token (token i's gap since token i - 1)."""
    frame = pd.DataFrame({"token": range(2, len(itl_ms) + 2), "itl_ms": itl_ms})
    return (
        alt.Chart(frame, height=180)
        .mark_line(point=len(itl_ms) <= 40)
        .encode(
            x=alt.X("token:Q", title="token position", axis=alt.Axis(format="d", tickMinStep=1)),
            y=alt.Y("itl_ms:Q", title="token gap (ms)"),
            tooltip=["token", alt.Tooltip("itl_ms:Q", format=".1f", title="ms")],
        )
    )


def metric_by_setting(summary: pd.DataFrame, metric: str, setting: str) -> alt.Chart:
    """Mean ± std of `metric` for each value of `setting` (one row per configuration and engine
    in `summary`, with columns `<metric>_mean`, `<metric>_std`, `engine`), engines side by side."""
    frame = summary.dropna(subset=[f"{metric}_mean"]).copy()
    frame["low"] = frame[f"{metric}_mean"] - frame[f"{metric}_std"]
    frame["high"] = frame[f"{metric}_mean"] + frame[f"{metric}_std"]
    frame[setting] = frame[setting].astype(str)
    # One bar per configuration and engine: configurations that share the x value (another
    # setting was swept too) stand side by side, never stacked.
    frame["bar"] = frame["engine"] + " · " + frame["label"]
    base = alt.Chart(frame, height=260).encode(
        x=alt.X(f"{setting}:N", title=setting.replace("_", " "), sort=None),
        xOffset=alt.XOffset("bar:N", sort=None),
        color=alt.Color("engine:N", title="engine"),
    )
    bars = base.mark_bar().encode(
        y=alt.Y(f"{metric}_mean:Q", title=LABELS.get(metric, metric), stack=None),
        tooltip=[
            "engine",
            setting,
            alt.Tooltip(f"{metric}_mean:Q", format=".1f", title="mean"),
            alt.Tooltip(f"{metric}_std:Q", format=".2f", title="std"),
            "n",
        ],
    )
    errors = base.mark_errorbar(ticks=True).encode(
        y=alt.Y("low:Q", title=LABELS.get(metric, metric)), y2="high:Q"
    )
    return bars + errors


def memory_predicted_vs_measured(summary: pd.DataFrame, setting: str) -> alt.Chart:
    """Measured peak memory (bars) against the prediction (black ticks) per configuration."""
    frame = summary.dropna(subset=["peak_memory_mb_mean"]).copy()
    frame[setting] = frame[setting].astype(str)
    frame["bar"] = frame["engine"] + " · " + frame["label"]
    base = alt.Chart(frame, height=260).encode(
        x=alt.X(f"{setting}:N", title=setting.replace("_", " "), sort=None),
        xOffset=alt.XOffset("bar:N", sort=None),
    )
    measured = base.mark_bar(opacity=0.8).encode(
        y=alt.Y("peak_memory_mb_mean:Q", title="memory (MB)", stack=None),
        color=alt.Color("engine:N", title="measured peak"),
        tooltip=[
            "engine",
            "label",
            alt.Tooltip("peak_memory_mb_mean:Q", format=".1f"),
            alt.Tooltip("predicted_memory_mb_mean:Q", format=".1f"),
        ],
    )
    predicted = base.mark_tick(color="black", thickness=2, size=18).encode(
        y="predicted_memory_mb_mean:Q"
    )
    return measured + predicted


def latency_by_position(frame: pd.DataFrame) -> alt.Chart:
    """p50 and p90 latency of each token position (position 0: the first token) over the
    repetitions; `frame` has token, p50_ms, p90_ms and a `series` column."""
    long = frame.melt(["token", "series"], ["p50_ms", "p90_ms"], "statistic", "ms")
    return (
        alt.Chart(long, height=260)
        .mark_line()
        .encode(
            x=alt.X("token:Q", title="token position"),
            y=alt.Y("ms:Q", title="latency (ms)", scale=alt.Scale(type="log")),
            color=alt.Color("series:N", title="configuration"),
            strokeDash=alt.StrokeDash("statistic:N", title="over repetitions"),
            tooltip=["series", "token", "statistic", alt.Tooltip("ms:Q", format=".1f")],
        )
    )


def measurement_gaps(frame: pd.DataFrame) -> alt.Chart:
    """One measurement's latency of each token (token 0: time to first token), log scale."""
    return (
        alt.Chart(frame, height=220)
        .mark_line(point=len(frame) <= 64)
        .encode(
            x=alt.X("token:Q", title="token position", axis=alt.Axis(format="d", tickMinStep=1)),
            y=alt.Y("ms:Q", title="latency (ms)", scale=alt.Scale(type="log")),
            tooltip=["token", alt.Tooltip("ms:Q", format=".2f")],
        )
    )


def metric_across_runs(frame: pd.DataFrame, metric: str) -> alt.Chart:
    """A metric's mean per run (ordered by time, labelled with version and commit) for each
    configuration the runs share: a regression shows as a step down."""
    return (
        alt.Chart(frame, height=280)
        .mark_line(point=True)
        .encode(
            x=alt.X("run_label:N", title="run (version · commit)", sort=None),
            y=alt.Y("mean:Q", title=LABELS.get(metric, metric)),
            color=alt.Color("series:N", title="configuration"),
            tooltip=["run_label", "series", alt.Tooltip("mean:Q", format=".2f")],
        )
    )
