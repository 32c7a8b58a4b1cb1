"""The dashboard's charts: Altair specs from pandas frames, every axis titled with its unit.
No Streamlit here, so they are tested as plain functions."""

from __future__ import annotations

import altair as alt
import pandas as pd

from mlxinfer.bench.grid import AXES, SAMPLING_AXES
from mlxinfer.metrics import DEFINITIONS

LABELS = {d.name: d.label for d in DEFINITIONS}
LABELS.update({f"itl_p{q}_ms": f"inter-token latency p{q} (ms)" for q in (50, 90, 99)})
LABELS["goodput_tps"] = "goodput (tokens/s)"
LATENCIES = {"ttft": "time to first token", "itl": "inter-token latency"}
# settings whose values are numbers on a scale: drawn as lines, not bars
NUMERIC_AXES = {*SAMPLING_AXES, "prompt_tokens", "gen_tokens", "depth", "concurrency"}


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


def acceptance_by_position(rates: list[float]) -> alt.Chart:
    """Speculative decoding in one reply: the chance that a pass's j-th proposal was accepted once
    every proposal before it was (how far ahead proposing paid)."""
    frame = pd.DataFrame({"position": range(1, len(rates) + 1), "acceptance": rates})
    return (
        alt.Chart(frame, height=160)
        .mark_bar()
        .encode(
            x=alt.X("position:O", title="proposal's position in the pass"),
            y=alt.Y(
                "acceptance:Q",
                title="accepted once reached",
                scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format="%"),
            ),
            tooltip=["position", alt.Tooltip("acceptance:Q", format=".0%", title="accepted")],
        )
    )


def metric_name(metric: str) -> str:
    """ "decode speed (tokens/s)" -> "decode speed"."""
    return LABELS.get(metric, metric).split(" (")[0]


def metric_unit(metric: str) -> str:
    """ "decode speed (tokens/s)" -> "tokens/s"."""
    label = LABELS.get(metric, metric)
    return label[label.rfind("(") + 1 : -1] if label.endswith(")") else label


def _axis_name(setting: str) -> str:
    return "configuration" if setting == "label" else setting.replace("_", " ")


def _series(frame: pd.DataFrame, setting: str) -> tuple[pd.Series, str]:
    """What tells apart the configurations that share an x value: the engine, and every other
    swept setting (sampling settings together, as "sampling"), with the legend's title."""
    swept = [a for a in AXES if a in frame and frame[a].astype(str).nunique() > 1]
    sampling = [a for a in swept if a in SAMPLING_AXES]
    others: list[str] = []
    if setting != "label":
        if sampling and setting not in SAMPLING_AXES and setting != "sampling":
            others.append("sampling")
        others += [a for a in swept if a not in SAMPLING_AXES and a != setting]
    series = frame["engine"].astype(str)
    for axis in others:
        values = frame[axis].astype(str)
        series = (
            series + " · " + (values if axis == "sampling" else f"{_axis_name(axis)} " + values)
        )
    return series, " · ".join(["engine"] + [_axis_name(a) for a in others])


def _setting_x(frame: pd.DataFrame, setting: str) -> alt.X:
    """A setting's values as categories, in the grid's order, labels whole (slanted if long)."""
    long = frame[setting].str.len().max() >= 14
    return alt.X(
        f"{setting}:N",
        title=_axis_name(setting),
        sort=None,
        axis=alt.Axis(labelLimit=0, labelAngle=-25 if long else 0),
    )


def _is_numeric(frame: pd.DataFrame, setting: str) -> bool:
    return setting in NUMERIC_AXES and pd.api.types.is_numeric_dtype(frame[setting])


def metric_by_setting(summary: pd.DataFrame, metric: str, setting: str) -> alt.Chart:
    """Mean ± std of `metric` for each value of `setting` (one row per configuration and engine
    in `summary`, with columns `<metric>_mean`, `<metric>_std`, `engine` and the settings): a
    line per series over a numeric setting, else bars side by side; a colour, with its legend, for
    each engine and value of the other swept settings; the chart titled, the axis in units."""
    frame = summary.dropna(subset=[f"{metric}_mean"]).copy()
    frame["low"] = frame[f"{metric}_mean"] - frame[f"{metric}_std"].fillna(0)
    frame["high"] = frame[f"{metric}_mean"] + frame[f"{metric}_std"].fillna(0)
    frame["series"], legend = _series(frame, setting)
    title = f"{metric_name(metric)} by {_axis_name(setting)}"
    y_title = metric_unit(metric)
    color = alt.Color("series:N", title=legend, legend=alt.Legend(orient="bottom", labelLimit=0))
    tooltip = [
        alt.Tooltip("series:N", title=legend),
        alt.Tooltip(f"{setting}:N", title=_axis_name(setting)),
        alt.Tooltip(f"{metric}_mean:Q", format=".1f", title=f"mean ({y_title})"),
        alt.Tooltip(f"{metric}_std:Q", format=".2f", title="std"),
        alt.Tooltip("n:Q", title="repetitions"),
    ]
    if _is_numeric(frame, setting):
        x = alt.X(f"{setting}:Q", title=_axis_name(setting), scale=alt.Scale(zero=False))
        base = alt.Chart(frame, height=260, title=title).encode(x=x, color=color)
        lines = base.mark_line(point=True).encode(
            y=alt.Y(f"{metric}_mean:Q", title=y_title), tooltip=tooltip
        )
        errors = base.mark_errorbar(ticks=True).encode(y=alt.Y("low:Q", title=y_title), y2="high:Q")
        return lines + errors
    frame[setting] = frame[setting].astype(str)
    base = alt.Chart(frame, height=260, title=title).encode(
        x=_setting_x(frame, setting),
        xOffset=alt.XOffset("series:N", sort=None),
        color=color,
    )
    bars = base.mark_bar().encode(
        y=alt.Y(f"{metric}_mean:Q", title=y_title, stack=None), tooltip=tooltip
    )
    errors = base.mark_errorbar(ticks=True).encode(y=alt.Y("low:Q", title=y_title), y2="high:Q")
    return bars + errors


