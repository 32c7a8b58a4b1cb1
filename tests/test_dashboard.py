"""The dashboard's pages through Streamlit's AppTest (the scripts run, nothing is rendered): chat
on a tiny random checkpoint and on the default model, a sweep started from the page and followed
to its end, results compared, bad input shown as a message and never as a traceback. The charts'
data is checked as plain functions. The real browser test is test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from .reference import make_tiny_checkpoint  # noqa: E402
from .test_bench_command import two_runs_of_a_small_grid  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TIMEOUT = 120


@pytest.fixture
def dashboard(tmp_path, monkeypatch, tiny):
    """The app on a fresh database with the tiny model preselected; the process-wide caches
    (the model, the engine) cleared after, which closes the engine."""
    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("MLXINFER_MODEL", tiny)
    st.cache_resource.clear()
    yield tmp_path / "runs.sqlite"
    st.cache_resource.clear()


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page is not None:
        at.switch_page(page).run()
    healthy(at)
    return at


def healthy(at) -> None:
    """No exception, and no bug caught by the app's last resort."""
    assert not at.exception, at.exception
    assert not [e.value for e in at.error if e.value.startswith("Unexpected error")]


def sidebar_input(at, label):
    return next(w for w in at.sidebar.text_input if w.label == label)


def max_tokens(at, n):
    next(w for w in at.sidebar.number_input if w.label == "Max tokens").set_value(n).run()


def test_chat_streams_a_reply_with_its_metrics(dashboard):
    at = app()
    assert at.title[0].value == "Chat"
    max_tokens(at, 24)  # the tiny model's context is 256 tokens
    at.chat_input[0].set_value("Hello there").run()
    healthy(at)
    messages = at.chat_message
    assert [m.name for m in messages] == ["user", "assistant"]
    assert messages[0].markdown[0].value == "Hello there"
    labels = [m.label for m in messages[1].metric]
    assert labels == ["TTFT", "Decode", "Peak memory", "KV cache"]
    ttft = messages[1].metric[0].value  # "373 ms", or "1.20 s" past a second
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", ttft) and float(ttft.split()[0]) > 0
    assert at.session_state["messages"][1]["metrics"]["generated_tokens"] > 0
    # a second turn keeps the conversation (both turns shown again, then the new reply)
    at.chat_input[0].set_value("And again").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2


def test_a_reply_says_how_many_tokens_why_it_ended_and_with_what(dashboard):
    """Under each reply: its token count, its finish reason in words, and the settings it was
    made with (a reply cut at max tokens looked like one the model ended)."""
    at = app()
    max_tokens(at, 5)
    at.chat_input[0].set_value("Hello there").run()
    healthy(at)
    (summary,) = at.chat_message[1].caption
    assert re.fullmatch(
        r"\d+ tokens? · (ended by the model|cut at max tokens) · greedy · KV cache full",
        summary.value,
    ), summary.value
    n = at.session_state["messages"][1]["metrics"]["generated_tokens"]
    assert summary.value.startswith(f"{n} token")
    if n == 5:
        assert "cut at max tokens" in summary.value
    at.chat_input[0].set_value("again").run()  # the history shows it again
    assert at.chat_message[1].caption[0].value == summary.value


def test_an_empty_message_is_not_sent(dashboard):
    at = app()
    at.chat_input[0].set_value("   \n  ").run()
    healthy(at)
    assert not at.chat_message and not at.session_state["messages"]
    assert [w.value for w in at.warning] == ["The message is empty: nothing was sent."]


def test_sizes_durations_and_machines_read_as_people_write_them():
    """ "92,160.00 MB", "7676 ms" and "AMD EPYC (Device(cpu, 0))" were on the pages."""
    sys.path.insert(0, str(Path(APP).parent))
    try:
        import common
        import data
    finally:
        sys.path.pop(0)
    assert [common.size(b) for b in (3.5 * 2**20, 527 * 2**20, 92160 * 2**20)] == [
        "3.50 MB",
        "527 MB",
        "90.0 GB",
    ]
    assert [common.duration(ms) for ms in (373.2, 7676)] == ["373 ms", "7.68 s"]
    facts = {"cpu": "AMD EPYC 7B13", "backend": "Device(cpu, 0)"}
    assert data.machine_label(facts) == "AMD EPYC 7B13 · cpu"
    assert data.machine_label({"cpu": "Apple M3", "backend": "Device(gpu, 0)"}) == "Apple M3 · gpu"


def test_a_reply_keeps_its_line_breaks():
    """Markdown joined a reply's lines into one paragraph; code fences keep theirs as they are."""
    sys.path.insert(0, str(Path(APP).parent))
    try:
        import common
    finally:
        sys.path.pop(0)
    text = "1. one\n2. two\n```\nx = 1\ny = 2\n```\nbye"
    assert common.keep_line_breaks(text) == "1. one  \n2. two  \n```\nx = 1\ny = 2\n```  \nbye"


def test_settings_that_ruin_small_models_and_a_running_sweep_are_warned(dashboard):
    from mlxinfer.bench.db import RunsDB

    at = app()
    assert not at.sidebar.warning
    kv = next(w for w in at.sidebar.selectbox if w.label == "KV cache")
    kv.set_value("q4").run()
    assert any("4-bit KV cache" in w.value for w in at.sidebar.warning)
    kv.set_value("q8").run()
    assert not at.sidebar.warning
    kv.set_value("rotating").run()
    next(w for w in at.sidebar.number_input if w.label == "Tokens kept").set_value(16).run()
    max_tokens(at, 4)
    at.chat_input[0].set_value("a message longer than sixteen tokens, " * 3).run()
    healthy(at)
    assert any("The KV cache keeps 16 tokens" in w.value for w in at.chat_message[1].warning)
    run = RunsDB(dashboard).start_run("mlxinfer bench", {"cpu": "test"}, reps=1)  # this process
    at.run()
    assert [w.value for w in at.sidebar.warning] == [
        f"Run {run} is sweeping: a chat now slows it and skews its measurements (both share "
        "this machine's cores)."
    ]


