"""Continuous batching with chunked prefill, preemption by recompute and multi-step decode.

One pass: running requests first (in admission order), then waiting ones while the token
budget, ``max_num_seqs`` and free blocks allow. A pass in which every request decodes runs
``num_scheduler_steps`` steps; any prompt chunk makes it a single step. When requests wait and
could be admitted, the pass is shortened to one step so their prefill is not held back.

Asynchronous scheduling: ``assume`` takes a pass that is still running as if every token it
may sample were accepted (placeholders), so the next pass is scheduled before its results are
back; ``update`` undoes the assumption and then applies the results as it always does, so the
stop rule is one piece of code either way.

Speculative decoding (``core/speculative.py``): while no more than ``disable_by_batch_size``
requests run, a decoding request's row carries its proposed tokens after its last one, in a
single-step pass; ``update`` takes the 1 to k + 1 tokens the worker accepted through the same
stop rule, and the KV of the accepted proposals counts as computed.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Collection, Iterable

from stepserve.config import SchedulerConfig, SpeculativeConfig
from stepserve.core.block_manager import BlockManager
from stepserve.core.outputs import (
    ENCODER,
    EngineCoreOutput,
    EngineCoreRequest,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from stepserve.core.request import PLACEHOLDER, FinishReason, Request, RequestStatus, check_stop
from stepserve.core.speculative import DraftLimit, NgramIndex, SpecCounters


def _assumed_advance(s: ScheduledRequest) -> int:
    """Tokens whose KV a pass computes for ``s`` when all its sampled tokens are accepted."""
    return s.num_new_tokens + (s.num_steps - 1 if s.sample else 0)


class Scheduler:
    """Decides which requests compute how many tokens each pass, and applies the results."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        eos_token_ids: Collection[int],
        window: int = 0,
        max_loras: int = 0,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        """``window``: for a model whose every layer attends over a sliding window, the widest
        window (blocks before it are handed back as requests advance); 0 otherwise.
        ``max_loras``: LoRA adapters that may run at once (0: no adapters served).
        ``speculative``: the speculative decoding settings; None: none."""
        self.config = config
        self.spec = speculative
        self.spec_counters = SpecCounters()
        # A draft model (or EAGLE-3 head) proposes in the worker after each pass, for the next: slots for its writes.
        self._drafter = speculative is not None and speculative.drafter
        self.max_loras = max_loras
        self.window = window
        self.blocks = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self._assumed_pass: SchedulerOutput | None = None  # the pass sent and not yet back, if assumed
        self._assumed: dict[str, tuple[Request, ScheduledRequest | None]] = {}  # its rows taken as accepted

    # -- requests in and out -------------------------------------------------------------

    def add(self, msg: EngineCoreRequest) -> None:
        request = Request(msg)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish the given requests with ``abort`` and free their blocks; unknown ids are ignored."""
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.WAITING:
                self.waiting.remove(request)
            else:
                self.running.remove(request)
            outputs.append(self._finish(request, FinishReason.ABORT))
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- schedule ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        speculating = self.speculating
        drafts = self._proposals() if speculating else {}
        # A draft model's proposals need its KV of every token: its passes are single steps.
        num_steps = 1 if drafts or self._drafter else self._num_steps()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        budget = self._schedule_running(scheduled, budget, num_steps, drafts)
        if num_steps == 1:
            self._schedule_waiting(scheduled, budget)
        finished = tuple(self._finished_ids)
        if scheduled:  # an empty pass never reaches the worker: keep the ids for the next one
            self._finished_ids = []
        return SchedulerOutput(
            requests=tuple(scheduled),
            num_steps=num_steps,
            finished_request_ids=finished,
            num_batched_tokens=sum(s.num_new_tokens for s in scheduled),
            num_proposals=self.spec.num_speculative_tokens if self._drafter and speculating else 0,
        )

    # -- speculative decoding ------------------------------------------------------------

    @property
    def speculating(self) -> bool:
        """Whether the next pass may carry proposals: speculation is on and the batch is small
        (under load, verifying proposals costs more than it gains)."""
        return self.spec is not None and len(self.running) <= self.spec.disable_by_batch_size

    @property
    def _lookahead(self) -> int:
        """Slots past a sampled row's pass for the draft model's proposal steps."""
        return self.spec.num_speculative_tokens if self._drafter else 0

    def _proposals(self) -> dict[str, list[int]]:
        """Each decoding request's proposed tokens for the next pass, where it has any."""
        out = {}
        for request in self.running:
            if request.num_tokens - request.num_computed_tokens != 1 or request.num_placeholders:
                continue
            p = request.params
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                continue  # penalties count each token: the verify pass cannot take them position by position
            room = min(request.remaining_tokens, self.max_model_len - request.num_tokens) - 1
            drafts = self._propose(request, room)
            if drafts:
                out[request.request_id] = drafts
        return out

    def _propose(self, request: Request, room: int) -> list[int]:
        spec = self.spec
        k = spec.num_speculative_tokens
        if request.draft_limit is None:
            request.draft_limit = DraftLimit(k)
        allowed = min(request.draft_limit.allowed(), room)
        if allowed <= 0:
            return []
        if self._drafter:
            return request.draft_token_ids[:allowed]
        if request.ngram is None:
            request.ngram = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max)
        return request.ngram.propose(request.token_ids, allowed)

    def _num_steps(self) -> int:
        steps = self.config.num_scheduler_steps
        if steps == 1 or not self.running:
            return 1
        if any(r.num_tokens - r.num_computed_tokens != 1 for r in self.running):
            return 1  # a prompt chunk is in flight: prefills run as single steps
        if self.config.adaptive_steps and self._can_admit():
            return 1
        return steps

    def _can_admit(self) -> bool:
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        head = self.waiting[0]
        return self.blocks.num_free_blocks >= self.blocks.blocks_needed(head.num_tokens)

    def _schedule_running(
        self, scheduled: list[ScheduledRequest], budget: int, num_steps: int, drafts: dict[str, list[int]]
    ) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._surely_finishing(request):
                i += 1  # its last tokens are in the running pass: nothing to compute for it
                continue
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            proposed = tuple(drafts.get(request.request_id, ())[: budget - num_new])
            steps = min(num_steps, request.remaining_tokens)
            # Slots for the chunk plus the lookahead steps' inputs (or the proposals, and the
            # draft model's steps after a sampled row); never past the request's end.
            slots = request.num_computed_tokens + num_new + steps - 1 + len(proposed)
            if request.num_computed_tokens + num_new == request.num_tokens:
                slots += self._lookahead
            if not self._allocate_or_preempt(request, slots):
                break  # the request itself was preempted; everything after it is gone too
            scheduled.append(self._scheduled(request, num_new, steps, proposed))
            budget -= num_new + len(proposed)
            i += 1
        return budget

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens a request computes in this pass: its remaining ones within the pass's budget and,
        for a prompt chunk, ``long_prefill_token_threshold`` (vLLM's meaning) where it is set."""
        limit = self.config.long_prefill_token_threshold
        return min(remaining, budget, limit) if limit > 0 else min(remaining, budget)

    def _surely_finishing(self, request: Request) -> bool:
        """An assumed request whose placeholders reach max_tokens or the context end."""
        return bool(request.num_placeholders) and (
            request.remaining_tokens <= 0 or request.num_tokens >= self.max_model_len
        )

    def _allocate_or_preempt(self, request: Request, num_slots: int) -> bool:
        while not self.blocks.allocate(request.request_id, num_slots):
            victim = self.running.pop()  # the latest admitted has the lowest priority
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute later: free the blocks, keep the tokens, go to the front of the queue."""
        self.blocks.free(request.request_id)
        if self._assumed.pop(request.request_id, None) is not None:
            self._drop_placeholders(request)  # that pass's tokens are dropped and recomputed
        request.num_computed_tokens = 0
        request.draft_token_ids = []  # the draft model's KV is recomputed too
        request.num_preemptions += 1
        if request.prompt_logprobs is not None:
            request.prompt_logprobs.clear()  # not sent yet: the recompute collects them again
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self._finished_ids.append(request.request_id)  # the worker drops its per-request state
        self.num_preemptions += 1

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        held: list[Request] = []  # waiting for an adapter slot: they keep their place
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self._adapter_fits(request):
                held.append(self.waiting.popleft())
                continue
            prefix = (
                self.blocks.find_cached_prefix(request.token_ids, request.prefix_salt)
                if request.reads_prefix_cache
                else []
            )
            num_computed = len(prefix) * self.blocks.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if request.pooling != ENCODER:
                num_new = self._chunk(num_new, budget)
            if request.pooling == ENCODER and num_new < request.num_tokens:
                break  # an encoder attends both ways: its input is computed whole or not yet
            lookahead = self._lookahead if num_computed + num_new == request.num_tokens else 0
            if not self.blocks.allocate(request.request_id, num_computed + num_new + lookahead, prefix):
                break
            if request.num_preemptions == 0:
                self.blocks.record_prefix_lookup(request.num_tokens, num_computed)
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new, 1))
            budget -= num_new
        self.waiting.extendleft(reversed(held))

    def _adapter_fits(self, request: Request) -> bool:
        """At most ``max_loras`` adapters run at once (the worker holds that many): a request for
        another one waits, and requests behind it may go first, as in vLLM."""
        if request.lora is None or not self.max_loras:
            return True
        running = {r.lora.id for r in self.running if r.lora is not None}
        return request.lora.id in running or len(running) < self.max_loras

    def _scheduled(self, request: Request, num_new: int, steps: int, drafts: tuple[int, ...] = ()) -> ScheduledRequest:
        """``num_new`` of the request's own tokens, then the proposed ``drafts`` after them."""
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids,
            start=request.num_computed_tokens,
            num_new_tokens=num_new + len(drafts),
            block_ids=self.blocks.block_ids(request.request_id),
            params=request.params,
            num_prompt_tokens=request.num_prompt_tokens,
            sample=request.num_computed_tokens + num_new == request.num_tokens,
            num_steps=steps,
            pooling=request.pooling,
            encoder=request.encoder,
            lora=request.lora,
            draft_token_ids=drafts,
        )

    # -- update --------------------------------------------------------------------------

    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Apply a pass's results: advance computed counts, accept tokens up to a stop."""
        outputs = []
        logprobs = result.logprobs or (None,) * len(sched.requests)
        was_assumed = sched is self._assumed_pass
        assumed = self._assumed
        self._assumed_pass, self._assumed = None, {}
        proposals = result.draft_token_ids or ((),) * len(sched.requests)
        for s, tokens, lps, proposal in zip(sched.requests, result.sampled_token_ids, logprobs, proposals):
            request = self.requests.get(s.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or preempted while the pass ran
            if was_assumed:
                taken, row = assumed.get(s.request_id, (None, None))
                if taken is not request:
                    continue  # preempted while assumed (recomputed), or a new request under a reused id
                if row is not None:  # None: ``unassume`` undid it already
                    self._unassume(request, row)
            if s.request_id in result.errors:
                outputs.append(self._finish(request, FinishReason.ABORT, result.errors[s.request_id]))
                continue
            num_drafts = len(s.draft_token_ids)
            request.num_computed_tokens += s.num_new_tokens - num_drafts  # accepted proposals count in _accept
            if num_drafts and tokens:
                self._record_acceptance(request, num_drafts, len(tokens) - 1)
            request.draft_token_ids = list(proposal)
            if request.prompt_logprobs is not None:
                request.prompt_logprobs.extend(result.prompt_logprobs.get(s.request_id, ()))
            if s.sample and request.pooling is not None:
                outputs.append(self._finish_pooling(request, result))
                continue
            # The pass's KV holds whether or not the request ends here: its full blocks are cached
            # first, so that a request that finishes at once (max_tokens=1) leaves its prompt cached.
            self.blocks.cache_full_blocks(
                request.request_id, request.token_ids, request.num_computed_tokens, request.prefix_salt
            )
            output = self._accept(request, tokens, lps) if s.sample else None
            if not request.is_finished:
                if s.num_steps > 1:  # the later steps' input tokens had their KV written too
                    self.blocks.cache_full_blocks(
                        request.request_id, request.token_ids, request.num_computed_tokens, request.prefix_salt
                    )
                if num_drafts > len(tokens) - 1:  # the rejected proposals' slots go back
                    self.blocks.trim(request.request_id, request.num_computed_tokens + 1)
                if self.window:  # the next query sits at num_computed_tokens and sees `window` keys
                    self.blocks.release_before(request.request_id, request.num_computed_tokens - self.window + 1)
            if output is not None:
                outputs.append(output)
        self.running = [r for r in self.running if not r.is_finished]
        return outputs

    def _record_acceptance(self, request: Request, proposed: int, accepted: int) -> None:
        self.spec_counters.record(proposed, accepted)
        request.draft_limit.update(proposed, accepted, self.spec.num_speculative_tokens)

    # -- asynchronous scheduling ---------------------------------------------------------

    def assume(self, sched: SchedulerOutput) -> None:
        """Take ``sched``, sent to the worker and not yet back, as if every token it may sample
        were accepted: its KV counts as computed and its tokens are PLACEHOLDERs, so the next
        pass can be scheduled while it runs (a decode row's input is then a placeholder, which
        the worker fills from this pass's tokens on the device). ``update(sched, ...)`` undoes
        this before applying the real results."""
        for s in sched.requests:
            request = self.requests.get(s.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += _assumed_advance(s)
            if s.sample:
                request.token_ids.extend([PLACEHOLDER] * s.num_steps)
                request.num_placeholders += s.num_steps
            self._assumed[s.request_id] = (request, s)
        self._assumed_pass = sched

    def unassume(self) -> None:
        """Undo ``assume`` (the pass is to be run again); ``update`` still applies its rows only
        to the requests it was scheduled for."""
        for request_id, (request, s) in self._assumed.items():
            if s is not None and request.status is RequestStatus.RUNNING:
                self._unassume(request, s)
            self._assumed[request_id] = (request, None)

    def _unassume(self, request: Request, s: ScheduledRequest) -> None:
        request.num_computed_tokens -= _assumed_advance(s)
        if s.sample:
            del request.token_ids[-s.num_steps :]
            request.num_placeholders -= s.num_steps

    @staticmethod
    def _drop_placeholders(request: Request) -> None:
        if request.num_placeholders:
            del request.token_ids[-request.num_placeholders :]
            request.num_placeholders = 0

    def _accept(self, request: Request, tokens: tuple[int, ...], lps) -> EngineCoreOutput:
        accepted: list[int] = []
        reason = None
        for k, token in enumerate(tokens):
            if k > 0:
                request.num_computed_tokens += 1  # step k's input token had its KV written
            request.token_ids.append(token)
            accepted.append(token)
            reason = check_stop(request, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                break  # tokens after a stop are discarded (docs/architecture.md, invariant 4)
        new_lps = tuple(lps[: len(accepted)]) if lps is not None else None
        if reason is not None:
            output = self._finish(request, reason, new_tokens=tuple(accepted), new_logprobs=new_lps)
        else:
            output = EngineCoreOutput(
                request.request_id,
                tuple(accepted),
                new_lps,
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=request.num_cached_tokens,
            )
        return self._with_prompt_logprobs(request, output)

    def _finish_pooling(self, request: Request, result: ModelRunnerOutput) -> EngineCoreOutput:
        """A pooling request's prompt is computed: it ends with its vector, nothing sampled. Its
        full blocks are cached first, so that a later prompt with the same prefix finds them."""
        pooled = result.pooled.get(request.request_id)
        if pooled is None:
            return self._finish(request, FinishReason.ABORT, "the worker returned no result for this request")
        self.blocks.cache_full_blocks(
            request.request_id, request.token_ids, request.num_computed_tokens, request.prefix_salt
        )
        return self._finish(request, FinishReason.STOP, pooled=pooled)

    @staticmethod
    def _with_prompt_logprobs(request: Request, output: EngineCoreOutput) -> EngineCoreOutput:
        """The prompt's logprobs ride on the request's first output, once."""
        if request.prompt_logprobs is None:
            return output
        prompt_logprobs, request.prompt_logprobs = tuple(request.prompt_logprobs), None
        return dataclasses.replace(output, prompt_logprobs=prompt_logprobs)

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        error: str | None = None,
        new_tokens: tuple[int, ...] = (),
        new_logprobs=None,
        pooled=None,
    ) -> EngineCoreOutput:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._assumed.pop(request.request_id, None)
        self.blocks.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        return EngineCoreOutput(
            request.request_id,
            new_tokens,
            new_logprobs,
            finish_reason=reason.value,
            stop_token_id=request.stop_token_id,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            error=error,
            pooled=pooled,
        )
