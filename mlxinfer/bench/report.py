"""What a run's measurements say: per configuration and engine, each metric's mean, standard
deviation and samples; the cost of sampling (decode speed against the greedy configuration of the
same lengths and engine settings); the markdown table, the JSON and CSV exports, and the comparison
of two runs."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence

from .db import METRICS, RunsDB
from .grid import AXES, DEFAULTS, SAMPLING_AXES, sampling_label
from .stats import MIN_REPS, first_difference, paired_ratio, summary, verdict
from .sweep import BASELINES

TABLE_METRICS = (
    "prefill_tps",
    "decode_tps",
    "output_tps",
    "ttft_ms",
    "itl_p99_ms",
    "peak_memory_mb",
    "predicted_memory_mb",
)


HEADERS = {  # short, with the unit: the table must fit a terminal and a page
    "prefill_tps": "prefill tok/s",
    "decode_tps": "decode tok/s",
    "output_tps": "total tok/s",
    "ttft_ms": "TTFT ms",
    "itl_p99_ms": "ITL p99 ms",
    "peak_memory_mb": "peak MB",
    "predicted_memory_mb": "predicted MB",
}


def summarize(db: RunsDB, run_id: int) -> list[dict]:
    """One item per configuration and engine, in grid order: `engine`, `settings`, `failed`
    (repetitions that failed, with the first error) and each metric as {mean, std, samples}."""
    groups: dict[tuple, dict] = {}
    for row in db.measurements(run_id):
        key = (row["position"], row["engine"])
        item = groups.setdefault(
            key,
            {
                "engine": row["engine"],
                "settings": row["settings"],
                "failed": 0,
                "error": None,
                "samples": {m: [] for m in METRICS},
            },
        )
        if row["status"] != "ok":
            item["failed"] += 1
            item["error"] = item["error"] or row["error"]
            continue
        for m in METRICS:
            if row[m] is not None:  # a metric an engine does not report
                item["samples"][m].append(row[m])
    out = []
    for (_, _), item in sorted(groups.items()):
        samples = item.pop("samples")
        for m in METRICS:
            item[m] = summary(samples[m]) if samples[m] else None
        out.append(item)
    _sampling_cost(out)
    _against_baseline(out, db, run_id)
    return out


def _against_baseline(items: list[dict], db: RunsDB, run_id: int) -> None:
    """For the rows of the run's engine (mlxinfer in process, `mlxinfer serve`, or a target server)
    when mlx-lm (in process or its server) measured the same configuration: `vs_mlx_lm`, the decode
    and prefill speed ratios with 95% intervals paired by repetition; `same_tokens`, for greedy
    configurations, whether both produced the same tokens in the first repetition (else
    `first_difference`, the position where they part)."""
    by_config = {}
    for item in items:
        by_config.setdefault(json.dumps(item["settings"], sort_keys=True), {})[item["engine"]] = (
            item
        )
    tokens = {}
    for row in db.measurements(run_id):
        if row["rep"] == 0 and row["tokens"] is not None:
            tokens[(json.dumps(row["settings"], sort_keys=True), row["engine"])] = row["tokens"]
    for key, engines in by_config.items():
        mine = [name for name in engines if name not in BASELINES]  # the run's first engine
        base = [name for name in engines if name in BASELINES]
        if not mine:
            continue
        ours = engines[mine[0]]
        theirs = engines[base[0]] if base else None
        ours["vs_mlx_lm"] = None
        if theirs is None or not ours["decode_tps"] or not theirs["decode_tps"]:
            continue
        ratios = {}
        for metric in ("decode_tps", "prefill_tps", "output_tps"):
            if not ours[metric] or not theirs[metric]:
                continue
            a, b = ours[metric]["samples"], theirs[metric]["samples"]
            if len(a) == len(b) and all(v > 0 for v in a + b):
                ratios[metric] = paired_ratio(a, b)
        ours["vs_mlx_lm"] = ratios
        a, b = tokens.get((key, mine[0])), tokens.get((key, base[0]))
        if ours["settings"]["temperature"] == 0 and a is not None and b is not None:
            position = first_difference(a, b)
            ours["same_tokens"] = position is None
            ours["first_difference"] = position


def _sampling_cost(items: list[dict]) -> None:
    """`sampling_cost`: decode speed relative to the greedy configuration that differs only in its
    sampling settings (same engine), when the run has one."""

    def rest(settings: dict) -> tuple:
        return tuple(sorted((k, v) for k, v in settings.items() if k not in SAMPLING_AXES))

    greedy = {}  # the configuration with every sampling setting at its default
    for item in items:
        s = item["settings"]
        if all(s[k] == DEFAULTS[k] for k in SAMPLING_AXES) and item["decode_tps"]:
            greedy[(item["engine"], rest(s))] = item["decode_tps"]["mean"]
    for item in items:
        base = greedy.get((item["engine"], rest(item["settings"])))
        ok = base and item["decode_tps"]
        item["sampling_cost"] = item["decode_tps"]["mean"] / base if ok else None


def swept_axes(items: Sequence[dict]) -> list[str]:
    """The axes whose value differs between configurations."""
    return [a for a in AXES if len({json.dumps(i["settings"][a]) for i in items}) > 1]


def setting_columns(axes: Sequence[str]) -> dict:
    """Column name -> how to show a configuration's value: one column per swept axis, except that
    more than two swept sampling settings become one "sampling" column ("T 0.7, top-p 0.9")."""
    sampling = [a for a in axes if a in SAMPLING_AXES]
    columns = {}
    if len(sampling) > 2:
        columns["sampling"] = sampling_label
    for a in axes:
        if a not in columns and not (a in sampling and "sampling" in columns):
            columns[a] = lambda settings, a=a: str(settings[a])
    return columns


def markdown_table(items: Sequence[dict]) -> str:
    """llama-bench's layout: the swept settings, then mean ± std of the main metrics; the columns
    that compare ("vs greedy", "decode vs mlx-lm", "same tokens") only where a row has a value,
    so a run without them is narrower."""
    axes = swept_axes(items) or ["prompt_tokens", "gen_tokens"]
    columns = setting_columns(axes)
    compare = {
        "vs greedy": lambda i: (
            "" if i.get("sampling_cost") is None else f"{i['sampling_cost']:.2f}"
        ),
        "decode vs mlx-lm (95% CI)": _mlx_lm_cell,
        "total vs mlx-lm": lambda i: _mlx_lm_cell(i, "output_tps"),
        "same tokens": _same_tokens_cell,
        "acceptance": lambda i: (
            "" if not i.get("acceptance_rate") else f"{i['acceptance_rate']['mean']:.2f}"
        ),
    }
    ok = [i for i in items if i["decode_tps"] is not None]
    compare = {name: cell for name, cell in compare.items() if any(cell(i) for i in ok)}
    header = ["engine", *columns, *(HEADERS[m] for m in TABLE_METRICS), *compare]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in items:
        cells = [item["engine"], *(show(item["settings"]) for show in columns.values())]
        if item["decode_tps"] is None:
            cells += [f"failed: {item['error']}"] + [""] * (len(TABLE_METRICS) - 1 + len(compare))
        else:
            cells += [
                "—" if item[m] is None else f"{item[m]['mean']:.1f} ± {item[m]['std']:.1f}"
                for m in TABLE_METRICS
            ]
            cells += [cell(item) for cell in compare.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mlx_lm_cell(item: dict, metric: str = "decode_tps") -> str:
    ratio = (item.get("vs_mlx_lm") or {}).get(metric)
    return "" if ratio is None else _ratio_cell(ratio)


def _same_tokens_cell(item: dict) -> str:
    same = item.get("same_tokens")
    return "" if same is None else "yes" if same else f"from token {item['first_difference']}"


def _ratio_cell(interval: dict) -> str:
    """ "1.52 [1.31, 1.76]", and a caution when the interval says nothing: "1.03 [0.91, 1.16],
    not significant"."""
    cell = f"{interval['ratio']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"
    said = verdict(interval)
    return cell if said in ("higher", "lower") else f"{cell}, {said}"


