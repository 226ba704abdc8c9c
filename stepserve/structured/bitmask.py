"""Constrained decoding in the engine core: one llguidance matcher per constrained request, and
the per-step token bitmask applied to that request's logits before sampling.

Matchers follow the scheduler's truth instead of keeping their own history: at the start of a
pass each one is synced to the request's accepted output tokens (rolled back past tokens the
core discarded, fed tokens it has not seen, rebuilt when it was dropped). That one rule covers
preemption (the worker drops the matcher; it is rebuilt from the outputs), a failed pass that is
retried, and multi-step lookahead tokens discarded after a stop. Within a multi-step pass, the
constrained rows' tokens come to the host after each step (one small sync) so the next mask is
right; unconstrained requests in the batch pay nothing, and the pass keeps its N steps.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence

import torch

from stepserve.core.outputs import ScheduledRequest, SchedulerOutput

CACHE_SIZE = 512  # distinct grammars whose pristine matcher is kept for copying
# llguidance's parallel executor pays off for many rows on a machine with cores to spare; on a
# small CPU its spinning worker threads took the cores from PyTorch's (a tiny model's decode step
# went from 59 ms to 250 ms with 8 constrained rows on 2 cores), so masks are filled in this thread.
PARALLEL_ROWS = 16
PARALLEL_MIN_CPUS = 8


class RequestMatcher:
    """A request's matcher and the output tokens it has seen. With a gate token (``after``), the
    matcher starts after the first output token equal to it and the row is free until then."""

    def __init__(self, matcher, after: int | None = None) -> None:
        self.matcher = matcher
        self.after = after
        self.seen: list[int] = []  # every output token, the gate's and those before it included
        self.start: int | None = 0 if after is None else None  # index in seen where the grammar starts

    @property
    def open(self) -> bool:
        return self.start is not None

    def sync(self, outputs: Sequence[int], fresh) -> None:
        """Make the matcher's history equal ``outputs``, the tokens the core accepted."""
        common = 0
        limit = min(len(self.seen), len(outputs))
        while common < limit and self.seen[common] == outputs[common]:
            common += 1
        if self.start is not None and common < self.start:  # the gate itself was discarded
            self.matcher, self.start = fresh(), (0 if self.after is None else None)
        elif self.start is not None:
            extra = len(self.seen) - common
            if extra and (self.matcher.is_error() or self.matcher.rollback(extra) is False or self.matcher.is_error()):
                self.matcher = fresh()  # cannot roll back: rebuild from the gate
                for token in self.seen[self.start : common]:
                    self.matcher.consume_token(token)
        del self.seen[common:]
        for token in outputs[common:]:
            self.accept(token)

    def accept(self, token: int) -> None:
        self.seen.append(token)
        if self.start is None:
            if token == self.after:
                self.start = len(self.seen)
            return
        self.matcher.consume_token(token)  # a refused token leaves the matcher in error: rebuilt or ended


