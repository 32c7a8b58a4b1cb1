"""What every page shares: the process's one model and engine, the runs database, the settings
widgets, and the way a fault is shown (a message saying what and what to do, never a traceback).

Streamlit reruns a page's script on a worker thread at every click. Nothing here does MLX work on
that thread: the Engine's own thread runs every generation (the page only reads its handles), and
sweeps run in a worker process (mlxinfer.bench.jobs). `st.cache_resource` keeps one loaded model
and one engine per setting for the whole process, shared by every browser tab, so two tabs
chatting at once are two rows of one continuous batch.

Set by `mlxinfer dashboard`: MLXINFER_MODEL (the model preselected; unset: the default model) and
MLXINFER_DB (the runs database).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import streamlit as st

import mlxinfer  # noqa: F401  (first: OpenBLAS must be loaded before MLX on Linux)
from mlxinfer.bench.db import RunsDB, default_db_path
from mlxinfer.bench.grid import SAMPLING_AXES
from mlxinfer.bench.grid import sampling_label as grid_sampling_label
from mlxinfer.cache import CacheSpec
from mlxinfer.sampling import SamplingParams

DEFAULT = "default"  # the embedded default model (SmolLM2-135M-Instruct)
MODEL_ENV = "MLXINFER_MODEL"
MAX_BATCH = 8  # rows of the dashboard's engine: browser tabs chatting at once


def db_path() -> Path:
    return default_db_path()


_local = threading.local()


def runs_db() -> RunsDB:
    """The runs database, one connection per script thread (a connection is not for concurrent
    use; SQLite in WAL mode lets the sweep worker write while pages read)."""
    path = db_path()
    db = getattr(_local, "db", None)
    if db is None or db.path != path:
        db = _local.db = RunsDB(path)
    return db


@st.cache_resource(show_spinner=False)
def _conversations() -> dict[str, list]:
    """This server's chat conversations by id, kept for the life of the process."""
    return {}


MAX_CONVERSATIONS = 64  # the oldest go first


def conversation(chat_id: str | None) -> list:
    """The messages of conversation `chat_id` (the page's `?chat=` parameter): a reload of the
    tab (a new Streamlit session) finds its conversation again. An unknown or missing id starts
    a new one, whose id goes into the URL. The list is shared: appending to it keeps it."""
    import uuid

    kept = _conversations()
    if chat_id is None or chat_id not in kept:
        chat_id = uuid.uuid4().hex[:12]
        kept[chat_id] = []
        while len(kept) > MAX_CONVERSATIONS:
            kept.pop(next(iter(kept)))
        st.query_params["chat"] = chat_id
    return kept[chat_id]


def running_sweeps() -> list[int]:
    """The runs a process is measuring right now (a sweep started here or by `mlxinfer bench`)."""
    from mlxinfer.bench import jobs

    try:
        return [int(r["id"]) for r in runs_db().runs() if jobs.status(r) == "running"]
    except ValueError:  # the database is unusable: the pages that use it say so
        return []


def size(nbytes: float) -> str:
    """Bytes for people: "3.42 MB", "527 MB", "90.0 GB"."""
    mb = nbytes / 2**20
    if mb >= 1024:
        return f"{mb / 1024:,.1f} GB"
    return f"{mb:,.0f} MB" if mb >= 100 else f"{mb:,.2f} MB"


def duration(ms: float) -> str:
    """Milliseconds for people: "373 ms", "7.68 s"."""
    return f"{ms / 1e3:,.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def keep_line_breaks(text: str) -> str:
    """Markdown joins lines a single line break separates; a reply's line breaks are its own (a
    list, a poem, an address), so each becomes a hard break, except inside code fences, which
    keep theirs."""
    parts = text.split("```")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("\n", "  \n")
    return "```".join(parts)


def sampling_label(params: SamplingParams) -> str:
    """ "greedy", or the settings that differ from the defaults ("T 0.7, top-p 0.9")."""
    return grid_sampling_label({a: getattr(params, a) for a in SAMPLING_AXES})


# -- the model and the engine ----------------------------------------------------------------------


def model_label(name: str) -> str:
    return "default model (SmolLM2-135M-Instruct)" if name == DEFAULT else name


