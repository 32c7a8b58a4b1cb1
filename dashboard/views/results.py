"""Results: every run in the database, filtered by model, machine, version and date; one run's
table, downloads and latency by token position; two runs compared with ratios; a metric across
several runs, so a regression between commits shows."""

import datetime

import charts
import common
import data
import pandas as pd
import streamlit as st

from mlxinfer.bench import report
from mlxinfer.metrics import DEFINITIONS

db = common.runs_db()
st.title("Results")
st.caption(f"Runs in {common.db_path()}")

runs = data.runs_frame(db)
if runs.empty:
    st.info(
        "No runs yet: start one on the Sweep page, or `mlxinfer bench` in a terminal "
        f"(with `--db {common.db_path()}`)."
    )
    st.stop()

with st.sidebar:
    st.markdown("**Filter runs**")
    models = st.multiselect("Model", sorted(runs["model"].unique()), key="filter_model")
    machines = st.multiselect("Machine", sorted(runs["machine"].unique()), key="filter_machine")
    versions = st.multiselect("Version", sorted(runs["version"].unique()), key="filter_version")
    first = runs["started"].min().date()
    since = st.date_input("Since", first, key="filter_since")

shown = runs
if models:
    shown = shown[shown["model"].isin(models)]
if machines:
    shown = shown[shown["machine"].isin(machines)]
if versions:
    shown = shown[shown["version"].isin(versions)]
if isinstance(since, datetime.date):
    shown = shown[shown["started"].dt.date >= since]

st.markdown("Pick one run to see it, two to compare them, more to follow a metric across them.")
picked = st.dataframe(
    shown,
    hide_index=True,
    on_select="rerun",
    selection_mode="multi-row",
    key="runs_table",
    column_config={"started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm")},
)
# (rows of the table as shown: a filter changed since leaves indices that may not exist)
chosen = [int(shown.iloc[i]["run"]) for i in picked.selection.rows if i < len(shown)]
manual = st.multiselect("…or by id", list(runs["run"]), key="runs_by_id")
chosen = list(dict.fromkeys(chosen + [int(r) for r in manual]))
if not chosen:  # nothing picked: the newest run (of those the filters show)
    newest = int((shown if not shown.empty else runs)["run"].max())
    chosen = [newest]
    st.caption(f"Showing the newest run, {newest}: pick runs in the table to see others.")

metric_names = {d.name: d.label for d in DEFINITIONS}
numeric = [m for m in metric_names if m not in ("itl_ms", "queue_ms", "active_memory_mb")]

if len(chosen) == 1:
    run_id = chosen[0]
    items = report.summarize(db, run_id)
    st.subheader(f"Run {run_id}")
    st.code(db.run(run_id)["command"], language="bash", wrap_lines=True)  # what it swept
    if (said := report.caution(items)) is not None:
        st.warning(said)
    st.markdown(report.markdown_table(items))
    left, right = st.columns(2)
    left.download_button(
        "Measurements (CSV)", report.to_csv(db, run_id), f"run-{run_id}.csv", "text/csv"
    )
    right.download_button(
        "Summary (JSON)", report.to_json(items), f"run-{run_id}.json", "application/json"
    )
    if any(i["decode_tps"] for i in items):
        common.run_charts(db, run_id, items)
    positions = data.positions_frame(db, run_id)
    if not positions.empty:
        st.subheader("Latency by token position")
        series = st.multiselect(
            "Configurations",
            sorted(positions["series"].unique()),
            default=sorted(positions["series"].unique())[:2],
            key=f"positions_{run_id}",
        )
        if series:
            st.altair_chart(
                charts.latency_by_position(positions[positions["series"].isin(series)]),
                width="stretch",
            )
        chosen_measurements = data.measurements_frame(db, run_id)
        one = st.selectbox(
            "One measurement",
            list(chosen_measurements.itertuples(index=False)),
            format_func=lambda m: f"{m.engine} · {m.label} · repetition {m.rep}",
            key=f"measurement_{run_id}",
        )
        if one is not None:
            st.altair_chart(charts.measurement_gaps(data.gaps_frame(db, one.id)), width="stretch")
elif len(chosen) == 2:
    a, b = sorted(chosen)
    metric = st.selectbox("Metric", numeric, format_func=metric_names.get, key="compare_metric")
    table = data.compare_frame(db, a, b, metric)
    st.subheader(f"Run {b} against run {a}: {metric_names[metric]}")
    if table.empty:
        st.info("These two runs share no configuration (same engine and settings).")
    else:
        st.dataframe(
            table,
            hide_index=True,
            column_config={"B / A": st.column_config.NumberColumn(format="%.3f")},
        )
        if not table["verdict"].isin(["higher", "lower"]).all():
            st.caption(
                "A ratio is a difference only where its 95% interval excludes 1 (verdict "
                "'higher' or 'lower'); the others are within the runs' noise."
            )
if len(chosen) >= 2:
    metric = st.selectbox("Across runs", numeric, format_func=metric_names.get, key="across_metric")
    frame = data.across_runs_frame(db, chosen, metric)
    left_out = sorted(set(chosen) - set(frame["run"] if not frame.empty else []))
    if frame.empty:
        st.info("No configuration appears in two of these runs.")
    else:
        if left_out:
            st.caption(
                f"Not shown: run{'s' if len(left_out) > 1 else ''} "
                f"{', '.join(map(str, left_out))}, sharing no configuration (same engine and "
                "settings) with another of the runs picked."
            )
        st.altair_chart(charts.metric_across_runs(frame, metric), width="stretch")
        st.download_button(
            "This comparison (CSV)",
            pd.DataFrame(frame).to_csv(index=False),
            "across-runs.csv",
            "text/csv",
        )