def memory_predicted_vs_measured(summary: pd.DataFrame, setting: str) -> alt.Chart:
    """Measured peak memory (bars, a colour per series) against the prediction (a black line
    mark, in the legend as "predicted") per configuration."""
    frame = summary.dropna(subset=["peak_memory_mb_mean"]).copy()
    frame[setting] = frame[setting].astype(str)
    frame["series"], legend = _series(frame, setting)
    frame["prediction"] = "predicted"
    base = alt.Chart(frame, height=260, title="peak memory, measured and predicted").encode(
        x=_setting_x(frame, setting),
        xOffset=alt.XOffset("series:N", sort=None),
    )
    measured = base.mark_bar(opacity=0.8).encode(
        y=alt.Y("peak_memory_mb_mean:Q", title="MB", stack=None),
        color=alt.Color(
            "series:N",
            title=f"measured peak: {legend}",
            legend=alt.Legend(orient="bottom", labelLimit=0),
        ),
        tooltip=[
            alt.Tooltip("series:N", title=legend),
            alt.Tooltip(f"{setting}:N", title=_axis_name(setting)),
            alt.Tooltip("peak_memory_mb_mean:Q", format=",.1f", title="measured peak (MB)"),
            alt.Tooltip("predicted_memory_mb_mean:Q", format=",.1f", title="predicted (MB)"),
        ],
    )
    predicted = base.mark_point(filled=False, color="black", size=300, strokeWidth=2).encode(
        y="predicted_memory_mb_mean:Q",
        shape=alt.Shape(
            "prediction:N",
            title="",
            scale=alt.Scale(range=["M-1,0L1,0"]),
            legend=alt.Legend(orient="bottom"),
        ),
    )
    return alt.layer(measured, predicted).resolve_scale(shape="independent")


def throughput_against_latency(summary: pd.DataFrame, latency: str = "itl_p50_ms") -> alt.Chart:
    """What concurrency buys and costs (guidellm's and vLLM's view of a sweep): total output
    tokens/s against a latency, a point per concurrency (labelled), a line per engine and value of
    the other swept settings. Up and to the left is better."""
    frame = summary.dropna(subset=["output_tps_mean", f"{latency}_mean"]).copy()
    frame["series"], legend = _series(frame, "concurrency")
    frame = frame.sort_values(["series", "concurrency"])
    base = alt.Chart(
        frame, height=260, title=f"total output against {metric_name(latency)}"
    ).encode(
        x=alt.X(f"{latency}_mean:Q", title=f"{metric_name(latency)} ({metric_unit(latency)})"),
        y=alt.Y("output_tps_mean:Q", title="total output (tokens/s)"),
        color=alt.Color("series:N", title=legend, legend=alt.Legend(orient="bottom", labelLimit=0)),
        order="concurrency:Q",
    )
    line = base.mark_line(point=True).encode(
        tooltip=[
            alt.Tooltip("series:N", title=legend),
            alt.Tooltip("concurrency:Q", title="concurrency"),
            alt.Tooltip("output_tps_mean:Q", format=".1f", title="total output (tokens/s)"),
            alt.Tooltip(f"{latency}_mean:Q", format=".1f", title=f"{metric_name(latency)} (ms)"),
        ]
    )
    labels = base.mark_text(dx=8, dy=-8, fontSize=11).encode(text="concurrency:Q")
    return line + labels