@st.cache_resource(show_spinner="Loading the model…", max_entries=3)
def _cached(name: str, compute: str):
    from mlxinfer.loading import load

    return load(None if name == DEFAULT else name, compute=compute)


def _load(name: str, compute: str = "auto"):
    """One copy per model and resolved policy ("auto" is float32 on the CPU: the chat's model
    and a float32 sweep's plan share it)."""
    from mlxinfer.backend import resolve_compute_policy

    return _cached(name, resolve_compute_policy(compute))


def load_for_plan(name: str, compute: str):
    """mlxinfer.bench.sweep.plan's loader: the process's cached models."""
    return _load(name, compute)


def load_model(name: str):
    """(model, tokenizer), or None after showing why it could not load."""
    try:
        return _load(name)
    except Exception as e:  # a bad path, a broken or unsupported checkpoint
        st.error(
            f"Could not load {model_label(name)}: {e}\n\nChoose another model in the sidebar: a "
            "local Hugging Face directory (config.json + safetensors + tokenizer.json) or a .gguf "
            "file. mlxinfer does not download models."
        )
        return None


def _close(engine) -> None:
    engine.close(cancel=True)


@st.cache_resource(show_spinner=False, max_entries=4, on_release=_close)
def _engine(name: str, max_kv_size: int | None, kv_bits: int | None, draft: str | None = None):
    from mlxinfer.engine import Engine

    model, tokenizer = _load(name)
    return Engine(
        model,
        tokenizer,
        max_batch=MAX_BATCH,
        prefix_cache_mb=256,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        draft_model=None if draft is None else _draft(model, tokenizer, draft),
    )


class DraftError(ValueError):
    """A draft model that cannot propose for the chat's model (it names the path and why)."""


def _draft(model, tokenizer, path: str):
    """The draft model at `path` for `model`, loaded as the model was and checked (its
    vocabulary, its tokenizer); DraftError naming the path otherwise."""
    from mlxinfer.speculative import check_draft_pair

    try:
        draft, draft_tokenizer = _load(path)
        check_draft_pair(model, tokenizer, draft, draft_tokenizer)
    except Exception as e:  # a bad path, a broken checkpoint, another tokenizer
        raise DraftError(f"draft model {path}: {e}") from None
    return draft


def engine(name: str, cache: CacheSpec | None = None, draft: str | None = None):
    """The process's engine for this model, cache kind and draft model (a path, or None), or
    None after showing why not."""
    cache = cache or CacheSpec()
    try:
        return _engine(name, cache.max_kv_size, cache.kv_bits, draft)
    except Exception as e:
        what = "this draft model" if isinstance(e, DraftError) else "this KV cache setting"
        st.error(f"Could not start the engine with {what}: {e}")
        return None


# -- the model picker ----------------------------------------------------------------------------


def _recent_file() -> Path:
    return db_path().parent / "recent-models.json"


def recent_models() -> list[str]:
    try:
        names = json.loads(_recent_file().read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)][:8]


def remember_model(name: str) -> None:
    if name == DEFAULT:
        return
    names = [name] + [n for n in recent_models() if n != name]
    try:
        _recent_file().parent.mkdir(parents=True, exist_ok=True)
        _recent_file().write_text(json.dumps(names[:8]))
    except OSError:
        pass  # the list is a convenience


def model_picker() -> str:
    """The sidebar's model choice: the default or a recently used model, or a path typed in.
    Returns the model in use (kept in the session); a model that fails to load leaves it as it
    was, with the reason shown."""
    state = st.session_state
    if "model" not in state:
        state.model = os.environ.get(MODEL_ENV) or DEFAULT
    wanted = state.pop("model_wanted", None)
    if wanted and wanted != state.model and load_model(wanted) is not None:
        state.model = wanted
        remember_model(wanted)
    choices = list(dict.fromkeys([DEFAULT, state.model, *recent_models()]))
    state.model_pick = state.model  # before the widget exists: allowed
    st.selectbox(
        "Model",
        choices,
        format_func=model_label,
        key="model_pick",
        on_change=lambda: state.update(model_wanted=state.model_pick),
    )
    st.text_input(
        "Another model",
        placeholder="/path/to/model-dir or file.gguf",
        key="model_path",
        help="A local Hugging Face directory (safetensors) or a GGUF file; press Enter to load.",
        on_change=lambda: state.update(model_wanted=state.model_path.strip()),
    )
    return state.model


