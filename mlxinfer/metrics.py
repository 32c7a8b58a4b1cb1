"""Per-request metrics, computed by pure functions from timestamps (seconds, any monotonic clock).

Definitions (BENCHMARKS.md, Protocol; the README repeats them):

    ttft_ms        request start (prompt tokens in hand) -> first generated token on the host
    queue_ms       request start -> admitted to run (the Engine; 0 for a lone request)
    prefill_tps    prompt tokens processed (not counting cached ones) / (TTFT - queue)
    cached_prompt_tokens  prompt tokens taken from the prefix cache instead of computed
    decode_tps     (N - 1) / (t_N - t_1), t_i = time token i is available, N generated tokens
    tpot_ms        (e2e - TTFT) / (N - 1)          (vLLM's time per output token)
    itl_ms         gaps t_{i+1} - t_i, with p50 / p90 / p99
    e2e_ms         request start -> last token
    bandwidth_gbs  weight bytes read per decode step * decode_tps  (gpt-fast's "bandwidth achieved")
    draft_tokens, accepted_draft_tokens, acceptance_rate
                   speculative decoding: tokens proposed, how many the model accepted, and
                   accepted / proposed
    acceptance_by_position
                   for j = 1, 2, ...: accepted / reached of a pass's j-th proposal (reached:
                   every proposal before it accepted)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Definition:
    """What a metric means, for people: the dashboard's Metrics page and chart tooltips."""

    name: str
    label: str  # an axis title, with its unit
    formula: str
    meaning: str
    elsewhere: str  # what other tools call it, and how their definition differs


DEFINITIONS = (
    Definition(
        "ttft_ms",
        "time to first token (ms)",
        "request start → first generated token available on the host",
        "How long a user waits before anything appears: queueing, the prompt's prefill, and the "
        "first decode step. Under the Engine the clock starts at submit, so waiting for a free "
        "row counts.",
        "vLLM: TTFT (same). mlx-lm reports no TTFT; its prompt_tps is prompt tokens / TTFT.",
    ),
    Definition(
        "queue_ms",
        "queueing (ms)",
        "request start → admitted to run",
        "Time a request waited for a free row or KV budget under the Engine; 0 for a lone one.",
        "vLLM: queued time (same idea).",
    ),
    Definition(
        "prefill_tps",
        "prefill speed (tokens/s)",
        "prompt tokens processed (not counting cached ones) / (TTFT − queue_ms)",
        "How fast the prompt is read. Prefill is compute-bound: matrix–matrix products over all "
        "prompt tokens at once.",
        "mlx-lm: prompt_tps (prompt tokens / TTFT, queueing included). llama-bench: pp t/s.",
    ),
    Definition(
        "decode_tps",
        "decode speed (tokens/s)",
        "(N − 1) / (t_N − t_1), t_i = time token i is available, N generated tokens",
        "How fast tokens stream once the first has arrived. Decode is memory-bound: every step "
        "reads all the weights for one token per sequence.",
        "mlx-lm: generation_tps counts N tokens over N − 1 intervals (slightly higher on short "
        "runs). llama-bench: tg t/s. vLLM: output throughput (all requests together).",
    ),
    Definition(
        "tpot_ms",
        "time per output token (ms)",
        "(e2e − TTFT) / (N − 1)",
        "The mean gap between tokens after the first one.",
        "vLLM: TPOT (same). LLMPerf calls this ITL.",
    ),
    Definition(
        "itl_ms",
        "inter-token latency (ms)",
        "the gaps t_{i+1} − t_i; p50 / p90 / p99",
        "Every gap between two tokens, so stalls show: the p99 is the worst gap a reader sees.",
        "vLLM: ITL (same). LLMPerf's ITL is vLLM's TPOT.",
    ),
    Definition(
        "e2e_ms",
        "end to end (ms)",
        "request start → last token",
        "The whole request, as a caller waiting for the full answer sees it.",
        "vLLM: E2EL (same).",
    ),
    Definition(
        "output_tps",
        "total output (tokens/s)",
        "every generated token of a measurement's concurrent requests / (submit → the last one's "
        "last token)",
        "What the machine delivers to all users together: the number that concurrency raises "
        "while each request's own decode speed falls. A sweep's measurement only (not a "
        "request's); with one request it is N / e2e.",
        "vLLM bench: output token throughput (same). guidellm: output tokens/s.",
    ),
    Definition(
        "peak_memory_mb",
        "peak memory (MB)",
        "mx.get_peak_memory() after the request, mx.reset_peak_memory() before it",
        "The most memory MLX held during the request: weights, KV cache and temporaries. Under "
        "the Engine it is the engine's peak during the steps the request was in.",
        "mlx-lm: peak_memory never resets, so it is the process's maximum so far.",
    ),
    Definition(
        "predicted_memory_mb",
        "predicted memory (MB)",
        "weight bytes + KV cache bytes as the caches allocate them (from the architecture)",
        "What a configuration should need, before it runs; the gap to the measured peak is "
        "temporaries.",
        "No other tool predicts it.",
    ),
    Definition(
        "active_memory_mb",
        "active memory (MB)",
        "mx.get_active_memory() at the request's end",
        "Memory MLX holds once the request is done (the weights, and caches still alive).",
        "mlx-lm: not reported.",
    ),
    Definition(
        "kv_cache_mb",
        "KV cache (MB)",
        "bytes of the cache slots holding the request's tokens",
        "The keys and values kept for every layer so each new token attends to the past without "
        "recomputing it; grows with the context unless bounded (rotating) or quantized.",
        "llama.cpp reports the cache it allocates for the whole context.",
    ),
    Definition(
        "acceptance_rate",
        "acceptance rate",
        "proposed tokens the model accepted / tokens proposed (speculative decoding)",
        "How often the cheap guesses of speculative decoding were the model's own tokens: each "
        "accepted one is a token without a step of its own. In a sweep, over all the "
        "measurement's requests; none without speculation.",
        "vLLM: spec decode acceptance rate (same). llama.cpp: draft acceptance rate.",
    ),
    Definition(
        "bandwidth_gbs",
        "bandwidth (GB/s)",
        "weight bytes read per decode step × decode_tps",
        "How close decoding runs to the memory's speed (the roofline of a memory-bound step).",
        "gpt-fast: bandwidth achieved (same).",
    ),
)