def caution(items: Sequence[dict]) -> str | None:
    """A sentence when a run's repetitions are too few for its ± and intervals to mean much."""
    counts = [len(i["decode_tps"]["samples"]) for i in items if i["decode_tps"]]
    if counts and min(counts) < MIN_REPS:
        return (
            f"{min(counts)} repetition{'s' if min(counts) > 1 else ''}: the ± and the 95% "
            f"intervals say little below {MIN_REPS} (with 2, an interval is 12.7 standard "
            "errors wide each way); run more before drawing conclusions."
        )
    return None


def to_json(items: Sequence[dict]) -> str:
    """A list, one object per configuration and engine: `engine`, the settings, each metric."""
    return json.dumps(
        [
            {
                "engine": i["engine"],
                **i["settings"],
                **{m: i[m] for m in METRICS},
                "failed": i["failed"],
                "error": i["error"],
                "sampling_cost": i.get("sampling_cost"),
                "vs_mlx_lm": i.get("vs_mlx_lm"),
                "same_tokens": i.get("same_tokens"),
                "first_difference": i.get("first_difference"),
            }
            for i in items
        ],
        indent=1,
    )


def to_csv(db: RunsDB, run_id: int) -> str:
    """Every measurement, one row per configuration, engine and repetition."""
    rows = db.measurements(run_id)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["position", "engine", "rep", *AXES, "status", "error", *METRICS])
    for r in rows:
        writer.writerow(
            [
                r["position"],
                r["engine"],
                r["rep"],
                *(r["settings"][a] for a in AXES),
                r["status"],
                r["error"] or "",
                *(r[m] for m in METRICS),
            ]
        )
    return out.getvalue()