# -- settings widgets ----------------------------------------------------------------------------


SAMPLING_BOXES = {  # SamplingParams' names -> the boxes' labels, so an error names the box
    "temperature": "Temperature",
    "top_k": "Top-k",
    "top_p": "Top-p",
    "min_p": "Min-p",
    "repetition_penalty": "Repetition penalty",
    "presence_penalty": "Presence penalty",
    "frequency_penalty": "Frequency penalty",
    "seed": "Seed",
    "max_tokens": "Max tokens",
}


def sampling_controls(prefix: str = "") -> tuple[SamplingParams | None, int, str | None]:
    """Every sampling setting: (params, max_tokens, None), or (None, max_tokens, what is wrong,
    naming the box). The number boxes have no bounds in the browser: a bounded box turns red on
    a value past them and keeps sending the previous one, which the user cannot see, so the
    values are checked here (by SamplingParams, the engine's own rules) and a wrong one said."""
    temperature = st.slider(
        "Temperature",
        0.0,
        2.0,
        0.0,
        0.05,
        key=prefix + "temperature",
        help="0 is greedy: always the most likely token.",
    )
    top_k = st.number_input("Top-k", value=0, step=1, key=prefix + "top_k", help="0: off")
    top_p = st.slider("Top-p", 0.0, 1.0, 1.0, 0.01, key=prefix + "top_p", help="1: off")
    min_p = st.slider("Min-p", 0.0, 1.0, 0.0, 0.01, key=prefix + "min_p", help="0: off")
    repetition = st.number_input(
        "Repetition penalty",
        value=1.0,
        step=0.05,
        key=prefix + "repetition_penalty",
        help="1: off; above 0",
    )
    presence = st.number_input(
        "Presence penalty", value=0.0, step=0.1, key=prefix + "presence_penalty", help="-2 to 2"
    )
    frequency = st.number_input(
        "Frequency penalty", value=0.0, step=0.1, key=prefix + "frequency_penalty", help="-2 to 2"
    )
    seed = st.number_input("Seed", value=0, step=1, key=prefix + "seed", help="0 or more")
    max_tokens = st.number_input(
        "Max tokens",
        value=256,
        step=1,
        key=prefix + "max_tokens",
        help="1 or more; a reply also ends at the model's context",
    )
    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=int(top_k),
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            seed=int(seed),
            max_tokens=int(max_tokens),
        )
    except ValueError as e:
        said = str(e)
        for name, label in SAMPLING_BOXES.items():
            if said.startswith(name + " "):
                said = label + said[len(name) :]
                break
        st.error(said)
        return None, int(max_tokens), said
    return params, int(max_tokens), None


CACHE_KINDS = {
    "full": "growing (full context)",
    "rotating": "rotating (the last N tokens)",
    "q8": "8-bit quantized",
    "q4": "4-bit quantized",
}


def cache_controls(prefix: str = "", where=st, label: str = "KV cache") -> CacheSpec:
    """The KV cache kind, picked in `where` (the page, or one of its columns)."""
    kind = where.selectbox(
        label, list(CACHE_KINDS), format_func=CACHE_KINDS.get, key=prefix + "cache"
    )
    if kind == "rotating":
        size = int(st.number_input("Tokens kept", 16, 1 << 20, 512, key=prefix + "max_kv_size"))
        return CacheSpec(max_kv_size=size)
    if kind in ("q8", "q4"):
        return CacheSpec(kv_bits=int(kind[1]))
    return CacheSpec()


def metric_row(metrics: dict) -> None:
    """A reply's or a measurement's headline numbers."""
    ttft, decode, peak, kv = st.columns(4)
    ttft.metric("TTFT", duration(metrics["ttft_ms"]))
    decode.metric("Decode", f"{metrics['decode_tps']:.1f} tok/s")
    peak.metric("Peak memory", size(metrics["peak_memory_mb"] * 2**20))
    kv.metric("KV cache", size(metrics["kv_cache_mb"] * 2**20))