@dataclass
class RequestMetrics:
    prompt_tokens: int
    generated_tokens: int
    ttft_ms: float
    prefill_tps: float
    decode_tps: float
    tpot_ms: float
    e2e_ms: float
    itl_ms: list[float] = field(default_factory=list)
    itl_p50_ms: float = 0.0
    itl_p90_ms: float = 0.0
    itl_p99_ms: float = 0.0
    peak_memory_mb: float = 0.0
    active_memory_mb: float = 0.0
    kv_cache_mb: float = 0.0
    bandwidth_gbs: float = 0.0
    queue_ms: float = 0.0
    cached_prompt_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens proposed
    accepted_draft_tokens: int = 0  # of those, accepted by the model
    acceptance_rate: float = 0.0  # accepted / proposed (0 when none proposed)
    # the chance the j-th proposal of a pass was accepted once reached (every one before it
    # accepted), j = 1, 2, ...: how far ahead proposing pays
    acceptance_by_position: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def inter_token_latencies_ms(token_times: list[float]) -> list[float]:
    """Gaps between consecutive token arrival times, in ms."""
    return [(b - a) * 1e3 for a, b in zip(token_times[:-1], token_times[1:], strict=True)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default); 0.0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


def decode_tps(token_times: list[float]) -> float:
    """(N - 1) / (t_N - t_1); 0.0 with fewer than two tokens."""
    if len(token_times) < 2 or token_times[-1] <= token_times[0]:
        return 0.0
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def request_metrics(
    start: float,
    token_times: list[float],
    prompt_tokens: int,
    cached_prompt_tokens: int = 0,
    weight_bytes_per_step: int = 0,
    peak_memory_bytes: int = 0,
    active_memory_bytes: int = 0,
    kv_cache_bytes: int = 0,
    queue_s: float = 0.0,
    draft_tokens: int = 0,
    accepted_draft_tokens: int = 0,
    draft_positions: tuple[list[int], list[int]] = ([], []),
) -> RequestMetrics:
    """All metrics of one request from its start time and the arrival time of each token."""
    n = len(token_times)
    ttft = token_times[0] - start if n else 0.0
    e2e = token_times[-1] - start if n else 0.0
    itl = inter_token_latencies_ms(token_times)
    tps = decode_tps(token_times)
    processed = prompt_tokens - cached_prompt_tokens
    return RequestMetrics(
        prompt_tokens=prompt_tokens,
        generated_tokens=n,
        ttft_ms=ttft * 1e3,
        prefill_tps=processed / (ttft - queue_s) if ttft > queue_s else 0.0,
        decode_tps=tps,
        tpot_ms=(e2e - ttft) / (n - 1) * 1e3 if n > 1 else 0.0,
        e2e_ms=e2e * 1e3,
        itl_ms=itl,
        itl_p50_ms=percentile(itl, 50),
        itl_p90_ms=percentile(itl, 90),
        itl_p99_ms=percentile(itl, 99),
        peak_memory_mb=peak_memory_bytes / 2**20,
        active_memory_mb=active_memory_bytes / 2**20,
        kv_cache_mb=kv_cache_bytes / 2**20,
        bandwidth_gbs=weight_bytes_per_step * tps / 1e9,
        queue_ms=queue_s * 1e3,
        cached_prompt_tokens=cached_prompt_tokens,
        draft_tokens=draft_tokens,
        accepted_draft_tokens=accepted_draft_tokens,
        acceptance_rate=accepted_draft_tokens / draft_tokens if draft_tokens else 0.0,
        acceptance_by_position=[a / r for r, a in zip(*draft_positions, strict=True) if r],
    )