class GrammarMatchers:
    """The worker's constrained-decoding state: matchers by request id, compiled grammars by text."""

    def __init__(
        self,
        start_ll_tokenizer: Callable[[], Callable[[], object]],
        vocab_size: int,
        eos_token_ids: Collection[int],
        device: torch.device,
    ) -> None:
        # Starts building llguidance's tokenizer in a thread and returns the wait for it (the core
        # process loads its own tokenizer for it). Started by ``start_tokenizer`` when the engine
        # is first idle, or by the first constrained request, which then waits for it: a thread
        # building it beside the loading or the first passes holds the GIL against them.
        self._start_ll_tokenizer = start_ll_tokenizer
        self._ll_wait: Callable[[], object] | None = None
        self._ll_lock = threading.Lock()
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self._executor = None
        self._byte_bias: torch.Tensor | None = None
        self._eos_words: torch.Tensor | None = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._matchers: dict[str, RequestMatcher] = {}

    def start_tokenizer(self) -> None:
        """Start building llguidance's tokenizer in the background, once."""
        with self._ll_lock:
            if self._ll_wait is None:
                self._ll_wait = self._start_ll_tokenizer()

    def ll_tokenizer(self) -> object:
        """llguidance's tokenizer, waiting for its build (started now if it was not)."""
        self.start_tokenizer()
        return self._ll_wait()

    def byte_bias(self) -> torch.Tensor:
        """The bit-to-bias table on the logits' device (built once)."""
        if self._byte_bias is None:
            self._byte_bias = _byte_bias(self.device)
        return self._byte_bias

    def eos_words(self) -> torch.Tensor:
        """The bitmask row [1, words] that allows only EOS, on the logits' device."""
        if self._eos_words is None:
            self._eos_words = _words(self.eos_token_ids, (self.vocab_size + 31) // 32)[None].to(self.device)
        return self._eos_words

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget finished or preempted requests (a preempted one is rebuilt when it returns)."""
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def start_pass(self, sched: SchedulerOutput) -> GrammarPass | None:
        """The pass's constrained rows with synced matchers; None when no row is constrained."""
        rows = [i for i, r in enumerate(sched.requests) if r.params.structured is not None and r.sample]
        if not rows:
            return None
        matchers = [self._synced(sched.requests[i]) for i in rows]
        steps = [sched.requests[i].num_steps for i in rows]
        return GrammarPass(self, rows, matchers, steps)

    def _synced(self, r: ScheduledRequest) -> RequestMatcher:
        grammar = r.params.structured.grammar
        entry = self._matchers.get(r.request_id)
        if entry is None:
            entry = self._matchers[r.request_id] = RequestMatcher(self._fresh(grammar), r.params.structured.after)
        entry.sync(r.token_ids[r.num_prompt_tokens :], lambda: self._fresh(grammar))
        return entry

    def _fresh(self, grammar: str):
        """A new matcher at the start of ``grammar``: a copy of the cached compiled one."""
        import llguidance

        pristine = self._compiled.get(grammar)
        if pristine is None:
            pristine = self._compiled[grammar] = llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar)
        return pristine.deep_copy()

    def fill(self, matchers: Sequence[RequestMatcher]) -> torch.Tensor:
        """Host int32 bitmask [R, ceil(V/32)]: bit t of row r set when token t is allowed."""
        import llguidance

        words = (self.vocab_size + 31) // 32
        mask = torch.zeros(len(matchers), words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        # Matchers in error state allow nothing: their row falls back to EOS (see GrammarPass.mask).
        # A row whose gate has not come yet (a reasoning model still thinking) allows everything.
        for row, m in enumerate(matchers):
            if not m.open:
                mask[row] = -1
        live = [(m.matcher, row) for row, m in enumerate(matchers) if _live(m)]
        if len(live) >= PARALLEL_ROWS and (os.cpu_count() or 1) > PARALLEL_MIN_CPUS:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), words * 4, len(matchers))
            return mask
        for matcher, row in live:  # in this thread: see PARALLEL_MIN_CPUS
            matcher.unsafe_compute_mask_ptr(mask[row].data_ptr(), words * 4)
        return mask

    def fill_drafts(self, matchers: Sequence[RequestMatcher], drafts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Host int32 bitmask of a verify pass, [sum(1 + len(d)), words]: for each matcher, the
        mask after its accepted tokens, then after each of its proposals in turn. A proposal the
        grammar refuses is refused by the mask before it, so the rows after it allow everything
        (they are never used). The matchers keep the proposals they took; the next pass's sync
        rolls them back to what was accepted."""
        words = (self.vocab_size + 31) // 32
        mask = torch.full(
            (sum(1 + len(d) for d in drafts), words), -1, dtype=torch.int32, pin_memory=self.device.type == "cuda"
        )
        row = 0
        for m, proposed in zip(matchers, drafts):
            for j in range(len(proposed) + 1):
                if _live(m):
                    mask[row + j] = 0
                    m.matcher.unsafe_compute_mask_ptr(mask[row + j].data_ptr(), words * 4)
                elif m.open:
                    mask[row + j] = 0  # an error state allows nothing: the row may only end
                if j == len(proposed) or (m.open and m.matcher.validate_tokens([proposed[j]]) != 1):
                    break
                m.accept(proposed[j])
            row += len(proposed) + 1
        return mask


def _live(m: RequestMatcher) -> bool:
    return m.open and not m.matcher.is_error()


def _byte_bias(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: entry [b, k] is 0 where bit k of byte b is set (token allowed), else -inf.

    A row of bitmask words read as bytes (little-endian: byte j of word w holds tokens 32w + 8j
    .. 32w + 8j + 7) indexes this table into an additive bias over the vocabulary. Adding a bias
    costs one pass over the logits; unpacking bits to booleans and ``masked_fill`` cost several,
    and were measured about 100x slower on the CPU (docs/structured-output.md)."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf")).to(device)


def _words(token_ids: Iterable[int], words: int) -> torch.Tensor:
    """An int32 bitmask row [words] allowing exactly ``token_ids``."""
    row = [0] * words
    for t in token_ids:
        row[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in row], dtype=torch.int32)


class GrammarPass:
    """Constrained rows of one pass: masks their logits each step, advances their matchers."""

    def __init__(
        self, owner: GrammarMatchers, rows: list[int], matchers: list[RequestMatcher], steps: list[int]
    ) -> None:
        self.owner = owner
        self.matchers = matchers
        self.steps = steps  # tokens each row may still accept this pass
        self.row_list = rows
        self.rows = torch.tensor(rows, dtype=torch.long).to(owner.device)
        self._table = owner.byte_bias()
        self._eos_only = owner.eos_words()

    def mask(self, logits: torch.Tensor, raw_logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every token the grammar forbids at -inf on the constrained rows.

        If a row's processors (min_tokens masking EOS) left it no allowed token, the grammar
        wins: that row is masked from its raw logits instead. A row whose matcher allows nothing
        (an error state; never expected) may only end, with EOS.
        """
        return self._apply(self.owner.fill(self.matchers), self.rows, logits, raw_logits)

    def mask_drafts(
        self, logits: torch.Tensor, raw_logits: torch.Tensor, drafts: Sequence[Sequence[int]], first: Sequence[int]
    ) -> torch.Tensor:
        """``mask`` for a verify pass: ``logits`` [M, V] hold each row's positions from ``first[row]``
        on, and position j of a constrained row takes the grammar's mask after its first j proposals."""
        picked = [drafts[i] for i in self.row_list]
        rows = [first[i] + j for i, d in zip(self.row_list, picked) for j in range(len(d) + 1)]
        index = torch.tensor(rows, dtype=torch.long).to(self.owner.device)
        return self._apply(self.owner.fill_drafts(self.matchers, picked), index, logits, raw_logits)

    def _apply(self, host_bits: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor, raw_logits: torch.Tensor):
        bits = host_bits.to(logits.device, non_blocking=True)
        bits = torch.where((bits == 0).all(dim=1, keepdim=True), self._eos_only, bits)
        bias = self._table.index_select(0, bits.view(torch.uint8).flatten().long())
        bias = bias.view(bits.shape[0], -1)[:, : logits.shape[1]].to(logits.dtype)
        masked = logits.index_select(0, rows) + bias
        starved = masked.amax(dim=1, keepdim=True) == float("-inf")
        masked = torch.where(starved, raw_logits.index_select(0, rows) + bias, masked)
        return logits.index_copy(0, rows, masked)

    def accept(self, tokens: torch.Tensor, step: int) -> None:
        """Feed step ``step``'s tokens to the matchers (one host sync of the constrained rows)."""
        for matcher, token, steps in zip(self.matchers, tokens.index_select(0, self.rows).tolist(), self.steps):
            if step < steps:
                matcher.accept(token)
