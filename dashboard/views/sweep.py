"""Sweep: build a grid over `mlxinfer bench`'s axes, see what it will cost before running it, run
it in a worker process, and watch the charts fill as measurements land in the database. It
measures the engine in process, or any OpenAI-compatible server at a URL, with mlx-lm beside
either (in its own process, or as mlx_lm.server).

The sweep never runs on this script's thread (a click reruns the script): `mlxinfer bench` runs in
its own process (mlxinfer.bench.jobs) and commits every measurement; this page follows the run
through the database with a fragment that refreshes itself, so a reload, another tab or a closed
browser loses nothing, and a running sweep is found again."""

import common
import data
import streamlit as st

from mlxinfer.bench import jobs, report
from mlxinfer.bench.grid import DEFAULTS, ENGINE_AXES, LENGTH_AXES, SAMPLING_AXES, parse_axes
from mlxinfer.bench.http import normalized_url
from mlxinfer.bench.sweep import plan, too_long

state = st.session_state
db = common.runs_db()

GROUPS = {  # the model is the sidebar's
    "Sampling": SAMPLING_AXES,
    "Lengths": LENGTH_AXES,
    "Engine": tuple(a for a in ENGINE_AXES if a != "model"),
}
HELP = {
    "depth": "tokens already in the cache before the prompt (a long conversation)",
    "concurrency": "requests at once, batched by the engine",
    "kv": "full, rotating:N, q8, q4, q8:rotating:N",
    "compute": "float32 or native weights",
    "spec": "speculative decoding: none, prompt-lookup, prompt-lookup:N, draft:PATH or "
    "draft:PATH:N (the model at PATH as draft; N proposals a step, 1-8); mlxinfer only",
}

with st.sidebar:
    name = common.model_picker()

st.title("Sweep")
st.caption(
    "Each box is a comma list; the grid is every combination. Every configuration gets a "
    "warm-up, then the repetitions; every measurement is saved as it is made."
)

MEASURED = {  # what a sweep measures -> the baselines it can have beside it
    "mlxinfer, in this machine's process": {
        "none": None,
        "mlx-lm, in its own process": "mlx-lm",
        "mlx_lm.server beside mlxinfer serve (both over HTTP)": "mlx-lm-server",
    },
    "A server at a URL (OpenAI-compatible)": {
        "none": None,
        "mlx_lm.server on the same model (over HTTP)": "mlx-lm-server",
    },
}
SERVER_SET = ("kv", "compute")  # a target server's own settings, not the sweep's

left, middle, right = st.columns(3)
measured = middle.selectbox("Measure", list(MEASURED), key="sweep_measure")
over_url = measured != next(iter(MEASURED))
choice = right.selectbox("Beside it", list(MEASURED[measured]), key="sweep_baseline_choice")
baseline = MEASURED[measured][choice]
reps = left.number_input("Repetitions", 1, 50, 3, key="sweep_reps")
target = api_key = None
if over_url:
    url_box, key_box = st.columns([2, 1])
    target = url_box.text_input(
        "Server URL",
        key="sweep_target",
        placeholder="http://127.0.0.1:8080",
        help="Any OpenAI-compatible server (mlxinfer serve, mlx_lm.server, llama-server, vLLM, "
        "LM Studio, Ollama): streamed /v1/completions, the concurrency as requests in flight. "
        "The model picked in the sidebar gives the prompts' text.",
    ).strip()
    api_key = (
        key_box.text_input(
            "API key", key="sweep_api_key", type="password", help="if it wants one; never stored"
        ).strip()
        or None
    )

raw = {}
for group, axes in GROUPS.items():
    st.markdown(f"**{group}**")
    columns = st.columns(len(axes) if len(axes) < 5 else 4)
    for i, axis in enumerate(axes):
        with columns[i % len(columns)]:
            fixed = over_url and axis in SERVER_SET
            value = st.text_input(
                axis.replace("_", " "),
                str(DEFAULTS[axis]),
                key=f"axis_{axis}",
                help="the server's own setting" if fixed else HELP.get(axis),
                disabled=fixed,
            )
            raw[axis] = str(DEFAULTS[axis]) if fixed else value.strip()
raw["model"] = name

axes = None
if over_url and not target:
    st.info("Give the server's URL to measure it.")
else:
    try:
        axes = parse_axes(raw)
        if target:
            normalized_url(target)
    except ValueError as e:
        st.error(f"{e}. Fix that box; nothing has run.")
        axes = None