def latency_by_position(db: RunsDB, run_id: int) -> list[dict]:
    """Latency by token position within a request: for each configuration and engine, each
    position's latency (position 0: the time to the first token; then the gap since the previous
    token), its median and 90th percentile over the repetitions, in ms. What a mean ITL hides:
    latency that grows with the context, periodic stalls, a slow first steps after prefill."""
    import numpy as np

    groups: dict[tuple, dict] = {}
    for row in db.measurements(run_id):
        if row["status"] != "ok":
            continue
        gaps = position_latencies(db.token_times(row["id"]))
        if not gaps:  # nothing was generated
            continue
        item = groups.setdefault(
            (row["position"], row["engine"]),
            {"engine": row["engine"], "settings": row["settings"], "reps": []},
        )
        item["reps"].append(gaps)
    out = []
    for _, item in sorted(groups.items()):
        n = min(len(g) for g in item["reps"])
        gaps = np.array([g[:n] for g in item.pop("reps")])
        item["p50_ms"] = np.median(gaps, axis=0).tolist()
        item["p90_ms"] = np.percentile(gaps, 90, axis=0).tolist()
        out.append(item)
    return out


PERCENTILES = (50, 90, 99)


def request_latencies(requests: Sequence[dict]) -> list[dict]:
    """TTFT and inter-token latency at p50 / p90 / p99 for each configuration and engine of a
    run (its requests: `RunsDB.requests`), over every request of every repetition (TTFT) and
    every gap of every request (ITL), in ms, with how many requests and gaps they come from: the
    tail a mean hides, as guidellm and vLLM report it. Empty for a run made before its requests
    were recorded (schema 4)."""
    import numpy as np

    groups: dict[tuple, dict] = {}
    for row in requests:
        item = groups.setdefault(
            (row["position"], row["engine"]),
            {"engine": row["engine"], "settings": row["settings"], "ttft": [], "gaps": []},
        )
        item["ttft"].append(row["ttft_ms"])
        item["gaps"].extend(row["gaps"])
    out = []
    for _, item in sorted(groups.items()):
        ttft, gaps = item.pop("ttft"), item.pop("gaps")
        item["requests"], item["gaps"] = len(ttft), len(gaps)
        for q in PERCENTILES:
            item[f"ttft_p{q}_ms"] = float(np.percentile(ttft, q))
            item[f"itl_p{q}_ms"] = float(np.percentile(gaps, q)) if gaps else None
        out.append(item)
    return out


def goodput(
    requests: Sequence[dict], ttft_ms: float | None = None, itl_ms: float | None = None
) -> list[dict]:
    """Output tokens/s of the requests that met the latency targets, per configuration and
    engine of a run (its requests: `RunsDB.requests`; aiperf's and vLLM's goodput): a request is
    good when its TTFT <= `ttft_ms` and its mean inter-token latency (its own (e2e - TTFT) /
    (tokens - 1)) <= `itl_ms` (None: no target). Per measurement, the total output counting only
    the good requests' tokens (sweep.output_tps: over the slowest request's end-to-end time); then
    mean, std and samples over the repetitions, and the share of requests that were good. Empty
    for runs made before schema 4."""
    from .sweep import output_tps

    measurements: dict[int, list[dict]] = {}
    for row in requests:
        measurements.setdefault(row["measurement_id"], []).append(row)
    groups: dict[tuple, dict] = {}
    for rows in measurements.values():
        first = rows[0]
        item = groups.setdefault(
            (first["position"], first["engine"]),
            {"engine": first["engine"], "settings": first["settings"], "tps": [], "good": 0},
        )
        good = [meets(r, ttft_ms, itl_ms) for r in rows]
        tokens = [r["tokens"] if ok else 0 for r, ok in zip(rows, good, strict=True)]
        item["tps"].append(output_tps(tokens, [r["e2e_ms"] for r in rows]))
        item["good"] += sum(good)
        item["requests"] = item.get("requests", 0) + len(rows)
    out = []
    for _, item in sorted(groups.items()):
        samples, good = item.pop("tps"), item.pop("good")
        item["goodput_tps"] = summary(samples)
        item["good_share"] = good / item["requests"]
        out.append(item)
    return out


