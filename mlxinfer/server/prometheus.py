"""GET /metrics: the server's measurements in Prometheus' text format (version 0.0.4), for a
Prometheus scrape or a Grafana board: counters of requests and tokens, histograms of TTFT,
inter-token latency, end-to-end time and queue time, and gauges read from the engine when
scraped (requests running and waiting, the prefix cache's size and hits)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

from ..metrics import RequestMetrics

PREFIX = "mlxinfer"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus defines a histogram."""

    def __init__(self, name: str, help_: str, buckets: Sequence[float] = LATENCY_BUCKETS_S):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """What the server has served since it started. Updated from the event loop and read at each
    scrape; one lock keeps a scrape from seeing half an update."""

    def __init__(self, gauges: Callable[[], dict[str, float]] = dict):
        self.lock = threading.Lock()
        self.gauges = gauges  # name -> value, read at each scrape (the engine's stats)
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.tokens = {
            "prompt": 0,
            "generation": 0,
            "cached_prompt": 0,
            "draft": 0,  # speculative decoding: proposed
            "accepted_draft": 0,  # of those, accepted
        }
        self.cancelled_requests = 0  # choices cancelled because their client went away
        self.histograms = {
            "ttft": Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token."),
            "itl": Histogram(
                f"{PREFIX}_inter_token_latency_seconds", "Each gap between two generated tokens."
            ),
            "e2e": Histogram(
                f"{PREFIX}_e2e_request_latency_seconds", "From arrival to the last token."
            ),
            "queue": Histogram(
                f"{PREFIX}_request_queue_time_seconds", "Waiting before the prefill started."
            ),
        }

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def cancelled(self) -> None:
        with self.lock:
            self.cancelled_requests += 1

    def finished(self, metrics: RequestMetrics | None, prompt_tokens: int, generated: int) -> None:
        """One choice's end: its tokens and latencies."""
        with self.lock:
            self.tokens["prompt"] += prompt_tokens
            self.tokens["generation"] += generated
            if metrics is None:
                return
            self.tokens["cached_prompt"] += metrics.cached_prompt_tokens
            self.tokens["draft"] += metrics.draft_tokens
            self.tokens["accepted_draft"] += metrics.accepted_draft_tokens
            if generated:
                self.histograms["ttft"].observe(metrics.ttft_ms / 1e3)
                self.histograms["e2e"].observe(metrics.e2e_ms / 1e3)
            self.histograms["queue"].observe(metrics.queue_ms / 1e3)
            for gap in metrics.itl_ms:
                self.histograms["itl"].observe(gap / 1e3)

    def render(self) -> str:
        """The text a scrape reads."""
        with self.lock:
            lines = [
                f"# HELP {PREFIX}_requests_total Requests answered, by endpoint and status.",
                f"# TYPE {PREFIX}_requests_total counter",
            ]
            lines += [
                f'{PREFIX}_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            for kind, n in self.tokens.items():
                name = f"{PREFIX}_{kind}_tokens_total"
                lines += [
                    f"# HELP {name} {kind.replace('_', ' ').capitalize()} tokens.",
                    f"# TYPE {name} counter",
                    f"{name} {n}",
                ]
            name = f"{PREFIX}_requests_cancelled_total"
            lines += [
                f"# HELP {name} Requests cancelled because their client went away.",
                f"# TYPE {name} counter",
                f"{name} {self.cancelled_requests}",
            ]
            for histogram in self.histograms.values():
                lines += histogram.render()
        for name, value in self.gauges().items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE {PREFIX}_{name} {kind}", f"{PREFIX}_{name} {value}"]
        return "\n".join(lines) + "\n"
