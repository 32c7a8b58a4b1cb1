"""A request's state, from submission to its last response, with an explicit status:

    WAITING --admitted--> PREFILLING --first token--> RUNNING (a batch row) --> FINISHED
       |                      |                                                  ^
       +----------------------+---------- cancelled, failed, or done at its first token

The scheduler (scheduler.py) moves a request between statuses; the runner (runner.py) fills in
what running it needs (caches, sampler, prefill progress).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .responses import TextStream
from .sampling import Sampler, SamplingParams
from .steps import PrefillProgress


class Status(enum.Enum):
    WAITING = "waiting"  # submitted, not admitted yet
    PREFILLING = "prefilling"  # admitted: its prompt goes through the model, a chunk at a time
    RUNNING = "running"  # owns a batch row; one token per decode step
    FINISHED = "finished"  # its last response (with a finish reason) has been produced


@dataclass(eq=False)  # identity: `in`, .index() and .remove() find this request, not an equal one
class Request:
    """Built on the caller's thread (no MLX work); the scheduler's thread does the rest."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    status: Status = Status.WAITING
    # set once prefilling starts (Runner.start)
    cache: list | None = None  # single-sequence caches while prefilling
    prefilled: int = 0  # prompt tokens in the cache
    cached_prompt_tokens: int = 0  # of those, reused from the prefix cache
    progress: PrefillProgress | None = None  # (done, total) after each prefill chunk but the last
    sampler: Sampler | None = None
    stream: TextStream | None = None  # detokenizing, stop strings, EOS, the token budget
    last_token: int = -1
    proposer: object | None = None  # speculative decoding's (speculative.Proposer), if asked
    draft_tokens: int = 0  # tokens it proposed
    accepted_draft_tokens: int = 0  # of those, accepted by the model
    # by position in a pass (0: the first proposal): how often it was reached (every proposal
    # before it accepted) and how often it was then accepted
    draft_reached: list[int] = field(default_factory=list)
    draft_accepted_at: list[int] = field(default_factory=list)
    spec_accepted: float = 0.0  # its decayed record of accepted proposals (speculative.py)
    spec_rejected: float = 0.0  # and of passes a rejection ended
    peak_memory: int = 0
    kv_bytes: int = 0

    @property
    def started(self) -> bool:
        """Whether its prefill has begun (caches made, prefix cache consulted, sampler built)."""
        return self.sampler is not None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
