"""Speculative decoding in the core: n-gram proposals, how many tokens a request may propose, and
the counters vLLM exports (docs/speculative-decoding.md).

A request that speculates sends its last token and up to k proposed tokens in one pass; the
target computes all of them, the worker keeps the longest prefix of proposals that equals what
the target samples at each position, plus the target's own next token, so a pass accepts 1 to
k + 1 tokens. The proposals come from the request's own tokens (``ngram``: the continuation of
the latest earlier occurrence of its last n tokens) or from a draft model that the worker runs
beside the target (``draft_model``), which hands its proposals back with the pass's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_PAUSE = 32  # steps a request that keeps missing goes without proposals at most


class NgramIndex:
    """One request's token history indexed by n-gram: for each n in [low, high], where the latest
    earlier occurrence of each n-gram ends. Built incrementally as tokens come."""

    def __init__(self, low: int, high: int) -> None:
        self.sizes = range(high, low - 1, -1)  # the longest match wins
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending before this position are in ``ends``

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens following the latest earlier occurrence of the longest suffix of
        ``tokens`` (of ``low`` to ``high`` tokens) found earlier in ``tokens``; [] when none is."""
        length = len(tokens)
        if length < self.indexed:  # the history was cut (never expected): start over
            self.ends = {n: {} for n in self.sizes}
            self.indexed = 0
        # An n-gram ending at e (exclusive) is followed by tokens[e]: index every e < length.
        for end in range(max(self.indexed, 1), length):
            for n in self.sizes:
                if end >= n:
                    self.ends[n][tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, length)
        for n in self.sizes:
            if length >= n:
                end = self.ends[n].get(tuple(tokens[length - n :]))
                if end is not None:
                    return tokens[end : end + k]
        return []


@dataclass
class DraftLimit:
    """How many tokens a request proposes next: all k while its proposals are taken, fewer after
    misses, none for a while after misses in a row (so that a request whose text does not repeat
    stops paying for verification)."""

    limit: int  # proposals allowed next time
    pause: int = 0  # passes left with no proposal
    misses: int = 0  # proposals in a row of which nothing was accepted

    def allowed(self) -> int:
        if self.pause:
            self.pause -= 1
            return 0
        return self.limit

    def update(self, proposed: int, accepted: int, k: int) -> None:
        if accepted:
            self.misses = 0
            self.limit = k if accepted == proposed else max(1, accepted + 1)
            return
        self.misses += 1
        self.limit = max(1, self.limit // 2)
        if self.misses >= 2:
            self.pause = min(MAX_PAUSE, 2**self.misses)


@dataclass
class SpecCounters:
    """Cumulative counts, as vLLM's ``spec_decode_*`` counters name them."""

    num_drafts: int = 0  # passes in which a request verified proposals
    num_draft_tokens: int = 0  # tokens proposed and verified
    num_accepted_tokens: int = 0  # of those, tokens accepted
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted at position 0, 1, ... of a proposal

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < proposed:
            self.accepted_per_pos.extend([0] * (proposed - len(self.accepted_per_pos)))
        for position in range(accepted):
            self.accepted_per_pos[position] += 1