def run_charts(db: RunsDB, run_id: int, items: list[dict]) -> None:
    """A run's charts (Sweep and Results show the same): per-request and total speed, TTFT and
    memory against a swept setting the user picks; TTFT and inter-token latency at p50 / p90 /
    p99; total output against latency and the per-request / total trade when there is one;
    goodput under the latency targets typed in."""
    import charts
    import data

    summary = data.summary_frame(items)
    for _, row in summary[summary["n"] == 0].iterrows():
        st.warning(f"{row['engine']} · {row['label']}: failed: {row['error']}")
    x = st.selectbox(
        "Chart against",
        data.x_axis_choices(items),
        key=f"x_{run_id}",
        format_func=lambda c: "configuration" if c == "label" else c,
    )
    left, right = st.columns(2)
    left.altair_chart(charts.metric_by_setting(summary, "decode_tps", x), width="stretch")
    right.altair_chart(charts.metric_by_setting(summary, "output_tps", x), width="stretch")
    left.altair_chart(charts.metric_by_setting(summary, "ttft_ms", x), width="stretch")
    right.altair_chart(charts.memory_predicted_vs_measured(summary, x), width="stretch")

    requests = db.requests(run_id)  # (read once: the tails and the goodput come from them)
    tails = data.percentiles_frame(requests)
    if tails.empty:
        st.caption(
            "Latency percentiles and goodput need each request's figures, which runs record "
            "since the runs database's schema 4; this run has only each measurement's means."
        )
    else:
        left, right = st.columns(2)
        left.altair_chart(charts.latency_percentiles(tails, "ttft", x), width="stretch")
        right.altair_chart(charts.latency_percentiles(tails, "itl", x), width="stretch")
        fewest, gaps = int(tails["requests"].min()), int(tails["gaps"].min())
        st.caption(
            f"Over every request of every repetition (at least {fewest} per configuration) "
            f"and every gap between tokens (at least {gaps}). "
            + ("A p99 of fewer than 100 values is close to their maximum." if gaps < 100 else "")
        )

    outputs = summary.dropna(subset=["output_tps_mean"])
    if summary["concurrency"].nunique() > 1 and not outputs.empty:
        st.altair_chart(charts.throughput_against_latency(summary), width="stretch")
        st.caption(
            "Each point is a concurrency: total output grows with it while each request's "
            "inter-token latency grows too. Up and to the left is better."
        )
    if not outputs.empty and outputs.groupby("engine").size().max() > 1:
        st.altair_chart(charts.per_request_against_total(summary), width="stretch")
        st.caption(
            "Each point a configuration: what one request gets against what all of them get "
            "together. Points joined by the dashed line are the Pareto frontier (no other "
            "configuration is better on both); up and to the right is better."
        )
    if not tails.empty:
        goodput_chart(requests, run_id, x)


def goodput_chart(requests: list[dict], run_id: int, x: str) -> None:
    """Goodput: the output of the requests within the TTFT and inter-token latency targets the
    user types (aiperf's and vLLM's definition), by the chosen setting."""
    import charts
    import data

    st.markdown("**Goodput**: output tokens/s of the requests that meet latency targets")
    left, right = st.columns(2)
    ttft = left.number_input(
        "TTFT target (ms)",
        min_value=0.0,
        value=None,
        step=100.0,
        key=f"goodput_ttft_{run_id}",
        placeholder="none",
        help="A request is good when its time to first token is at most this.",
    )
    itl = right.number_input(
        "Inter-token latency target (ms)",
        min_value=0.0,
        value=None,
        step=10.0,
        key=f"goodput_itl_{run_id}",
        placeholder="none",
        help="A request is good when its mean gap between tokens ((end-to-end − TTFT) / "
        "(tokens − 1)) is at most this.",
    )
    if ttft is None and itl is None:
        st.caption("Type a target to chart goodput against it.")
        return
    frame = data.goodput_frame(requests, ttft, itl)
    st.altair_chart(charts.metric_by_setting(frame, "goodput_tps", x), width="stretch")
    shares = ", ".join(
        f"{row.engine} · {row.label}: {row.good_share:.0%}" for row in frame.itertuples(index=False)
    )
    st.caption(f"Requests within the targets: {shares}.")
