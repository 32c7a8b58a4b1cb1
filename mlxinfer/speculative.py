"""Speculative decoding: propose a few tokens cheaply, check them all in one pass of the model.

Decoding reads every weight once per token, so a pass over a row's last token and k proposed
ones costs little more than a step, and each proposal the model agrees with is a token for free:

    history --Proposer.propose--> d_1..d_k      (prompt lookup: what followed the context's
                                                 latest n-gram where it appeared before)
    [last, d_1..d_k] --one forward pass--> logits at each of the k + 1 positions
    verify: accept d_1..d_m, then one token of the model's own at position m  (m + 1 tokens)

`verify` keeps the output distribution exactly that of plain sampling. A greedy row accepts the
longest prefix equal to the model's argmax (after the penalties); a sampled row accepts d_i with
probability p_i(d_i), p_i being the whole sampling chain's distribution (penalties as if d_1..d_i-1
had been generated, top-k, top-p, min-p, temperature), and on a rejection draws from p_i without
d_i, renormalised: rejection sampling with a proposal q that puts all its mass on d_i, for which
min(1, p/q) is p(d_i) and the residual max(0, p - q) is p without d_i. If every proposal is
accepted the pass's last position gives one more token.

The runner (runner.py) runs the pass for every batch row at once, rows without proposals included
(their one token is an ordinary decode step), and rolls the caches back to the accepted tokens
(batch_cache.py: a row's offset advances by m + 1; rings hold RING_SLACK extra slots so the pass
never overwrites a key its queries still see).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import mlx.core as mx
import numpy as np

from .batch_cache import RING_SLACK
from .sampling import Sampler, filter_candidates, invalid_logits

PROPOSERS = ("prompt-lookup",)
MAX_DRAFT = RING_SLACK  # proposals a row may check in one pass


class Proposer(Protocol):
    """Proposes up to `k` tokens to follow `history` (a request's prompt and its tokens so far,
    the last one not yet through the model). Fewer, or none, when it has nothing to say."""

    def propose(self, history: Sequence[int], k: int) -> list[int]: ...


class PromptLookup:
    """Prompt lookup (n-gram) proposals: the longest suffix of the history, of `max_ngram` tokens
    down to `min_ngram`, found earlier in the history (its latest occurrence) proposes the k
    tokens that followed it there. No second model: it shines where the reply copies its prompt
    (editing, summarising, code, retrieval answers), and proposes nothing elsewhere."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        tokens = np.asarray(history, dtype=np.int64)
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            # every earlier window of n tokens that a continuation follows: starts 0..L-n-1
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: L - 1], n)
            hits = np.flatnonzero((windows == tokens[L - n :]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # what followed the latest occurrence
                return [int(t) for t in tokens[start : start + k]]
        return []


def make_proposer(name: str, max_ngram: int) -> Proposer:
    if name == "prompt-lookup":
        return PromptLookup(max_ngram, min(2, max_ngram))
    raise ValueError(f"speculation must be one of {PROPOSERS}, got {name!r}")


# Each row decides alone how many proposals to check, from its own record (never from the batch
# or the clock: a seeded request must draw the same tokens alone and batched): the j-th proposal
# is checked when its chance of being reached and accepted, alpha ** j, is at least WORTH. The
# record decays each step, so a row that stopped proposing probes again (alpha drifts to 1/2).
DECAY = 0.9


def worth() -> float:
    """The least chance of acceptance a proposal is checked for. On a CPU a pass costs nearly in
    proportion to the tokens it checks (bench_speculative.py: a batch of 8 checking 6 proposals
    a row ran at 0.47x of plain decoding with a quarter of them accepted), so a proposal must
    more likely than not be accepted; on a GPU a pass costs about one step (not measured here:
    a guess, to revisit with a device)."""
    return 0.5 if mx.default_device() == mx.cpu else 0.2


def acceptance(accepted: float, rejected: float) -> float:
    """A row's estimated chance that a proposal is accepted, given the one before it was: its
    decayed count of accepted proposals and of passes ended by a rejection, with a prior of one
    of each."""
    return (accepted + 1.0) / (accepted + rejected + 2.0)


def draft_length(num_draft: int, accepted: float, rejected: float, least: float) -> int:
    """Proposals worth checking: the largest j <= num_draft with alpha ** j >= least."""
    alpha = acceptance(accepted, rejected)
    k = 0
    while k < num_draft and alpha ** (k + 1) >= least:
        k += 1
    return k


@dataclass
class Verdict:
    """One row's verify pass, lazy on the device until `tokens` reads it: the model's tokens at
    each position (`picked`, `[k + 1]`: its argmax for a greedy row; for a sampled row the draw
    from the residual at positions 0..k-1 and from p_k at position k), which proposals it accepts
    (`accepted`, `[k]` bool), and whether each position's distribution was invalid (NaN/inf)."""

    proposals: list[int]
    picked: mx.array
    accepted: mx.array
    invalid: mx.array

    def arrays(self) -> list[mx.array]:
        return [self.picked, self.accepted, self.invalid]

    def tokens(self) -> tuple[list[int], bool]:
        """(the row's tokens: accepted proposals, then the model's own; whether a distribution
        they came from was invalid). Waits for the pass."""
        accepted = cast(list[bool], self.accepted.tolist())
        m = next((i for i, ok in enumerate(accepted) if not ok), len(self.proposals))
        picked = cast(list[int], self.picked.tolist())
        invalid = any(cast(list[bool], self.invalid.tolist())[: m + 1])
        return [*self.proposals[:m], int(picked[m])], invalid


def verify(sampler: Sampler, logits: mx.array, proposals: list[int]) -> Verdict:
    """The verify step of one row: `logits` `[k + 1, V]` at the row's last token and its k
    `proposals`. Draws from the sampler's random key (one split a pass) but records nothing: the
    caller records the tokens it keeps (`Sampler.record`)."""
    k = len(proposals)
    processed = sampler.process_ahead(logits[: k + 1], proposals)  # [k + 1, V]
    d = mx.array(proposals + [0], dtype=mx.int32)  # (position k proposes nothing)
    if sampler.params.greedy:
        picked = mx.argmax(processed, axis=-1)
        accepted = picked[:k] == d[:k].astype(picked.dtype)
        return Verdict(proposals, picked, accepted, invalid_logits(processed))
    sampler.key, step_key = mx.random.split(sampler.key)
    uniform_key, residual_key = mx.random.split(step_key)
    filtered, ids = filter_candidates(processed, sampler.params)  # [k + 1, n] (ids or vocab)
    if ids is None:
        is_proposal = mx.arange(filtered.shape[-1])[None, :] == d[:, None]
    else:
        is_proposal = ids == d[:, None]
    probs = mx.softmax(filtered, axis=-1, precise=True)
    p_proposal = mx.where(is_proposal, probs, 0.0).sum(axis=-1)  # p_i(d_i)
    accepted = (mx.random.uniform(shape=(k + 1,), key=uniform_key) < p_proposal)[:k]
    # the residual: p_i without d_i (position k keeps p_k: its proposal index is masked off)
    residual = mx.where(is_proposal & (mx.arange(k + 1) < k)[:, None], -mx.inf, filtered)
    noise = mx.random.gumbel(residual.shape, key=residual_key)
    picked = mx.argmax(residual + noise, axis=-1)  # an index among the candidates
    if ids is not None:
        picked = mx.take_along_axis(ids, picked[:, None], axis=-1)[:, 0]
    return Verdict(proposals, picked, accepted, invalid_logits(filtered))
