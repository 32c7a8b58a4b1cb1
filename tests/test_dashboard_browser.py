"""The dashboard in a real browser: Chromium (Debian's, no browser download) driven by Playwright
against `mlxinfer dashboard` on localhost with the default model. Ask the chat a question and see
the answer stream in with its metrics; run a two-configuration sweep and see its charts drawn
with the run's numbers; compare two runs on Results. Screenshots are kept as test artifacts
(test-artifacts/, or MLXINFER_TEST_ARTIFACTS)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .reference import make_tiny_checkpoint
from .test_bench_command import two_runs_of_a_small_grid

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MLXINFER_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = (
    os.environ.get("MLXINFER_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
    or shutil.which("google-chrome")
    or next(
        (
            p
            for p in (
                "/Applications/Chromium.app/Contents/MacOS/Chromium",
                "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
            )
            if Path(p).is_file()
        ),
        "/usr/bin/chromium",
    )
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlxinfer dashboard` on a database holding two runs of the same small grid (made with
    `mlxinfer bench` on a tiny checkpoint), the default model preselected."""
    tmp = tmp_path_factory.mktemp("dashboard")
    db, tiny = tmp / "runs.sqlite", tmp / "tiny"
    make_tiny_checkpoint(tiny, "llama")
    two_runs_of_a_small_grid(str(tiny), db)
    with dashboard_server([sys.executable, "-m", "mlxinfer"], db, tmp) as url:
        yield url, db