def latency_percentiles(frame: pd.DataFrame, latency: str, setting: str) -> alt.Chart:
    """p50, p90 and p99 of a latency ("ttft" or "itl") for each value of `setting` (a row per
    configuration and engine with `<latency>_p50_ms` ...: data.percentiles_frame): a colour per
    series as in metric_by_setting, a dash (numeric settings: lines) or a shape (categories:
    points side by side) per percentile; log scale, as tails are orders apart."""
    columns = [f"{latency}_p{q}_ms" for q in (50, 90, 99)]
    frame = frame.dropna(subset=columns).copy()
    frame["series"], legend = _series(frame, setting)
    numeric = _is_numeric(frame, setting)
    if not numeric:
        frame[setting] = frame[setting].astype(str)
    long = frame.melt(
        [setting, "series", "requests"], columns, var_name="percentile", value_name="ms"
    )
    long["percentile"] = long["percentile"].str.extract(r"_(p\d+)_", expand=False)
    name = LATENCIES[latency]
    color = alt.Color("series:N", title=legend, legend=alt.Legend(orient="bottom", labelLimit=0))
    percentile = alt.Legend(title="percentile", orient="bottom")
    tooltip = [
        alt.Tooltip("series:N", title=legend),
        alt.Tooltip(f"{setting}:N", title=_axis_name(setting)),
        alt.Tooltip("percentile:N"),
        alt.Tooltip("ms:Q", format=".1f", title=f"{name} (ms)"),
        alt.Tooltip("requests:Q", title="requests"),
    ]
    y = alt.Y("ms:Q", title="ms", scale=alt.Scale(type="log"))
    chart = alt.Chart(long, height=260, title=f"{name} p50 / p90 / p99 by {_axis_name(setting)}")
    if numeric:
        x = alt.X(f"{setting}:Q", title=_axis_name(setting), scale=alt.Scale(zero=False))
        return chart.mark_line(point=True).encode(
            x=x,
            y=y,
            color=color,
            strokeDash=alt.StrokeDash("percentile:N", legend=percentile),
            detail="series:N",
            tooltip=tooltip,
        )
    return chart.mark_point(size=80, filled=True).encode(
        x=_setting_x(frame, setting),
        xOffset=alt.XOffset("series:N", sort=None),
        y=y,
        color=color,
        shape=alt.Shape("percentile:N", legend=percentile),
        tooltip=tooltip,
    )


def pareto_frontier(frame: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Which rows no other row beats on both `x` and `y` (higher is better on both)."""
    values = frame[[x, y]].to_numpy()
    return pd.Series(
        [
            not any(
                (o[0] >= v[0] and o[1] >= v[1]) and (o[0] > v[0] or o[1] > v[1]) for o in values
            )
            for v in values
        ],
        index=frame.index,
    )


def per_request_against_total(summary: pd.DataFrame) -> alt.Chart:
    """The trade a concurrency (or any setting) makes, vLLM's Pareto view: each configuration's
    per-request decode speed against the total output of all its requests, a point each
    (labelled), per engine the configurations no other beats on both joined by a line (the
    Pareto frontier). Up and to the right is better."""
    frame = summary.dropna(subset=["decode_tps_mean", "output_tps_mean"]).copy()
    frame["frontier"] = False
    for _, rows in frame.groupby("engine"):
        frame.loc[rows.index, "frontier"] = pareto_frontier(
            rows, "decode_tps_mean", "output_tps_mean"
        )
    frame["frontier"] = frame["frontier"].map({True: "on the frontier", False: "beaten"})
    base = alt.Chart(frame, height=300, title="per-request speed against total output").encode(
        x=alt.X(
            "decode_tps_mean:Q",
            title="decode speed per request (tokens/s)",
            scale=alt.Scale(zero=False),
        ),
        y=alt.Y("output_tps_mean:Q", title="total output (tokens/s)", scale=alt.Scale(zero=False)),
        color=alt.Color("engine:N", title="engine", legend=alt.Legend(orient="bottom")),
    )
    points = base.mark_point(size=90, filled=True).encode(
        opacity=alt.Opacity(
            "frontier:N",
            title="",
            scale=alt.Scale(domain=["on the frontier", "beaten"], range=[1.0, 0.35]),
            legend=alt.Legend(orient="bottom"),
        ),
        tooltip=[
            alt.Tooltip("engine:N"),
            alt.Tooltip("label:N", title="configuration"),
            alt.Tooltip("decode_tps_mean:Q", format=".1f", title="per request (tokens/s)"),
            alt.Tooltip("output_tps_mean:Q", format=".1f", title="total (tokens/s)"),
            alt.Tooltip("frontier:N", title=""),
        ],
    )
    line = (
        base.transform_filter(alt.datum.frontier == "on the frontier")
        .mark_line(strokeDash=[4, 3])
        .encode(order="decode_tps_mean:Q")
    )
    labels = base.mark_text(dx=8, dy=-8, fontSize=11, align="left").encode(text="label:N")
    return line + points + labels


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
        alt.Chart(frame, height=280, title=f"{metric_name(metric)} across runs")
        .mark_line(point=True)
        .encode(
            x=alt.X(
                "run_label:N",
                title="run (version · commit)",
                sort=None,
                axis=alt.Axis(labelLimit=0, labelAngle=-20),
            ),
            y=alt.Y("mean:Q", title=metric_unit(metric)),
            color=alt.Color("series:N", title="configuration", legend=alt.Legend(labelLimit=0)),
            tooltip=[
                alt.Tooltip("run_label:N", title="run"),
                alt.Tooltip("series:N", title="configuration"),
                alt.Tooltip("mean:Q", format=".2f", title=f"mean ({metric_unit(metric)})"),
            ],
        )
    )