def meets(request: dict, ttft_ms: float | None, itl_ms: float | None) -> bool:
    """Whether one request (ttft_ms, e2e_ms, tokens) met the latency targets (None: none)."""
    if ttft_ms is not None and request["ttft_ms"] > ttft_ms:
        return False
    if itl_ms is not None and request["tokens"] > 1:
        mean_gap = (request["e2e_ms"] - request["ttft_ms"]) / (request["tokens"] - 1)
        if mean_gap > itl_ms:
            return False
    return True


def position_latencies(times_ms: Sequence[float]) -> list[float]:
    """Each token's latency from its arrival times (ms from the request's start): the first
    token's is its time, each later one's the gap since the token before."""
    if not times_ms:
        return []
    return [times_ms[0], *(b - a for a, b in zip(times_ms, times_ms[1:], strict=False))]


def position_table(items: Sequence[dict], buckets: int = 8) -> str:
    """Latency by position as a markdown table: the first token, then the median gap over
    `buckets` equal stretches of the generation (e.g. tokens 1-16, 17-32, ...)."""
    columns = setting_columns(swept_axes(items))
    longest = max((len(i["p50_ms"]) for i in items), default=0)
    size = max(1, -(-(longest - 1) // buckets))
    spans = [(a, min(a + size, longest)) for a in range(1, longest, size)]
    header = ["engine", *columns, "first (ms)", *(f"{a}-{b - 1}" for a, b in spans)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in items:
        p50 = item["p50_ms"]
        cells = [item["engine"], *(show(item["settings"]) for show in columns.values())]
        cells.append(f"{p50[0]:.1f}")
        for a, b in spans:
            cells.append(f"{statistics.median(p50[a:b]):.1f}" if p50[a:b] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def positions_csv(items: Sequence[dict]) -> str:
    """Latency by position, one row per configuration, engine and token position."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["engine", *AXES, "token", "p50_ms", "p90_ms"])
    for item in items:
        for k, (p50, p90) in enumerate(zip(item["p50_ms"], item["p90_ms"], strict=True)):
            writer.writerow([item["engine"], *(item["settings"][a] for a in AXES), k, p50, p90])
    return out.getvalue()


def compare(db: RunsDB, run_a: int, run_b: int, metric: str = "decode_tps") -> list[dict]:
    """The configurations two runs share (same engine and settings): each run's mean of `metric`
    and B / A, with an interval when both have the same number of repetitions. Runs of different
    engines (in process, `mlxinfer serve`, a target server) compare their own engines where the
    settings are the same: `engine` is then "A's engine → B's engine"."""
    from .sweep import engine_names

    def main(run_id: int) -> str:  # the engine a run measures (its baseline is beside it)
        run = db.run(run_id)
        return engine_names(run["baseline"], run["target"])[0]

    a = {(i["engine"], json.dumps(i["settings"], sort_keys=True)): i for i in summarize(db, run_a)}
    main_a, main_b = main(run_a), main(run_b)
    out = []
    for item in summarize(db, run_b):
        settings = json.dumps(item["settings"], sort_keys=True)
        key, engine = (item["engine"], settings), item["engine"]
        if key not in a and item["engine"] == main_b and main_a != main_b:
            key, engine = (main_a, settings), f"{main_a} → {main_b}"
        if key not in a or not item[metric] or not a[key][metric]:
            continue
        sa, sb = a[key][metric]["samples"], item[metric]["samples"]
        if a[key][metric]["mean"] <= 0:  # nothing to divide by (a metric that is 0 here)
            continue
        positive = all(v > 0 for v in sa + sb)
        ratio = paired_ratio(sb, sa) if len(sa) == len(sb) and positive else None
        out.append(
            {
                "engine": engine,
                "settings": item["settings"],
                "a": a[key][metric]["mean"],
                "b": item[metric]["mean"],
                "ratio": item[metric]["mean"] / a[key][metric]["mean"],
                "interval": ratio,
                "n": (len(sa), len(sb)),
            }
        )
    return out