def test_the_penalty_boxes_take_exactly_what_sampling_takes(dashboard):
    """Presence and frequency penalties: SamplingParams takes -2..2 (as OpenAI's API does); 2 is
    taken, 2.5 is an error naming the box."""
    at = app()
    for label in ("Presence penalty", "Frequency penalty"):
        box = next(w for w in at.sidebar.number_input if w.label == label)
        box.set_value(2.0).run()
        healthy(at)
        assert not at.error, [e.value for e in at.error]
        box.set_value(2.5).run()
        assert any(e.value.startswith(f"Sampling: {label} must be in [-2, 2]") for e in at.error)
        box.set_value(0.0).run()


@pytest.mark.parametrize(
    "label,value,message",
    [
        ("Top-k", -5, "Top-k must be an integer >= 0, got -5"),
        ("Max tokens", 0, "Max tokens must be an integer >= 1, got 0"),
        ("Repetition penalty", 0.0, "Repetition penalty must be in (0, inf), got 0.0"),
        ("Seed", -1, "Seed must be an integer >= 0, got -1"),
    ],
)
def test_a_wrong_number_is_named_and_no_reply_is_made_with_other_settings(
    dashboard, label, value, message
):
    """Top-k -5 turned the box red in the browser and the next reply silently used the previous
    value: now the box takes it, the sidebar says what is wrong, and a message is not sent."""
    at = app()
    next(w for w in at.sidebar.number_input if w.label == label).set_value(value).run()
    healthy(at)
    assert any(e.value == f"Sampling: {message}" for e in at.sidebar.error)
    at.chat_input[0].set_value("Hi").run()
    healthy(at)
    assert [m.name for m in at.chat_message] == []  # nothing sent, nothing answered
    assert any(e.value.startswith(f"Not sent: {message}") for e in at.error)


def test_a_model_that_does_not_load_is_a_message_and_the_page_stays_usable(dashboard):
    at = app()
    sidebar_input(at, "Another model").set_value("/nonexistent/model").run()
    healthy(at)
    assert any("Could not load /nonexistent/model" in e.value for e in at.error)
    assert at.session_state["model"] != "/nonexistent/model"  # the working model stays
    max_tokens(at, 24)
    at.chat_input[0].set_value("Still there?").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]


def test_max_tokens_past_the_context_is_clipped_as_everywhere(dashboard):
    """The Engine refused prompt + max_tokens past the context, which generate() clips: now the
    same rule everywhere, the reply ends at the context (the tiny model's is 256 tokens)."""
    at = app()
    max_tokens(at, 8000)
    at.chat_input[0].set_value("Hi").run()
    healthy(at)
    assert not at.error, [e.value for e in at.error]
    assert [m.name for m in at.chat_message] == ["user", "assistant"]