if axes is not None:
    try:
        preview = plan(
            axes, int(reps), baseline, db, load=common.load_for_plan, target=target or None
        )
    except Exception as e:  # a model that does not load, lengths beyond its context, ...
        st.error(f"This grid cannot run: {e}. Nothing has run.")
        preview = None
    if preview is not None:
        predicted = [mb for mb in preview["predicted_mb"] if mb is not None]
        peak = max(predicted) if predicted else None
        available = preview["available_mb"]
        a, b, c = st.columns(3)
        a.metric(
            "Configurations",
            preview["configurations"],
            help=f"{preview['measurements']} measurements",
        )
        seconds = preview["seconds"]
        b.metric(
            "Estimated duration",
            "unknown" if seconds is None else f"{seconds / 60:.1f} min",
            help="From this database's past measurements of the same model, compute "
            "policy and concurrency; unknown until there are some (the progress then "
            "shows the time left).",
        )
        c.metric(
            "Predicted memory (largest)",
            "the server's" if peak is None else f"{peak:,.1f} MB",
            help="weights + KV cache as allocated, for the largest configuration"
            + ("" if available is None else f"; {available:.0f} MB available"),
        )
        if too_long(seconds):
            st.warning(
                f"This sweep would take about {seconds / 3600:.1f} hours at the speeds "
                "this database has measured: fewer values make it shorter. Stop ends it "
                "whenever you like, keeping what it measured; Resume continues it."
            )
        too_big = available is not None and peak is not None and peak > available
        if too_big:
            st.error(
                f"The largest configuration needs ~{peak:.0f} MB and {available:.0f} MB "
                "are available: make it smaller (shorter lengths, less concurrency, a "
                "quantized or rotating cache)."
            )
        busy = [r for r in db.runs() if jobs.status(r) == "running"] or state.get("job")
        if st.button(
            "Run the sweep",
            type="primary",
            disabled=too_big or bool(busy),
            help="One sweep at a time: they would slow each other." if busy else None,
        ):
            flags = {k: v for k, v in raw.items() if v != str(DEFAULTS[k])}
            state.job = jobs.start_sweep(
                flags, int(reps), common.db_path(), baseline, target=target, api_key=api_key
            )
            state.following = None


def following() -> int | None:
    """The run this page shows: the one it started, else the one it followed, else one that is
    running, else the database's last run."""
    job = state.get("job")
    if job is not None:
        run_id = job.run_id(db)
        if run_id is not None:
            state.following, state.job = run_id, None
        elif job.exit_code() is not None:  # it ended without making a run: refused
            state.job = None
            state.job_error = job.output()
        else:
            return None  # still loading the model: not the previous run's charts meanwhile
    if state.get("following") is None:  # a reload, another tab: the running sweep, or the last
        runs = db.runs()
        running = [r["id"] for r in runs if jobs.status(r) == "running"]
        state.following = running[-1] if running else runs[-1]["id"] if runs else None
    return state.get("following")


def show_run(run_id: int) -> None:
    run = db.run(run_id)
    status = jobs.status(run)
    done, planned = data.run_progress(db, run)
    st.subheader(f"Run {run_id}: {status}")
    st.code(run["command"], language="bash", wrap_lines=True)  # what it sweeps, to run again
    st.progress(
        min(done / planned, 1.0) if planned else 0.0, text=f"{done} of {planned} measurements"
    )
    if status == "running":
        if st.button("Stop", icon=":material/stop:", key=f"stop_{run_id}"):
            jobs.stop(run)
            st.toast("Stopping after the measurement in progress.")
    elif status in ("stopped", "interrupted", "failed"):
        st.info(f"The run is {status}; what it measured is kept.")
        if st.button("Resume", icon=":material/play_arrow:", key=f"resume_{run_id}"):
            state.job = jobs.start_sweep(
                {}, run["reps"], common.db_path(), resume=run_id, api_key=api_key
            )
            state.following = None
            st.rerun()
    items = report.summarize(db, run_id)
    if not any(i["decode_tps"] for i in items):
        st.caption("Charts appear with the first measurement (after the model loads and warms up).")
        return
    if (said := report.caution(items)) is not None:
        st.warning(said)
    common.run_charts(db, run_id, items)
    with st.expander("Table"):
        st.markdown(report.markdown_table(items))


if state.get("job_error"):
    st.error("The sweep did not start:\n\n```\n" + state.pop("job_error") + "\n```")

run_id = following()
if run_id is not None:
    live = jobs.status(db.run(run_id)) == "running" or state.get("job") is not None

    @st.fragment(run_every=2 if live else None)
    def follow():
        current = following()
        if current is None:
            return
        try:
            show_run(current)
        except Exception as e:  # a fragment's error would skip app.py's message
            st.error(f"Unexpected error showing run {current}: {type(e).__name__}: {e}")
        still = jobs.status(db.run(current)) == "running" or state.get("job") is not None
        if live and not still:
            st.rerun()  # the whole page once more: stop refreshing

    follow()
elif state.get("job") is not None:

    @st.fragment(run_every=1)
    def starting():
        st.info("Starting the sweep: loading the model…")
        if following() is not None or state.get("job") is None:
            st.rerun()

    starting()