@contextlib.contextmanager
def dashboard_server(mlxinfer: list, db: Path, logs: Path, **popen):
    """`mlxinfer dashboard` (the command as `mlxinfer` gives it) on a free port with database
    `db`, its output in logs/server.log: its URL once it answers its health check, stopped after.
    A dashboard that does not start fails the test with its log."""
    port = free_port()
    log = open(logs / "server.log", "w")  # noqa: SIM115  (open while the server runs)
    process = subprocess.Popen(
        [*mlxinfer, "dashboard", "--port", str(port), "--db", str(db)],
        stdout=log,
        stderr=subprocess.STDOUT,
        **popen,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the dashboard did not start:\n" + (logs / "server.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: apt-get install -y chromium (the README's test "
            "command does), or set MLXINFER_CHROMIUM to a Chromium or Chrome"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


LOCAL = ("127.0.0.1", "localhost")


@pytest.fixture
def page(browser):
    """A page of the dashboard that must work offline: after each test, no request has left the
    machine (a page icon fetched from a font CDN did)."""
    from urllib.parse import urlparse

    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    page.set_default_timeout(WAIT_MS)
    outside: list[str] = []

    def check(request) -> None:
        url = urlparse(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in LOCAL:
            outside.append(request.url)

    page.on("request", check)
    yield page
    page.close()
    assert outside == [], f"requests left the machine: {outside[:5]}"


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1000)  # charts finish drawing
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def bars(page, chart: int) -> list[str]:
    """The aria labels of a chart's bars (Vega's SVG names each bar with its data)."""
    selector = f"[data-testid=stVegaLiteChart] >> nth={chart}"
    page.locator(selector).locator("[aria-roledescription=bar]").first.wait_for()
    return (
        page.locator(selector)
        .locator("[aria-roledescription=bar]")
        .evaluate_all("marks => marks.map(m => m.getAttribute('aria-label'))")
    )


def test_the_chat_answers_with_its_metrics(server, page):
    url, _ = server
    page.goto(url)
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill("What is the capital of France?")
    box.press("Enter")
    reply = page.get_by_test_id("stChatMessage").nth(1)
    reply.get_by_text("Paris").first.wait_for()
    for label in ("TTFT", "Decode", "Peak memory", "KV cache"):
        reply.get_by_text(label, exact=True).wait_for()
    ttft = reply.get_by_test_id("stMetricValue").first.inner_text()
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", ttft) and float(ttft.split()[0]) > 0
    reply.locator("[data-testid=stVegaLiteChart] [aria-roledescription='line mark']").wait_for(
        state="attached"
    )  # the inter-token latency chart
    screenshot(page, "chat")
    # a reload (a new Streamlit session) finds the conversation again: it is in the URL
    assert "chat=" in page.url
    page.reload()
    messages = page.get_by_test_id("stChatMessage")
    messages.nth(1).get_by_text("Paris").first.wait_for()
    assert messages.count() == 2
    assert "What is the capital of France?" in messages.nth(0).inner_text()
    page.get_by_role("button", name="New conversation").click()  # and it can start over
    page.wait_for_function("() => !document.querySelector('[data-testid=stChatMessage]')")


def test_a_reply_stopped_midway_says_so_at_once(server, page):
    """Stop under a streaming reply: the reply stays as far as it got and says "stopped" with
    its token count right away (it said so only after the next message was sent)."""
    url, _ = server
    page.goto(url)
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill("Write a long story about a dragon who learns to sing, with many chapters.")
    box.press("Enter")
    reply = page.get_by_test_id("stChatMessage").nth(1)
    reply.get_by_text(re.compile(r"\w+ \w+ \w+")).first.wait_for()  # streaming
    reply.get_by_role("button", name="Stop").click()
    summary = reply.get_by_text(re.compile(r"\d+ tokens? · stopped · "))
    summary.wait_for(timeout=30_000)
    tokens = int(summary.inner_text().split()[0])
    assert 0 < tokens < 256  # cut before max tokens
    assert page.get_by_test_id("stChatMessage").count() == 2
    # gone with the same rerun that wrote the summary (the browser may draw the two apart)
    reply.get_by_role("button", name="Stop").wait_for(state="detached", timeout=10_000)


def test_a_sweep_runs_and_its_charts_draw_the_measurements(server, page):
    from mlxinfer.bench import report
    from mlxinfer.bench.db import RunsDB

    url, db = server
    run_id = len(RunsDB(db).runs()) + 1  # the run this sweep will make
    page.goto(f"{url}/sweep")
    for label, value in (("temperature", "0,0.8"), ("prompt tokens", "16"), ("gen tokens", "8")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        page.wait_for_timeout(500)
    page.get_by_test_id("stMetricValue").first.filter(has_text="2").wait_for()  # 2 configurations
    page.get_by_role("button", name="Run the sweep").click()
    page.get_by_text(f"Run {run_id}: done").wait_for()
    page.wait_for_timeout(3000)  # the page's last refresh after the run ends
    assert RunsDB(db).run(run_id)["command"].startswith("mlxinfer bench")
    labels = bars(page, 0)  # decode speed, one bar per configuration
    assert len(labels) == 2
    drawn = sorted(float(re.search(r"mean \(tokens/s\): ([\d.]+)", x).group(1)) for x in labels)
    means = sorted(i["decode_tps"]["mean"] for i in report.summarize(RunsDB(db), run_id))
    assert drawn == pytest.approx(means, abs=0.06)  # the labels round to one decimal
    first = page.locator("[data-testid=stVegaLiteChart]").first
    assert "tokens/s" in first.locator("[aria-roledescription=axis]").nth(1).get_attribute(
        "aria-label"
    )
    assert first.locator("text", has_text="decode speed by sampling").count() == 1  # its title
    assert len(bars(page, 1)) == 2 and len(bars(page, 2)) == 2  # total output, TTFT
    screenshot(page, "sweep")


def test_results_compare_two_runs(server, page):
    url, _ = server
    page.goto(f"{url}/results")
    page.get_by_text("Pick one run").wait_for()
    page.get_by_text(re.compile(r"Showing the newest run, \d+")).wait_for()  # not a blank page
    picker = page.get_by_test_id("stMultiSelect").filter(has_text="…or by id")
    for run in ("1", "2"):
        picker.locator("input").click()
        page.get_by_role("option", name=run, exact=True).click()
        page.keyboard.press("Escape")
    page.get_by_text("Run 2 against run 1").wait_for()
    points = page.locator("[data-testid=stVegaLiteChart] [aria-roledescription=point]")
    points.first.wait_for()
    for _ in range(100):  # the newest run's charts, shown before the pick, go as the page reruns
        if points.count() == 4:
            break
        page.wait_for_timeout(100)
    assert points.count() == 4  # two configurations, each in both runs
    screenshot(page, "results")


def test_inside_the_model_walks_to_paris(server, page):
    """The default model's trace of "The capital of France is": its tokens, the step-by-step
    walk ending on ' Paris' (77% here; the runner-up is ' the' at 6%), and the attention map."""
    url, _ = server
    page.goto(f"{url}/inside")
    page.get_by_text("The tokenizer cuts the prompt into 5 tokens").wait_for()
    page.get_by_role("tab", name="Step by step").click()
    page.get_by_text("greedy takes the largest: ' Paris'").wait_for()
    page.get_by_role("tab", name="Attention").click()
    cells = page.locator("[data-testid=stVegaLiteChart] g.mark-rect path[aria-label^='attends to']")
    cells.first.wait_for()
    assert cells.count() == 15  # the causal half of 5 x 5
    first = cells.first.get_attribute("aria-label")
    assert "token (query): 0:'The'" in first and "weight: 1" in first  # token 0 sees only itself
    screenshot(page, "inside")


def test_the_metrics_page(server, page):
    url, _ = server
    page.goto(f"{url}/metrics")
    page.get_by_text("How a sweep measures").wait_for()
    from mlxinfer.metrics import DEFINITIONS

    for d in DEFINITIONS:  # every definition, whole (a grid showed 10 rows and cut long cells)
        page.get_by_text(d.meaning, exact=True).wait_for(timeout=5000)
    screenshot(page, "metrics")
