"""The Engine over a group of ranks (a model split by parallel.py): rank 0 owns the queue, and every
rank runs the same steps.

Each turn of the engine's loop starts with rank 0 telling the other ranks what its callers did since
the last turn: requests submitted (prompt ids, sampling parameters with a seed fixed by rank 0,
max_tokens), requests cancelled, the engine closing. Every rank applies the same messages to its
own scheduler, so every rank makes the same plan, runs the same forward passes (whose all_sums and
sends then pair up) and samples the same tokens from the same logits and seeds:

    rank 0:   callers' messages --> all_sum(header) [+ all_sum(payload)] --> apply --> step
    rank r:                         all_sum(zeros)  [+ all_sum(zeros)  ] --> apply --> step

A turn costs one all_sum of a 5-int header, and one of the messages' bytes (JSON) when there are
any. In a pipeline, the turns between the chunks of one prompt's prefill exchange nothing (every
rank knows it is mid-prompt from its own scheduler), so that a stage can start the next chunk
while the next stage computes this one; messages that arrive meanwhile wait for the last chunk. The header also carries a digest of the tokens rank 0 sampled in the previous step: a rank
whose own tokens differ stops with an error naming the step, instead of going on out of step
(its collectives would then pair with the wrong ones).

MLX's ring backend waits for data by polling, a core kept busy. While the engine has nothing to do,
rank 0 sends headers further and further apart (2 ms, doubling up to IDLE_WAIT_MAX_S), each saying
when the next comes, and the other ranks sleep until then: an idle group costs about 20 all_sums a
second, and a request that arrives while it is idle starts at most IDLE_WAIT_MAX_S later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Iterable

import mlx.core as mx
import numpy as np

from .parallel import CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S, unseeded_seed
from .request import Request
from .responses import GenerationResponse
from .sampling import SamplingParams

IDLE_WAIT_MIN_S = 0.002
IDLE_WAIT_MAX_S = 0.05
STALL_TIMEOUT_ENV = CONNECT_TIMEOUT_ENV  # one setting: how long ranks wait for each other
FIRST_TURN_ALLOWANCE = 10  # x the timeout, for the first turn (ranks finish loading apart)
# payload bytes, digest of the last step's tokens, step number, µs to the next header, and the
# payload's CRC-32: a rank lost while the payload is summed can leave the others holding part of
# it (MLX's ring fails its pending transfers without raising), which must not be read as messages
_HEADER = 5


class RankLink:
    """One rank's end of the engine's plan sharing over `group` (rank 0 sends, the others receive)."""

    def __init__(self, group: mx.distributed.Group, pipeline: bool = False):
        self.group = group
        self.pipeline = pipeline  # the model is split in stages (else by tensors)
        self.rank = group.rank()
        self.size = group.size()
        self.steps = 0  # steps taken: the header's step number, checked by the other ranks
        self.turns = 0  # headers exchanged
        self.digest = 0  # this rank's tokens in its last step
        self.requests: dict[int, Request] = {}  # on the other ranks: those not yet finished
        self.wait_s = 0.0  # rank 0: how long the last header said the next one would take
        self.idle_turns = 0  # rank 0: turns in a row with nothing to do

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- rank 0 ----------------------------------------------------------------------------------

    def send(self, messages: list[tuple], idle: bool) -> None:
        """Rank 0: share this turn's messages (submit, cancel, close). `idle` (nothing to run and
        no messages) makes the next header come later (`wait_s`), which this one tells the other
        ranks. A submitted request's sampling gets a seed here if it had none, the same on every
        rank."""
        self.idle_turns = self.idle_turns + 1 if idle else 0
        self.wait_s = (
            min(IDLE_WAIT_MAX_S, IDLE_WAIT_MIN_S * 2 ** min(self.idle_turns - 1, 10)) if idle else 0
        )
        encoded: list[list] = []
        for kind, arg in messages:
            if kind == "submit":
                drew = arg.params.seed is None
                if drew:
                    arg.params = dataclasses.replace(arg.params, seed=unseeded_seed())
                encoded.append(["submit", {**_request_to_json(arg), "drew_seed": drew}])
            elif kind == "cancel":
                encoded.append(["cancel", arg.id])
            elif kind == "close":
                encoded.append(["close", bool(arg)])
        payload = json.dumps(encoded).encode() if encoded else b""
        header = [len(payload), self.digest, self.steps, round(self.wait_s * 1e6), _crc(payload)]
        self._all_sum(np.array(header, dtype=np.int32))
        self.turns += 1
        if payload:
            self._all_sum(np.frombuffer(payload, dtype=np.uint8))

    # -- the other ranks -------------------------------------------------------------------------

    def receive(self) -> tuple[list[tuple], float]:
        """The other ranks: rank 0's messages for this turn, as the Engine's worker takes them
        (("submit", Request), ("cancel", Request), ("close", cancel)), and the seconds to sleep
        before the next turn (nothing runs until then)."""
        header = self._all_sum(np.zeros(_HEADER, dtype=np.int32))
        nbytes, digest, step, wait_us, crc = (int(x) for x in header)
        self.turns += 1
        if step != self.steps:
            raise RuntimeError(
                f"rank {self.rank} of {self.size}: rank 0 has taken {step} steps and this rank "
                f"{self.steps}; the ranks are out of step"
            )
        if digest != self.digest:
            raise RuntimeError(
                f"rank {self.rank} of {self.size}: in step {step} this rank sampled other tokens "
                "than rank 0; the ranks are out of step (did they load the same weights, kernels "
                "and compute policy?)"
            )
        messages: list[tuple] = []
        if nbytes:
            payload = self._all_sum(np.zeros(nbytes, dtype=np.uint8)).tobytes()
            if _crc(payload) != crc:
                raise RuntimeError(
                    f"rank {self.rank} of {self.size}: rank 0's messages of turn {self.turns} "
                    "arrived damaged; the connection to a peer was lost or broke"
                )
            for kind, arg in json.loads(payload):
                if kind == "submit":
                    request = _request_from_json(arg)
                    if arg["drew_seed"]:  # rank 0 drew it from the shared sequence: this rank
                        unseeded_seed()  # draws too, so later unseeded draws stay the same
                    self.requests[request.id] = request
                    messages.append(("submit", request))
                elif kind == "cancel":
                    if arg in self.requests:  # (not if it finished meanwhile, on rank 0 too)
                        messages.append(("cancel", self.requests[arg]))
                elif kind == "close":
                    messages.append(("close", arg))
        return messages, wait_us / 1e6

    # -- every rank ------------------------------------------------------------------------------

    def stepped(self, events: Iterable[tuple[Request, GenerationResponse]]) -> None:
        """After a step: remember a digest of the tokens it sampled (rank 0 sends its digest in
        the next header)."""
        tokens = [x for request, response in events for x in (request.id, response.token)]
        self.steps += 1
        self.digest = _crc(np.array(tokens, dtype=np.int64).tobytes())

    def forget(self, events: Iterable[tuple[Request, GenerationResponse]]) -> None:
        """Requests that ended (in a step or cancelled) can no longer be cancelled."""
        for request, response in events:
            if response.finish_reason is not None:
                self.requests.pop(request.id, None)

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        # every rank but 0 adds zeros: everyone gets rank 0's values, exactly (integers)
        if not self.leader:
            values = np.zeros_like(values)
        out = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        return np.array(out)


def stall_timeout() -> float:
    """Seconds an engine's turn or step may wait for the other ranks before the engine gives up
    on them ($MLXINFER_PARALLEL_TIMEOUT, else 60; the first turn gets FIRST_TURN_ALLOWANCE times
    that)."""
    raw = os.environ.get(STALL_TIMEOUT_ENV) or str(CONNECT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"${STALL_TIMEOUT_ENV} must be a number of seconds above 0, got {raw!r}")
    return value


def wait_for_leader(idle_s: float) -> None:
    """The other ranks, told nothing runs: sleep until rank 0's next header (see the docstring)."""
    if idle_s > 0:
        time.sleep(idle_s)


def _request_to_json(request: Request) -> dict:
    params = dataclasses.asdict(request.params)
    params["logit_bias"] = [[int(k), float(v)] for k, v in request.params.logit_bias.items()]
    params["stop"] = list(request.params.stop)
    return {
        "id": request.id,
        "prompt_ids": [int(t) for t in request.prompt_ids],
        "max_tokens": request.max_tokens,
        "params": params,
    }


def _request_from_json(data: dict) -> Request:
    params = dict(data["params"])
    params["logit_bias"] = {int(k): float(v) for k, v in params["logit_bias"]}
    return Request(
        int(data["id"]),
        [int(t) for t in data["prompt_ids"]],
        SamplingParams(**params),
        int(data["max_tokens"]),
    )


def _crc(payload: bytes) -> int:
    """CRC-32 of `payload` as a signed 32-bit int (what an int32 header holds): the payload's
    check, and the digest of a step's tokens."""
    return int(np.array(zlib.crc32(payload), dtype=np.uint32).view(np.int32))
