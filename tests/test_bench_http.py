"""`mlxinfer bench` over HTTP: the client's clock against a server whose timing is known (a
scripted SSE server written here), what it sends, how a server's refusals and early stops read;
then real sweeps: `--target` at a real `mlxinfer serve`, and `--baseline mlx-lm-server` (both
servers started by the sweep, on the default model)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlxinfer.bench import command
from mlxinfer.bench.db import RunsDB
from mlxinfer.bench.grid import DEFAULTS, parse_axes
from mlxinfer.bench.http import HttpError, Target, normalized_url
from mlxinfer.bench.servers import free_port
from mlxinfer.bench.sweep import Sweep, http_body


class Scripted(ThreadingHTTPServer):
    """A server that streams completions on a schedule: the first event after `first_s`, then
    one every `gap_s`, each carrying `per_event` tokens, `events` of them; the usage last. It
    keeps every request's headers and body."""

    daemon_threads = True

    def __init__(
        self, first_s=0.2, gap_s=0.05, events=6, per_event=1, finish="length", status=200, drop=0
    ):
        self.first_s, self.gap_s, self.events, self.per_event = first_s, gap_s, events, per_event
        self.finish, self.status = finish, status
        self.drop = drop  # connections closed at once, without a reply (a full listen queue)
        self.seen: list[tuple[dict, dict]] = []
        super().__init__(("127.0.0.1", free_port()), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "no such route"}})

    def do_POST(self) -> None:
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if s.drop > 0:
            s.drop -= 1
            self.close_connection = True
            return
        s.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
        if s.status != 200:
            self._json(s.status, {"error": {"message": "temperature: must be >= 0", "code": 400}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()

        def send(event) -> None:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

        self.wfile.write(b": keep-alive\n\n")
        time.sleep(s.first_s)
        for i in range(s.events):
            if i:
                time.sleep(s.gap_s)
            last = i == s.events - 1
            choice = {"index": 0, "text": " w" * s.per_event, "finish_reason": None}
            if last:
                choice["finish_reason"] = s.finish
            send({"choices": [choice]})
        usage = {"prompt_tokens": 40, "completion_tokens": s.events * s.per_event}
        usage["prompt_tokens_details"] = {"cached_tokens": 8}
        send({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def scripted(request):
    server = Scripted(**getattr(request, "param", {}))
    yield server
    server.shutdown()
    server.server_close()


# -- the client ------------------------------------------------------------------------------


def test_the_client_clock_reads_a_known_schedule(scripted):
    """First event after 200 ms, then every 50 ms: TTFT >= 200 ms (and not far above), gaps
    around 50 ms, decode speed ~20 tok/s; the token counts and cached tokens are the usage's."""
    (r,) = Target(scripted.url).wave([{"prompt": "x", "max_tokens": 6}])
    m = r.metrics()
    assert 200 <= m["ttft_ms"] < 450
    assert len(m["itl_ms"]) == 5 and all(45 <= g < 200 for g in m["itl_ms"])
    assert 5 / (0.05 * 5 + 0.6) < m["decode_tps"] <= 5 / (0.05 * 5) * 1.05
    assert m["generated_tokens"] == 6 and m["prompt_tokens"] == 40
    assert m["cached_prompt_tokens"] == 8
    assert m["prefill_tps"] == pytest.approx(32 / (m["ttft_ms"] / 1e3))
    assert m["peak_memory_mb"] is None and m["kv_cache_mb"] is None  # a client cannot see them
    assert r.finish_reason == "length" and r.text == " w" * 6


@pytest.mark.parametrize("scripted", [{"per_event": 3, "events": 4}], indirect=True)
def test_a_server_sending_several_tokens_per_event_is_counted_by_tokens(scripted):
    """4 events of 3 tokens at 50 ms: 12 tokens, 3 gaps; decode speed divides 11 tokens by the
    time from the first event to the last (~150 ms), not 3."""
    (r,) = Target(scripted.url).wave([{"prompt": "x"}])
    m = r.metrics()
    assert m["generated_tokens"] == 12 and len(m["itl_ms"]) == 3
    span = (r.times[-1] - r.times[0]) or 1e-9
    assert m["decode_tps"] == pytest.approx(11 / span)
    assert m["decode_tps"] > 40


def test_requests_name_the_servers_model_and_stream_with_usage_and_the_key(scripted):
    Target(scripted.url + "/v1/", api_key="sk-test").wave([{"prompt": "a"}, {"prompt": "b"}])
    assert len(scripted.seen) == 2
    for headers, body in scripted.seen:
        assert headers["authorization"] == "Bearer sk-test"
        assert body["model"] == "scripted" and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    assert sorted(b["prompt"] for _, b in scripted.seen) == ["a", "b"]


@pytest.mark.parametrize("scripted", [{"status": 400}], indirect=True)
def test_a_refusal_is_raised_with_its_status_and_message(scripted):
    with pytest.raises(HttpError, match=r"/v1/completions: HTTP 400: temperature: must be >= 0"):
        Target(scripted.url).wave([{"prompt": "a"}])


@pytest.mark.parametrize("scripted", [{"drop": 3}], indirect=True)
def test_a_connection_reset_before_any_reply_is_tried_again_and_timed_from_the_first(scripted):
    """mlx_lm.server (Python's http.server, a listen queue of 5) resets some of 16 connections
    made at once: they are tried again, and the wait counts in their TTFT."""
    (r,) = Target(scripted.url).wave([{"prompt": "x"}])
    assert r.completion_tokens == 6 and scripted.drop == 0
    assert r.metrics()["ttft_ms"] >= 200 + (50 + 100 + 150)  # the retries' waits, then 200 ms


def test_a_server_that_is_not_there_is_named():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HttpError, match=re.escape(url) + r"/v1/models: cannot connect"):
        Target(url).complete({"prompt": "a"})


def test_urls_are_normalized_or_refused():
    assert normalized_url("http://h:1/v1/") == "http://h:1"
    assert normalized_url(" https://h/api/v1 ") == "https://h/api"
    for bad in ("ftp://h", "h:8080", "http://", ""):
        with pytest.raises(ValueError, match="not an http"):
            normalized_url(bad)


def test_a_requests_body_carries_the_configurations_sampling_and_exact_length():
    config = dict(DEFAULTS) | {"gen_tokens": 32}
    body = http_body(config, "text", seed=7)
    assert body == {"prompt": "text", "max_tokens": 32, "temperature": 0.0, "ignore_eos": True}
    sampled = http_body(config | {"temperature": 0.7, "top_k": 40, "min_p": 0.05}, "t", 7, [2, 0])
    assert sampled["seed"] == 7 and sampled["top_k"] == 40 and sampled["min_p"] == 0.05
    assert "top_p" not in sampled and "repetition_penalty" not in sampled  # at their defaults
    assert "ignore_eos" not in sampled  # mlx_lm.server has no such field: EOS is banned instead
    assert sampled["logit_bias"] == {"2": -100.0, "0": -100.0}
    # speculative decoding: our server's request fields (its draft model: `mlxinfer serve
    # --draft-model`, which the sweep starts it with)
    lookup = http_body(config | {"spec": "prompt-lookup:3"}, "t", 7)
    assert lookup["prompt_lookup"] is True and lookup["num_draft"] == 3 and "draft" not in lookup
    draft = http_body(config | {"spec": "draft:/models/small:2"}, "t", 7)
    assert draft["draft"] is True and draft["num_draft"] == 2 and "prompt_lookup" not in draft


def test_our_server_is_started_with_the_configurations_draft_model():
    """spec "draft:PATH" starts `mlxinfer serve --draft-model=PATH` ("default": the default
    model's path, which the flag needs); without one, no flag."""
    from mlxinfer.bench.servers import serve_command
    from mlxinfer.loading import default_model_path

    config = dict(DEFAULTS)
    plain, ranks = serve_command("default", config)
    assert ranks == 1 and not any(a.startswith("--draft-model") for a in plain)
    command, _ = serve_command("/m/big", config | {"spec": "draft:-odd/small:3"})
    assert command[command.index("--model") + 1] == "/m/big"
    assert "--draft-model=-odd/small" in command  # (one argument: not read as a flag)
    command, _ = serve_command("default", config | {"spec": "draft:default"})
    assert f"--draft-model={default_model_path()}" in command


# -- sweeps against a scripted server ---------------------------------------------------------


def _sweep(db, url, reps=2, **axes):
    raw = {"prompt_tokens": "16", "gen_tokens": "6", **axes}
    return Sweep(parse_axes(raw), reps=reps, db=db, target=url)


def test_a_sweep_of_a_target_records_every_request_under_its_url(tmp_path, scripted):
    db = RunsDB(tmp_path / "runs.sqlite")
    sweep = _sweep(db, scripted.url + "/v1", concurrency="1,3")
    kinds = [e.kind for e in sweep.run()]
    assert kinds.count("measured") == 4 and "failed" not in kinds
    assert db.run(sweep.run_id)["target"] == scripted.url
    rows = db.measurements(sweep.run_id)
    assert {r["engine"] for r in rows} == {scripted.url}
    assert all(r["peak_memory_mb"] is None and r["predicted_memory_mb"] is None for r in rows)
    requests = db.requests(sweep.run_id)
    assert [r["settings"]["concurrency"] for r in requests] == [1, 1, 3, 3, 3, 3, 3, 3]
    assert all(r["tokens"] == 6 and len(r["gaps"]) == 5 for r in requests)
    # warm-ups (one per configuration) and repetitions: every prompt sent is a new one
    prompts = [b["prompt"] for _, b in scripted.seen]
    assert len(prompts) == (1 + 2) * (1 + 3) and len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("scripted", [{"finish": "stop"}], indirect=True)
def test_a_server_that_stops_early_fails_the_measurement_saying_why(tmp_path, scripted):
    db = RunsDB(tmp_path / "runs.sqlite")
    events = list(_sweep(db, scripted.url, reps=1, gen_tokens="8").run())
    (failed,) = [e for e in events if e.kind == "failed"]
    assert "ended after 6 of 8 tokens (finish_reason 'stop')" in failed.error
    assert "ignore_eos" in failed.error


def test_a_target_sweep_refuses_what_only_the_server_sets(tmp_path, scripted):
    db = RunsDB(tmp_path / "runs.sqlite")
    with pytest.raises(ValueError, match="axis 'kv': q8 cannot be set on a --target"):
        _sweep(db, scripted.url, kv="full,q8")
    with pytest.raises(ValueError, match="axis 'compute'"):
        _sweep(db, scripted.url, compute="native")
    with pytest.raises(ValueError, match="'spec': prompt-lookup cannot be measured on a --target"):
        _sweep(db, scripted.url, spec="none,prompt-lookup")
    with pytest.raises(ValueError, match="mlx-lm runs in process"):
        Sweep(parse_axes({}), reps=1, db=db, target=scripted.url, baseline="mlx-lm")
    assert db.runs() == []  # refused before a run was started


def test_the_command_line_kept_hides_the_api_key():
    argv = ["--target", "http://h", "--api-key", "sk-1", "--reps", "2", "--api-key=sk-2"]
    kept = command._without_secrets(argv)
    assert "sk-1" not in " ".join(kept) and "sk-2" not in " ".join(kept)
    assert kept[:4] == ["--target", "http://h", "--api-key", "***"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target", "localhost:8080"], "--target: 'localhost:8080' is not an http"),
        (["--target", "http://h", "--baseline", "mlx-lm"], "beside a --target use mlx-lm-server"),
        (["--resume", "1", "--target", "http://h"], "--resume continues a run with its own"),
    ],
)
def test_bad_target_flags_exit_2_naming_them(tmp_path, flags, message):
    done = subprocess.run(
        [sys.executable, "-m", "mlxinfer", "bench", "--db", str(tmp_path / "r.sqlite"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


# -- real servers ------------------------------------------------------------------------------


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    (value,) = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def test_bench_target_measures_a_real_mlxinfer_serve_without_prefix_cache_hits(tmp_path):
    """`mlxinfer bench --target` at `mlxinfer serve` (its prefix cache on): every request measured
    with exactly its tokens, and the server says no prompt token came from its cache (each wave
    sends new text), and generated exactly what the database holds."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlxinfer", "serve", "--port", str(port), "--api-key", "k"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not Target(url).ready():
            assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.25)
        db_path = tmp_path / "runs.sqlite"
        flags = ["--target", url, "--api-key", "k", "--concurrency", "1,2", "--reps", "2"]
        flags += ["--prompt-tokens", "24", "--gen-tokens", "8", "--db", str(db_path)]
        done = subprocess.run(
            [sys.executable, "-m", "mlxinfer", "bench", *flags],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert url in done.stdout  # the table names the engine by its URL
        db = RunsDB(db_path)
        (run,) = db.runs()
        assert run["target"] == url and "--api-key ***" in run["command"]
        assert all(m["status"] == "ok" for m in db.measurements(run["id"]))
        requests = db.requests(run["id"])
        assert len(requests) == 2 * 1 + 2 * 2 and all(r["tokens"] == 8 for r in requests)
        assert _metric(url, "mlxinfer_cached_prompt_tokens_total") == 0
        generated = _metric(url, "mlxinfer_generation_tokens_total")
        assert generated == 8 * (1 + 2) * 3  # warm-ups and repetitions of both configurations
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture
def started_servers(monkeypatch) -> list:
    """The ServerProcesses a test's sweep starts, in order."""
    from mlxinfer.bench import servers

    started = []
    real_init = servers.ServerProcess.__init__

    def init(self, *args, **kwargs):
        started.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(servers.ServerProcess, "__init__", init)
    return started


def test_baseline_mlx_lm_server_alternates_two_real_servers(tmp_path, started_servers):
    """`--baseline mlx-lm-server`: the sweep starts `mlxinfer serve` and `mlx_lm.server` on the
    same weights, measures both, alternating, and reports the speed ratios; both servers have
    exited once the run ends."""
    from mlxinfer.bench import report

    started = started_servers
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes({"prompt_tokens": "16", "gen_tokens": "8", "concurrency": "2"})
    sweep = Sweep(axes, reps=2, db=db, baseline="mlx-lm-server")
    events = list(sweep.run())
    measured = [e.engine for e in events if e.kind == "measured"]
    assert measured == ["mlxinfer-server", "mlx-lm-server"] * 2, events
    (theirs, ours) = report.summarize(db, sweep.run_id)
    assert (ours["engine"], theirs["engine"]) == ("mlxinfer-server", "mlx-lm-server")
    assert ours["vs_mlx_lm"]["decode_tps"]["ratio"] > 0
    assert ours["vs_mlx_lm"]["output_tps"]["ratio"] > 0
    assert len(db.requests(sweep.run_id)) == 2 * 2 * 2
    assert [s.name for s in started] == ["mlxinfer serve", "mlx_lm.server"]
    assert all(s.process.poll() is not None for s in started)


def test_a_parallel_configuration_is_measured_on_ranks_started_for_it(tmp_path, started_servers):
    """`parallel: none,tensor:2`: the unsplit configuration in process, the split one through
    `mlxinfer serve --parallel tensor` started as two ranks on loopback (both gone afterwards);
    the run's machine facts name the group and its backend."""
    started = started_servers
    db = RunsDB(tmp_path / "runs.sqlite")
    axes = parse_axes({"prompt_tokens": "16", "gen_tokens": "8", "parallel": "none,tensor"})
    sweep = Sweep(axes, reps=1, db=db)
    events = list(sweep.run())
    assert [e.kind for e in events if e.kind in ("measured", "failed")] == ["measured"] * 2, [
        e.error for e in events
    ]
    measurements = db.measurements(sweep.run_id)
    assert [m["settings"]["parallel"] for m in measurements] == ["none", "tensor:2"]
    assert all(m["status"] == "ok" and m["decode_tps"] > 0 for m in measurements)
    assert len(started) == 1 and len(started[0].processes) == 2
    assert all(p.poll() is not None for p in started[0].processes)
    facts = db.machine(db.runs()[0]["machine_id"])
    assert facts["distributed"] == {"backend": "ring", "hosts": "127.0.0.1", "groups": ["tensor:2"]}


def test_runs_of_different_engines_compare_where_their_settings_match(tmp_path):
    """A run in process and a run of a server (same settings) compare their own engines:
    "mlxinfer → URL", B / A of the means, paired by repetition; settings that differ do not."""
    from mlxinfer.bench import report
    from mlxinfer.bench.grid import config_key
    from mlxinfer.bench.machine import machine_facts

    db = RunsDB(tmp_path / "runs.sqlite")
    url = "http://127.0.0.1:9"
    settings = dict(DEFAULTS)
    other = dict(DEFAULTS) | {"prompt_tokens": 64}
    in_process = db.start_run("a", machine_facts(), reps=2)
    served = db.start_run("b", machine_facts(), reps=2, target=url)
    for run, engine, speeds in (
        (in_process, "mlxinfer", (20.0, 22.0)),
        (served, url, (19.0, 20.9)),
    ):
        ids = db.add_configurations(run, [(config_key(c), c) for c in (settings, other)])
        for rep, speed in enumerate(speeds):
            db.record(ids[0], engine, rep, {"decode_tps": speed})
        if run == served:  # the other settings only in the served run: nothing to pair
            db.record(ids[1], engine, 0, {"decode_tps": 5.0})
    (row,) = report.compare(db, in_process, served)
    assert row["engine"] == f"mlxinfer → {url}"
    assert row["ratio"] == pytest.approx((19.0 + 20.9) / (20.0 + 22.0))
    assert row["interval"] is not None