def test_a_conversation_past_the_context_leaves_its_oldest_turns_out(
    dashboard, tmp_path, monkeypatch
):
    """As `mlxinfer chat` does: once the history outgrows the context, the oldest exchanges are
    left out of what the model sees, with a notice; the page keeps showing them."""
    chatty = tmp_path / "chatty"
    make_tiny_checkpoint(chatty, "llama")  # the tiny tokenizer has no chat template: give it one
    config = json.loads((chatty / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    (chatty / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("MLXINFER_MODEL", str(chatty))
    at = app()
    max_tokens(at, 8)
    long_turn = "word " * 60  # ~60 tokens a turn against a 256-token context
    at.session_state["messages"] = [
        {"role": role, "content": long_turn, "metrics": None}
        for _ in range(3)
        for role in ("user", "assistant")
    ]
    at.chat_input[0].set_value("And now?").run()
    healthy(at)
    assert not at.error, [e.value for e in at.error]
    notices = [i.value for i in at.info if "outgrew the model's context" in i.value]
    assert notices and "oldest messages are left out" in notices[0]
    assert len(at.chat_message) == 8  # 6 earlier messages, the question, its reply


def test_the_default_model_answers_in_the_chat(tmp_path, monkeypatch):
    """The real model's known answer (greedy): 'Paris', with its metrics under the reply."""
    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.delenv("MLXINFER_MODEL", raising=False)
    st.cache_resource.clear()
    try:
        at = app()
        at.chat_input[0].set_value("What is the capital of France?").run()
        healthy(at)
        reply = at.chat_message[1]
        assert "Paris" in reply.markdown[0].value
        assert len(reply.metric) == 4
    finally:
        st.cache_resource.clear()


COPY_ASK = "Repeat exactly: the quick brown fox jumps over the lazy dog. " * 2


def _plain_copy_reply():
    """(the app, its plain reply to COPY_ASK in 16 tokens), then a new conversation."""
    at = app()
    max_tokens(at, 16)
    at.chat_input[0].set_value(COPY_ASK).run()
    plain = at.chat_message[1].markdown[0].value
    next(b for b in at.button if b.label == "New conversation").click().run()
    return at, plain


def test_a_reply_by_prompt_lookup_shows_its_acceptance_by_position(tmp_path, monkeypatch):
    """Speculative decoding from the chat (the default model copying its prompt): the same
    reply as without it, and under it how many proposals were accepted and, by position in a
    pass, how often each was accepted once reached."""
    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.delenv("MLXINFER_MODEL", raising=False)
    st.cache_resource.clear()
    try:
        at, plain = _plain_copy_reply()
        next(t for t in at.sidebar.toggle if t.label == "Prompt lookup").set_value(True).run()
        at.chat_input[0].set_value(COPY_ASK).run()
        healthy(at)
        reply = at.chat_message[1]
        assert reply.markdown[0].value == plain
        metrics = at.session_state["messages"][1]["metrics"]
        assert metrics["accepted_draft_tokens"] > 0
        said = [c.value for c in reply.caption]
        assert any(c.startswith("Speculative decoding: ") for c in said), said
        assert any("prompt lookup (4 a step)" in c for c in said), said
        (chart,) = [c for c in reply.get("vega_lite_chart") if "acceptance" in c.proto.spec]
        frame = chart_data(chart)
        assert list(frame["position"]) == list(range(1, len(frame) + 1))
        assert list(frame["acceptance"]) == metrics["acceptance_by_position"]
        assert 0 < frame["acceptance"].iloc[0] <= 1
    finally:
        st.cache_resource.clear()


def test_a_reply_by_a_draft_model_is_the_same_reply_and_a_bad_draft_is_one_error(
    tmp_path, monkeypatch
):
    """A draft model from the chat (the default model as its own draft: its proposals are the
    model's argmax): the reply of plain decoding, with its proposals counted; a draft path that
    does not load is one error naming it, and nothing is sent."""
    from mlxinfer.loading import default_model_path

    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.delenv("MLXINFER_MODEL", raising=False)
    st.cache_resource.clear()
    try:
        at, plain = _plain_copy_reply()
        sidebar_input(at, "Draft model").set_value(str(default_model_path())).run()
        at.chat_input[0].set_value(COPY_ASK).run()
        healthy(at)
        reply = at.chat_message[1]
        assert reply.markdown[0].value == plain
        assert at.session_state["messages"][1]["metrics"]["draft_tokens"] > 0
        assert any("draft model " in c.value for c in reply.caption)
        next(b for b in at.button if b.label == "New conversation").click().run()
        sidebar_input(at, "Draft model").set_value(str(tmp_path / "nope")).run()
        at.chat_input[0].set_value("Hello").run()
        healthy(at)
        errors = [e.value for e in at.error]
        assert any(
            e.startswith("Could not start the engine with this draft model: draft model ")
            and "nope" in e
            for e in errors
        ), errors
        assert not at.chat_message  # nothing sent
    finally:
        st.cache_resource.clear()


def chart_data(chart, column: str | None = None):
    """The frame a chart draws, as Streamlit sent it to the browser (Arrow); of a layered chart,
    the one that has `column`."""
    import pyarrow as pa

    frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in chart.proto.datasets]
    if column is not None:
        frames = [f for f in frames if column in f.columns]
    (frame,) = frames
    return frame


def wait_for_run(at, db_path, timeout=TIMEOUT):
    """Rerun the page (as its fragment would) until the run it follows is over."""
    from mlxinfer.bench import jobs
    from mlxinfer.bench.db import RunsDB

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1)
        at.run()
        db = RunsDB(db_path)
        runs = db.runs()
        db.close()
        if (
            runs
            and all(jobs.status(r) != "running" for r in runs)
            and ("job" not in at.session_state or at.session_state["job"] is None)
        ):
            return at.run()
    raise AssertionError("the sweep did not finish")


def test_a_sweep_runs_from_the_page_and_its_charts_have_the_data(dashboard):
    at = app("views/sweep.py")
    assert at.title[0].value == "Sweep"
    inputs = {w.label: w for w in at.text_input}
    inputs["temperature"].set_value("0,0.8")
    inputs["prompt tokens"].set_value("8")
    inputs["gen tokens"].set_value("6").run()
    healthy(at)
    assert next(m for m in at.metric if m.label == "Configurations").value == "2"
    assert next(m for m in at.metric if m.label == "Estimated duration").value == "unknown"
    predicted = next(m for m in at.metric if m.label == "Predicted memory (largest)").value
    assert float(predicted.removesuffix(" MB").replace(",", "")) > 0
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    at = wait_for_run(at, dashboard)
    healthy(at)
    assert any(s.value.startswith("Run 1: done") for s in at.subheader)
    from mlxinfer.bench import report
    from mlxinfer.bench.db import RunsDB

    rows = RunsDB(dashboard).measurements(1)
    assert len(rows) == 2 * 3 and all(r["status"] == "ok" for r in rows)  # 2 configs x 3 reps
    charts_shown = at.get("vega_lite_chart")
    # decode, total output, TTFT, peak memory; TTFT and ITL p50/p90/p99; per request vs total
    assert len(charts_shown) == 7
    spec = json.loads(charts_shown[0].proto.spec)
    assert spec["layer"][0]["title"] == "decode speed by sampling"
    assert spec["layer"][0]["encoding"]["y"]["title"] == "tokens/s"
    measured = sorted(chart_data(charts_shown[0])["decode_tps_mean"])
    summary = sorted(i["decode_tps"]["mean"] for i in report.summarize(RunsDB(dashboard), 1))
    assert measured == pytest.approx(summary)  # the chart draws the run's numbers
    tails = chart_data(charts_shown[4])
    assert len(tails) == 2 * 3 and set(tails["percentile"]) == {"p50", "p90", "p99"}
    expected = sorted(
        i["ttft_p90_ms"] for i in report.request_latencies(RunsDB(dashboard).requests(1))
    )
    assert sorted(tails[tails["percentile"] == "p90"]["ms"]) == pytest.approx(expected)
    # goodput: with a target every request meets, it is the total output, computed from the
    # requests where output_tps was computed from the measurement's
    at.number_input(key="goodput_ttft_1").set_value(1e9).run()
    healthy(at)
    goodput = chart_data(at.get("vega_lite_chart")[7])
    totals = sorted(i["output_tps"]["mean"] for i in report.summarize(RunsDB(dashboard), 1))
    assert sorted(goodput["goodput_tps_mean"]) == pytest.approx(totals)
    assert any(c.value.startswith("Requests within the targets") for c in at.caption)
    # the next sweep of these lengths has an estimate from this one's measurements
    at = app("views/sweep.py")
    inputs = {w.label: w for w in at.text_input}
    inputs["prompt tokens"].set_value("8")
    inputs["gen tokens"].set_value("6").run()
    assert next(m for m in at.metric if m.label == "Estimated duration").value.endswith("min")


def test_a_sweep_of_a_server_at_a_url_runs_from_the_page(dashboard):
    """Measure "a server at a URL": the KV cache and compute boxes are the server's (disabled), a
    bad URL is named, the plan has no memory prediction, and the run measures the server with
    its API key (sent, never on the command line or in the database)."""
    from mlxinfer.bench.db import RunsDB

    from .test_bench_http import Scripted

    server = Scripted(first_s=0.01, gap_s=0.01, events=6)
    try:
        at = app("views/sweep.py")
        at.selectbox(key="sweep_measure").set_value("A server at a URL (OpenAI-compatible)").run()
        healthy(at)
        assert any("Give the server's URL" in i.value for i in at.info)
        inputs = {w.label: w for w in at.text_input}
        assert inputs["kv"].disabled and inputs["compute"].disabled
        assert not inputs["temperature"].disabled
        inputs["Server URL"].set_value("localhost:1234").run()
        assert any("not an http" in e.value for e in at.error)
        assert not [b for b in at.button if b.label == "Run the sweep"]
        inputs = {w.label: w for w in at.text_input}
        inputs["Server URL"].set_value(server.url + "/v1")
        inputs["API key"].set_value("sk-dashboard")
        inputs["prompt tokens"].set_value("8")
        inputs["gen tokens"].set_value("6").run()
        healthy(at)
        predicted = next(m for m in at.metric if m.label == "Predicted memory (largest)")
        assert predicted.value == "the server's"
        next(b for b in at.button if b.label == "Run the sweep").click().run()
        at = wait_for_run(at, dashboard)
        healthy(at)
        db = RunsDB(dashboard)
        (run,) = db.runs()
        assert run["target"] == server.url and "sk-dashboard" not in run["command"]
        rows = db.measurements(run["id"])
        assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
        assert {r["engine"] for r in rows} == {server.url}
        assert len(server.seen) == 4  # the warm-up and three repetitions
        assert all(h["authorization"] == "Bearer sk-dashboard" for h, _ in server.seen)
    finally:
        server.shutdown()
        server.server_close()


def test_a_bad_sweep_value_names_the_axis_and_nothing_runs(dashboard):
    at = app("views/sweep.py")
    next(w for w in at.text_input if w.label == "top p").set_value("0.9,2").run()
    healthy(at)
    assert any("sweep axis 'top_p'" in e.value for e in at.error)
    assert not [b for b in at.button if b.label == "Run the sweep"]
    next(w for w in at.text_input if w.label == "top p").set_value("1.0").run()
    next(w for w in at.text_input if w.label == "gen tokens").set_value("1000").run()
    assert any("exceed the context" in e.value for e in at.error)


def test_a_grid_past_the_limit_is_an_error_and_is_never_expanded(dashboard, monkeypatch):
    """11 values in each of four boxes: 14,641 configurations, past the limit. Before: expanded
    into a list and checked one by one on every rerun (four boxes of 100: gigabytes, no
    word), then offered to run."""
    from mlxinfer.bench import grid, sweep

    def expanded(axes):
        raise AssertionError("the grid was expanded")

    monkeypatch.setattr(grid, "expand", expanded)
    monkeypatch.setattr(sweep, "expand", expanded)
    at = app("views/sweep.py")
    eleven = ",".join(str(n) for n in range(1, 12))
    inputs = {w.label: w for w in at.text_input}
    inputs["top k"].set_value(eleven)
    inputs["prompt tokens"].set_value(eleven)
    inputs["gen tokens"].set_value(eleven)
    inputs["depth"].set_value(eleven).run()
    healthy(at)
    assert any("the grid has 14,641 configurations" in e.value for e in at.error)
    assert not [b for b in at.button if b.label == "Run the sweep"]


def test_a_sweep_estimated_past_an_hour_is_warned(dashboard, tiny):
    """The database has measured this model slowly: the page says the sweep would take hours."""
    from mlxinfer.bench.db import METRICS, RunsDB
    from mlxinfer.bench.grid import DEFAULTS

    db = RunsDB(dashboard)
    past = db.start_run("earlier", {"cpu": "test"}, reps=1)
    (config,) = db.add_configurations(past, [("k", {**DEFAULTS, "model": tiny})])
    db.record(config, "mlxinfer", 0, {m: 1.0 for m in METRICS} | {"decode_tps": 0.01})
    db.finish_run(past, "done")
    at = app("views/sweep.py")
    inputs = {w.label: w for w in at.text_input}
    inputs["prompt tokens"].set_value("8")
    inputs["gen tokens"].set_value("6").run()
    healthy(at)
    # (8 / 1 + 6 / 0.01) s a repetition, 4 of them (a warm-up, 3 repetitions): 0.7 hours
    estimates = lambda: [w.value for w in at.warning if "would take" in w.value]  # noqa: E731
    assert not estimates()  # (the past run shown below is cautioned for its 1 repetition)
    inputs["gen tokens"].set_value("60").run()  # (8 / 1 + 60 / 0.01) x 4 s: 6.7 hours
    assert estimates() == [
        "This sweep would take about 6.7 hours at the speeds this database has measured: fewer "
        "values make it shorter. Stop ends it whenever you like, keeping what it measured; "
        "Resume continues it."
    ]


def test_results_list_compare_and_follow_a_metric_across_runs(dashboard, tiny):
    two_runs_of_a_small_grid(tiny, dashboard, TIMEOUT)  # from the command line
    at = app("views/results.py")
    assert at.title[0].value == "Results"
    table = at.dataframe[0].value
    assert list(table["run"]) == [1, 2] and set(table["status"]) == {"done"}
    # nothing picked: the newest run, not a blank page; 2 repetitions: said to say little
    assert [s.value for s in at.subheader][:1] == ["Run 2"]
    assert at.code[0].value.startswith("mlxinfer bench")  # what it swept, whole
    assert any("Showing the newest run, 2" in c.value for c in at.caption)
    assert any(w.value.startswith("2 repetitions: the ± and the 95% intervals") for w in at.warning)
    at.multiselect(key="runs_by_id").set_value([1]).run()
    healthy(at)
    assert [b.label for b in at.get("download_button")] == ["Measurements (CSV)", "Summary (JSON)"]
    *run_charts, by_position, one = at.get("vega_lite_chart")  # then by position, one's
    assert len(run_charts) == 7  # the run's charts, as on the Sweep page
    gaps = chart_data(one)
    assert list(gaps["token"]) == list(range(5)) and (gaps["ms"] > 0).all()
    at.multiselect(key="runs_by_id").set_value([1, 2]).run()
    healthy(at)
    compared = at.dataframe[1].value
    assert len(compared) == 2 and set(compared["engine"]) == {"mlxinfer"}
    assert all(compared["B / A"] > 0)
    assert {"run 1 (ms)", "run 2 (ms)"} <= set(compared.columns)  # TTFT, with its unit
    assert set(compared["repetitions"]) == {"2 / 2"}
    assert set(compared["verdict"]) == {"too few repetitions (2)"}  # not a number like the rest


def test_the_metrics_page_defines_every_recorded_metric(dashboard):
    from mlxinfer.bench.db import METRICS

    at = app("views/metrics.py")
    assert not at.dataframe  # a grid cut the definitions; a table shows each whole
    shown = set(at.table[0].value.index)
    percentiles = {m for m in METRICS if m.startswith("itl_p")}  # itl_ms defines them
    assert set(METRICS) - percentiles <= shown and "itl_ms" in shown


def dashboard_modules():
    """The dashboard's charts and data modules (plain functions, no Streamlit)."""
    sys.path.insert(0, str(Path(APP).parent))
    try:
        import charts
        import data
    finally:
        sys.path.pop(0)
    return charts, data


def measured_grid(tmp_path, axes: dict, reps: int, decode_tps) -> list[dict]:
    """A run of the grid `axes` in a new runs database, every measurement recorded (metrics 1.0,
    decode_tps(configuration index, repetition)): its report items."""
    return measured_run(tmp_path, axes, reps, decode_tps)[2]


def measured_run(tmp_path, axes: dict, reps: int, decode_tps, output_tps=None, requests=None):
    """measured_grid's run as (db, run id, report items); output_tps(i, rep) and requests(config,
    rep) -> each request's figures, when given, are recorded too."""
    from mlxinfer.bench import report
    from mlxinfer.bench.db import METRICS, RunsDB
    from mlxinfer.bench.grid import config_key, expand, parse_axes

    db = RunsDB(tmp_path / "runs.sqlite")
    run = db.start_run("test", {"cpu": "test"}, reps=reps)
    configs = list(expand(parse_axes(axes)))
    ids = db.add_configurations(run, [(config_key(c), c) for c in configs])
    for i, (config, config_id) in enumerate(zip(configs, ids, strict=True)):
        for rep in range(reps):
            metrics = {m: 1.0 for m in METRICS} | {"decode_tps": decode_tps(i, rep)}
            if output_tps is not None:
                metrics["output_tps"] = output_tps(i, rep)
            figures = requests(config, rep) if requests is not None else ()
            db.record(config_id, "mlxinfer", rep, metrics, requests=figures)
    return db, run, report.summarize(db, run)


def test_charts_carry_the_summary_statistics(tiny, tmp_path):
    """The sweep charts' data: each configuration and engine's mean and mean ± std."""
    charts, data = dashboard_modules()
    speeds = ([10.0, 14.0], [20.0, 20.0])
    items = measured_grid(tmp_path, {"temperature": "0,0.8"}, 2, lambda i, rep: speeds[i][rep])
    summary = data.summary_frame(items)
    assert data.x_axis_choices(items) == ["sampling"]
    spec = charts.metric_by_setting(summary, "decode_tps", "sampling").to_dict()
    rows = next(iter(spec["datasets"].values()))
    by_label = {r["sampling"]: r for r in rows}
    assert by_label["greedy"]["decode_tps_mean"] == pytest.approx(12.0)
    assert by_label["greedy"]["low"] == pytest.approx(12.0 - 2**1.5)  # std of (10, 14)
    assert by_label["T 0.8"]["high"] == pytest.approx(20.0)
    assert spec["layer"][0]["encoding"]["y"]["title"] == "tokens/s"
    assert spec["layer"][0]["title"] == "decode speed by sampling"


def test_a_two_axis_sweep_charts_every_configuration_apart(tmp_path):
    """Concurrency 1,2,4 x kv full,q8: charted against concurrency, a line per kv value, each in
    the legend (the bars of one colour per concurrency were indistinguishable); against kv, a bar
    per concurrency, in the legend, with labels never cut; against the configuration, full labels.
    Every chart has a title and its unit on the axis; the memory chart's prediction is in its
    legend."""
    charts, data = dashboard_modules()
    items = measured_grid(tmp_path, {"concurrency": "1,2,4", "kv": "full,q8"}, 1, lambda i, r: 1.0)
    summary = data.summary_frame(items)
    assert data.x_axis_choices(items) == ["label", "concurrency", "kv"]

    def series(spec):
        rows = next(iter(spec["datasets"].values()))
        return sorted({r["series"] for r in rows})

    spec = charts.metric_by_setting(summary, "decode_tps", "concurrency").to_dict()
    line, _ = spec["layer"]
    assert line["mark"]["type"] == "line" and line["encoding"]["x"]["type"] == "quantitative"
    assert line["encoding"]["color"]["title"] == "engine · kv"
    assert series(spec) == ["mlxinfer · kv full", "mlxinfer · kv q8"]
    assert line["title"] == "decode speed by concurrency"

    spec = charts.metric_by_setting(summary, "ttft_ms", "kv").to_dict()
    bars, _ = spec["layer"]
    assert bars["encoding"]["color"]["title"] == "engine · concurrency"
    assert series(spec) == [f"mlxinfer · concurrency {n}" for n in (1, 2, 4)]
    assert bars["encoding"]["x"]["axis"]["labelLimit"] == 0
    assert (bars["title"], bars["encoding"]["y"]["title"]) == ("time to first token by kv", "ms")

    spec = charts.metric_by_setting(summary, "decode_tps", "label").to_dict()
    bars, _ = spec["layer"]
    assert bars["encoding"]["x"]["title"] == "configuration"
    assert bars["encoding"]["x"]["axis"]["labelLimit"] == 0
    labels = {r["label"] for r in next(iter(spec["datasets"].values()))}
    assert "concurrency 4 · kv q8" in labels and len(labels) == 6

    spec = charts.memory_predicted_vs_measured(summary, "kv").to_dict()
    measured, predicted = spec["layer"]
    assert measured["title"] and measured["encoding"]["y"]["title"] == "MB"
    assert predicted["encoding"]["shape"]["field"] == "prediction"
    assert {r["prediction"] for r in next(iter(spec["datasets"].values()))} == {"predicted"}

    spec = charts.throughput_against_latency(summary).to_dict()  # a concurrency sweep's view
    line, labels = spec["layer"]
    assert line["encoding"]["x"]["title"] == "inter-token latency p50 (ms)"
    assert line["encoding"]["y"]["title"] == "total output (tokens/s)"
    assert series(spec) == ["mlxinfer · kv full", "mlxinfer · kv q8"]
    assert labels["encoding"]["text"]["field"] == "concurrency"  # each point says which


def test_latency_tails_the_pareto_view_and_goodput_are_charted(tmp_path):
    """Concurrency 1,2,4 x kv full,q8 with every request recorded: TTFT and ITL at p50/p90/p99
    (a dash per percentile and a colour per kv value against concurrency; a shape per percentile
    against kv, log scale); per-request speed against total output with the Pareto frontier
    marked; goodput under targets with its title and unit."""
    charts, data = dashboard_modules()

    def requests(config, rep):  # request k waits 10 ms x concurrency x (k + 1); gaps 5 ms x n
        n = config["concurrency"]
        return [
            {"ttft_ms": 10.0 * n * (k + 1), "e2e_ms": 10.0 * n * (k + 1) + 15 * n, "tokens": 4}
            | {"gaps": [5.0 * n] * 3}
            for k in range(n)
        ]

    decode = [20.0, 20.0, 15.0, 15.0, 10.0, 10.0]  # by concurrency 1, 2, 4 (x kv full, q8)
    total = [20.0, 19.0, 30.0, 29.0, 25.0, 24.0]
    db, run, items = measured_run(
        tmp_path,
        {"concurrency": "1,2,4", "kv": "full,q8"},
        2,
        lambda i, rep: decode[i],
        lambda i, rep: total[i],
        requests,
    )
    tails = data.percentiles_frame(db.requests(run))
    spec = charts.latency_percentiles(tails, "ttft", "concurrency").to_dict()
    assert spec["title"] == "time to first token p50 / p90 / p99 by concurrency"
    assert (
        spec["mark"]["type"] == "line" and spec["encoding"]["strokeDash"]["field"] == "percentile"
    )
    assert spec["encoding"]["color"]["title"] == "engine · kv"
    assert spec["encoding"]["y"]["scale"]["type"] == "log"
    rows = next(iter(spec["datasets"].values()))
    assert len(rows) == 6 * 3 and {r["percentile"] for r in rows} == {"p50", "p90", "p99"}
    # concurrency 4: TTFTs 40, 80, 120, 160 (twice): p50 100, p99 160 (the top two)
    four = {
        r["percentile"]: r["ms"] for r in rows if r["concurrency"] == 4 and "full" in r["series"]
    }
    assert four["p50"] == pytest.approx(100.0) and four["p99"] == pytest.approx(160.0)
    spec = charts.latency_percentiles(tails, "itl", "kv").to_dict()
    assert spec["mark"]["type"] == "point" and spec["encoding"]["shape"]["field"] == "percentile"
    assert spec["encoding"]["x"]["axis"]["labelLimit"] == 0

    summary = data.summary_frame(items)
    spec = charts.per_request_against_total(summary).to_dict()
    line, points, labels = spec["layer"]
    rows = next(iter(spec["datasets"].values()))
    frontier = {(r["concurrency"], r["kv"]) for r in rows if r["frontier"] == "on the frontier"}
    assert frontier == {(1, "full"), (2, "full")}  # 4 is beaten by 2; q8 by full at each
    assert line["mark"]["type"] == "line" and labels["encoding"]["text"]["field"] == "label"
    assert points["encoding"]["x"]["title"] == "decode speed per request (tokens/s)"
    assert points["encoding"]["y"]["title"] == "total output (tokens/s)"

    goodput = data.goodput_frame(db.requests(run), ttft_ms=50.0, itl_ms=None)
    spec = charts.metric_by_setting(goodput, "goodput_tps", "concurrency").to_dict()
    line, _ = spec["layer"]
    assert (
        line["title"] == "goodput by concurrency" and line["encoding"]["y"]["title"] == "tokens/s"
    )
    shares = dict(zip(goodput["concurrency"], goodput["good_share"], strict=False))
    assert shares == {1: 1.0, 2: 1.0, 4: 0.25}  # at 4, only the first request waits <= 50 ms


def test_the_pareto_frontier_is_what_nothing_beats_on_both():
    import pandas as pd

    charts, _ = dashboard_modules()
    frame = pd.DataFrame({"x": [1, 2, 3, 2, 3], "y": [5, 4, 1, 3, 1]})
    # (2, 3) is beaten by (2, 4); the second (3, 1) ties the first: neither beats the other
    assert charts.pareto_frontier(frame, "x", "y").tolist() == [True, True, True, False, True]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such file"),
        (["--db", "/proc/no/runs.sqlite"], "runs database"),
    ],
)
def test_mlxinfer_dashboard_refuses_bad_flags_before_starting(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "dashboard", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_worker_that_died_shows_as_interrupted_and_resumes(dashboard, tiny):
    """The sweep's process killed mid-run: the page says the run is interrupted, keeps what it
    measured, and Resume finishes it without repeating a measurement."""
    import os
    import signal

    from mlxinfer.bench import jobs
    from mlxinfer.bench.db import RunsDB

    db = RunsDB(dashboard)
    axes = {"model": tiny, "top_k": "0,2,4", "prompt_tokens": "8", "gen_tokens": "200"}
    job = jobs.start_sweep(axes, reps=3, db_path=dashboard)
    deadline = time.monotonic() + TIMEOUT
    while (job.run_id(db) is None or len(db.measurements(job.run_id(db))) < 2) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    run_id = job.run_id(db)
    os.kill(job.pid, signal.SIGKILL)
    job.process.wait()
    kept = len(db.measurements(run_id))
    assert 2 <= kept < 9
    at = app("views/sweep.py")
    assert any(s.value == f"Run {run_id}: interrupted" for s in at.subheader)
    next(b for b in at.button if b.label == "Resume").click().run()
    at = wait_for_run(at, dashboard)
    healthy(at)
    assert not [e for e in at.error if "did not start" in e.value]  # the resumed run was found
    assert any(s.value == f"Run {run_id}: done" for s in at.subheader)
    rows = db.measurements(run_id)
    assert sorted((r["position"], r["rep"]) for r in rows) == [
        (p, k) for p in range(3) for k in range(3)
    ]


def test_a_model_typed_in_is_loaded_and_remembered(dashboard, tiny, monkeypatch):
    monkeypatch.delenv("MLXINFER_MODEL")
    at = app()
    assert at.session_state["model"] == "default"
    sidebar_input(at, "Another model").set_value(tiny).run()
    healthy(at)
    assert at.session_state["model"] == tiny
    assert tiny in at.sidebar.selectbox[0].options  # and among the recent ones next time
    at = app()
    assert tiny in at.sidebar.selectbox[0].options


def test_a_cache_kind_the_model_cannot_have_is_a_message(dashboard):
    at = app()
    max_tokens(at, 24)
    next(w for w in at.sidebar.selectbox if w.label == "KV cache").set_value("q8").run()
    at.chat_input[0].set_value("Hi").run()
    healthy(at)
    assert any("Could not start the engine" in e.value and "head_dim" in e.value for e in at.error)


def test_a_sweep_too_large_for_memory_is_not_offered(dashboard, monkeypatch):
    from mlxinfer.bench import machine

    monkeypatch.setattr(machine, "available_memory_mb", lambda: 0.1)
    at = app("views/sweep.py")
    inputs = {w.label: w for w in at.text_input}
    inputs["prompt tokens"].set_value("8")
    inputs["gen tokens"].set_value("6").run()
    healthy(at)
    assert any("are available: make it smaller" in e.value for e in at.error)
    assert next(b for b in at.button if b.label == "Run the sweep").disabled


def test_inside_the_model_shows_the_trace_of_the_prompt(dashboard):
    """The page on the tiny model: its tokens, the next-token chart through the sampler's
    stages, attention of a chosen layer and head, the logit lens, the architecture, and the KV
    cache calculator's prediction checked against a real cache."""
    at = app("views/inside.py")
    assert at.title[0].value == "Inside the model"
    at.text_area(key="inside_prompt").set_value("w5 w9 w17 w33 w64").run()
    healthy(at)
    tokens = at.dataframe[0].value
    assert list(tokens["id"]) == [5, 9, 17, 33, 64]
    assert [t.label for t in at.tabs][:3] == ["Tokens", "Next token", "Attention"]
    charts_drawn = at.get("vega_lite_chart")
    next_token = chart_data(charts_drawn[0], "probability")
    assert len(next_token) == 20 and next_token["probability"].is_monotonic_decreasing
    # the sequence: temperature 1.5, then "After position" 4 -> 2; the bars stay in rank
    # order (the x axis's order is the frame's, not the previous draw's) and the line climbs
    next(s for s in at.slider if s.label == "Temperature").set_value(1.5).run()
    next(s for s in at.slider if s.label == "After position").set_value(2).run()
    healthy(at)
    chart = at.get("vega_lite_chart")[0]
    drawn = chart_data(chart, "probability")
    assert drawn["probability"].is_monotonic_decreasing
    assert drawn["cumulative"].is_monotonic_increasing
    spec = json.loads(chart.proto.spec)
    assert spec["layer"][0]["encoding"]["x"]["sort"] == list(drawn["label"])
    assert list(drawn["label"]) == [
        f"{r}. {t}" for r, t in zip(drawn["rank"], drawn["token"], strict=True)
    ]
    attention = chart_data(charts_drawn[1])
    assert len(attention) == 15  # the causal half of 5 x 5
    assert attention.groupby("q")["weight"].sum().round(5).eq(1).all()
    assert next(m for m in at.metric if m.label == "Layers").value == "2"
    next(b for b in at.button if b.label == "Check against a real cache").click().run()
    healthy(at)
    predicted = next(m for m in at.metric if m.label == "Predicted KV cache").value
    measured = next(m for m in at.metric if m.label == "Measured")
    assert measured.value == predicted and not measured.delta  # no "↑ +0.00 MB"
    assert any(c.value == "Exactly the prediction." for c in at.caption)
    next(b for b in at.button if b.label == "Sample 200 times").click().run()
    healthy(at)
    drawn = len(at.get("vega_lite_chart"))
    at.number_input(key="inside_layer").set_value(1).run()  # another tab's setting
    assert len(at.get("vega_lite_chart")) == drawn  # the draws stay (they vanished)
    next(s for s in at.slider if s.label == "Temperature").set_value(1.0).run()
    assert len(at.get("vega_lite_chart")) == drawn - 1  # drawn for other settings: gone, and said
    assert any("for other settings" in c.value for c in at.caption)


def test_inside_a_mixture_of_experts_shows_the_routing(tmp_path, monkeypatch):
    path = tmp_path / "moe"
    make_tiny_checkpoint(path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("MLXINFER_MODEL", str(path))
    st.cache_resource.clear()
    try:
        at = app("views/inside.py")
        at.text_area(key="inside_prompt").set_value("w5 w9 w17 w33").run()
        healthy(at)
        routing = next(d.value for d in at.dataframe if "experts" in d.value.columns)
        assert len(routing) == 4  # one row per token
        assert all(len(e.split(", ")) == 2 for e in routing["experts"])  # top-2 of 4
        usage = next(chart_data(c) for c in at.get("vega_lite_chart") if "expert" in c.proto.spec)
        assert usage.groupby("layer")["tokens"].sum().eq(4 * 2).all()  # 4 tokens x 2 experts
    finally:
        st.cache_resource.clear()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_a_gemma_model_chats_and_shows_its_inside(tmp_path, monkeypatch, family):
    """The pages unchanged on a tiny random Gemma: a chat reply with its metrics, and the inside
    view's trace, attention, logit lens and step by step (which names Gemma's norms, GeGLU and,
    for Gemma 2, the soft-capped head)."""
    path = tmp_path / family
    make_tiny_checkpoint(path, family)
    monkeypatch.setenv("MLXINFER_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("MLXINFER_MODEL", str(path))
    st.cache_resource.clear()
    try:
        at = app()
        max_tokens(at, 12)
        at.chat_input[0].set_value("Hello there").run()
        healthy(at)
        assert [m.name for m in at.chat_message] == ["user", "assistant"]
        assert at.session_state["messages"][1]["metrics"]["generated_tokens"] > 0
        at = app("views/inside.py")
        at.text_area(key="inside_prompt").set_value("w5 w9 w17 w33 w64").run()
        healthy(at)
        assert list(at.dataframe[0].value["id"]) == [5, 9, 17, 33, 64]
        attention = chart_data(at.get("vega_lite_chart")[1])
        assert attention.groupby("q")["weight"].sum().round(5).eq(1).all()
        steps = next(t.value for t in at.table if "what happens" in t.value.columns)
        blocks = steps["what happens"].iloc[2]
        assert "GeGLU" in blocks and blocks.count("RMSNorm") == 4
        head = steps["what happens"].iloc[4]
        assert ("soft-capped" in head) == (family == "gemma2")
    finally:
        st.cache_resource.clear()
