"""The async front of the engine: per-request output queues, detokenization, stop strings, n>1.

Routes call ``AsyncEngine.generate`` with resolved prompts and iterate over ``Update``s; the
task routes call ``AsyncEngine.encode`` with prefill-only requests (embeddings, encoder tasks)
and await their results. Both share one admission limit, timeout, death rule and metrics. One
task (``_handle_outputs``) reads every output batch from the ``CoreClient``, runs each through
its completion's ``RequestState`` (detokenizer and stop strings) and puts the result on the
queue of the HTTP request it belongs to. When the consumer goes away (a client disconnect
cancels it), ``generate``'s ``finally`` aborts what is left, so the core frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from stepserve.core.engine_core import EngineStats
from stepserve.core.outputs import EngineCoreOutput, EngineCoreRequest, LoraRef
from stepserve.engine.core_client import CoreClient, CoreOutputs
from stepserve.engine.output_processor import Delta, RequestState
from stepserve.errors import EngineDeadError, QueueFullError, RequestAbortedError, RequestTimeoutError
from stepserve.sampling import SamplingParams

log = logging.getLogger("stepserve.requests")


@dataclass(frozen=True)
class PromptInput:
    """One prompt of a request, ready for the engine."""

    token_ids: tuple[int, ...]  # the tokenized prompt, never empty
    params: SamplingParams  # resolved (max_tokens is an int); n completions are made of it
    lora: LoraRef | None = None  # the LoRA adapter it runs with; None: the base model


@dataclass(frozen=True)
class AdmissionLimits:
    """Admission control: how much may be in flight, and for how long."""

    max_in_flight: int | None = None  # completions in the engine at most (running + queued); None: no limit
    request_timeout_s: float | None = None  # abort a request after this long; None: never


@dataclass(frozen=True)
class Update:
    """What one completion gained; ``state`` holds everything it has so far."""

    state: RequestState  # the completion's accumulated text, tokens, logprobs; ``index`` is its choice
    delta: Delta  # the new part


@dataclass(frozen=True)
class FinishedRequest:
    """Timings and counts of one finished engine request, for metrics."""

    request_id: str  # the engine request (one completion)
    num_prompt_tokens: int  # its prompt length
    num_generation_tokens: int  # tokens it generated
    finish_reason: str  # "stop", "length" or "abort"
    arrival_time: float  # time.monotonic() when the HTTP request arrived
    first_token_time: float | None  # when its first token reached the front
    finish_time: float  # when it finished


@dataclass
class TokenCounts:
    """Tokens the front has seen since start, for the periodic stats line (as vLLM V1 counts
    them: a prompt counts once its first output token arrives)."""

    prompt: int = 0  # prompt tokens of requests that produced a first token
    generation: int = 0  # tokens generated


@dataclass
class _Child:
    """Front-side bookkeeping of one engine request."""

    state: RequestState
    queue: asyncio.Queue
    arrival_time: float
    first_token_time: float | None = None


class AsyncEngine:
    """Feeds a ``CoreClient`` and fans its outputs out to the requests waiting for them."""

    def __init__(
        self,
        client: CoreClient,
        tokenizer,
        on_finish: Callable[[FinishedRequest], None] | None = None,
        limits: AdmissionLimits = AdmissionLimits(),
    ) -> None:
        self.client = client
        self.limits = limits
        self.tokenizer = tokenizer
        self._on_finish = on_finish
        self._children: dict[str, _Child] = {}
        self._results: dict[str, asyncio.Future] = {}  # prefill-only requests (``encode``) waiting for their result
        self.token_counts = TokenCounts()
        self._handler = asyncio.get_running_loop().create_task(self._handle_outputs())

    @property
    def is_ready(self) -> bool:
        return self.client.is_alive and not self._handler.done()

    def stats(self) -> EngineStats:
        return self.client.stats()

    async def shutdown(self) -> None:
        self._handler.cancel()
        await asyncio.to_thread(self.client.shutdown)

    # -- requests ------------------------------------------------------------------------

    async def generate(self, request_id: str, prompts: Sequence[PromptInput]) -> AsyncIterator[Update]:
        """Run ``n`` completions of each prompt; choice ``p * n + i`` is completion i of prompt p.

        Raises ``RequestAbortedError`` if the engine failed one of them and ``EngineDeadError``
        if the engine died; either way the rest of the request is aborted.
        """
        self._admit(sum(p.params.n for p in prompts))
        queue: asyncio.Queue = asyncio.Queue()
        arrival = time.monotonic()
        children = self._add(request_id, prompts, queue, arrival)
        ids = [c.state.request_id for c in children]
        pending, reasons = set(ids), []
        timeout = self.limits.request_timeout_s
        deadline = None if timeout is None else arrival + timeout
        try:
            while pending:
                item = await self._next(queue, deadline)
                if isinstance(item, Exception):
                    raise item
                if item.delta.finish_reason is not None:
                    pending.discard(item.state.request_id)
                    reasons.append(item.delta.finish_reason)
                yield item
        finally:
            self._release(ids)
            self._log(request_id, prompts, children, reasons, arrival, bool(pending))

    def _admit(self, wanted: int) -> None:
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        limit = self.limits.max_in_flight
        in_flight = len(self._children) + len(self._results)
        if limit is not None and in_flight + wanted > limit:
            raise QueueFullError(f"the server is at capacity ({in_flight} requests in flight); retry shortly")

    async def encode(self, request_id: str, requests: Sequence[EngineCoreRequest]) -> list[EngineCoreOutput]:
        """Run prefill-only requests (``pooling`` set) to their finished outputs, in order. If one
        fails, the caller leaves or the timeout passes, the rest are aborted."""
        self._admit(len(requests))
        arrival = time.monotonic()
        loop = asyncio.get_running_loop()
        futures = [self._results.setdefault(r.request_id, loop.create_future()) for r in requests]
        try:
            for r in requests:
                self.client.add_request(dataclasses.replace(r, arrival_time=arrival))
            return await self._gather(futures, arrival)
        finally:
            self._release_results(request_id, requests, futures, arrival)

    async def _gather(self, futures: list[asyncio.Future], arrival: float) -> list[EngineCoreOutput]:
        timeout = self.limits.request_timeout_s
        remaining = None if timeout is None else max(arrival + timeout - time.monotonic(), 0)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), remaining))
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request ran past the server's timeout of {timeout}s and was aborted"
            ) from None

    def _release_results(
        self, request_id: str, requests: Sequence[EngineCoreRequest], futures: list[asyncio.Future], arrival: float
    ) -> None:
        """Forget the requests, abort what the core still holds, count them (metrics, one log line)."""
        for r in requests:
            self._results.pop(r.request_id, None)
        self.client.abort([r.request_id for r, f in zip(requests, futures) if not f.done()])
        now = time.monotonic()
        outputs = [f.result() if f.done() and not f.cancelled() and f.exception() is None else None for f in futures]
        generated = [len(_generated_ids(out)) for out in outputs]
        for r, out, count in zip(requests, outputs, generated):
            self._observe_result(r, out, count, arrival, now)
        outcome = "abort" if None in outputs else ",".join(sorted({o.finish_reason for o in outputs}))
        log.info(
            "request %s finished: prompt_tokens=%d output_tokens=%d inputs=%d finish_reason=%s latency=%.3fs",
            request_id,
            sum(len(r.prompt_token_ids) for r in requests),
            sum(generated),
            len(requests),
            outcome,
            now - arrival,
        )

    def _observe_result(
        self, request: EngineCoreRequest, out: EngineCoreOutput | None, generated: int, arrival: float, now: float
    ) -> None:
        if out is not None:
            self.token_counts.prompt += len(request.prompt_token_ids)
            self.token_counts.generation += generated
        if self._on_finish is not None:
            reason = out.finish_reason if out is not None else "abort"
            first = now if generated else None  # a one-pass result: its first token arrives with the last
            self._on_finish(
                FinishedRequest(
                    request.request_id, len(request.prompt_token_ids), generated, reason, arrival, first, now
                )
            )

    async def _next(self, queue: asyncio.Queue, deadline: float | None):
        if deadline is None:
            return await queue.get()
        try:
            return await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request ran past the server's timeout of {self.limits.request_timeout_s}s and was aborted"
            ) from None

    def _add(
        self, request_id: str, prompts: Sequence[PromptInput], queue: asyncio.Queue, arrival: float
    ) -> list[_Child]:
        children = []
        for p, prompt in enumerate(prompts):
            n = prompt.params.n
            for i in range(n):
                params = prompt.params.for_choice(i)
                child_id = f"{request_id}-{p * n + i}"
                state = RequestState.create(child_id, p * n + i, params, self.tokenizer, prompt.token_ids)
                children.append(_Child(state, queue, arrival))
                self._children[child_id] = children[-1]
                self.client.add_request(
                    EngineCoreRequest(child_id, prompt.token_ids, params, arrival, lora=prompt.lora)
                )
        return children

    def _release(self, ids: list[str]) -> None:
        """Forget the request's completions and abort the ones still running in the core."""
        unfinished = [self._children[i] for i in ids if i in self._children]
        for child in unfinished:
            self._finish(child, "abort")
        self.client.abort([c.state.request_id for c in unfinished])

    @staticmethod
    def _log(
        request_id: str, prompts, children: list[_Child], reasons: list[str], arrival: float, cut_short: bool
    ) -> None:
        """The one log line per finished request (docs/architecture.md, invariant 5)."""
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        output_tokens = sum(len(c.state.token_ids) for c in children)
        outcome = "abort" if cut_short else ",".join(sorted(set(reasons)))
        log.info(
            "request %s finished: prompt_tokens=%d output_tokens=%d completions=%d finish_reason=%s latency=%.3fs",
            request_id,
            prompt_tokens,
            output_tokens,
            len(children),
            outcome,
            time.monotonic() - arrival,
        )

    # -- outputs -------------------------------------------------------------------------

    async def _handle_outputs(self) -> None:
        while True:
            batch = await self.client.get_outputs()
            try:
                self._dispatch(batch)
            except Exception:  # never let one bad batch stop every request's outputs
                log.exception("output handling failed")

    def _dispatch(self, batch: CoreOutputs) -> None:
        if batch.engine_error is not None:
            self._fail_all(EngineDeadError(batch.engine_error))
            return
        to_abort = []
        for out in batch.outputs:
            if out.request_id in self._results:
                _resolve(self._results[out.request_id], out)
                continue
            child = self._children.get(out.request_id)
            if child is not None and self._process(child, out):
                to_abort.append(out.request_id)
        self.client.abort(to_abort)

    def _process(self, child: _Child, out: EngineCoreOutput) -> bool:
        """Apply one output to its completion; True when the core must abort it."""
        try:
            delta, must_abort = child.state.update(out)
        except Exception as exc:  # detokenizer trouble fails this request alone (invariant 2)
            log.exception("request %s failed in the front", out.request_id)
            self._finish(child, "abort")
            child.queue.put_nowait(RequestAbortedError(f"request failed while decoding its output: {exc}"))
            return not out.finished
        if out.new_token_ids and child.first_token_time is None:
            child.first_token_time = time.monotonic()
            self.token_counts.prompt += child.state.num_prompt_tokens
        self.token_counts.generation += len(out.new_token_ids)
        if delta.error is not None:
            self._finish(child, "abort")
            child.queue.put_nowait(RequestAbortedError(f"the engine aborted the request: {delta.error}"))
            return False
        if delta.finish_reason is not None:
            self._finish(child, delta.finish_reason)
        child.queue.put_nowait(Update(child.state, delta))
        return must_abort

    def _finish(self, child: _Child, reason: str) -> None:
        self._children.pop(child.state.request_id, None)
        if self._on_finish is not None:
            self._on_finish(
                FinishedRequest(
                    child.state.request_id,
                    child.state.num_prompt_tokens,
                    len(child.state.token_ids),
                    reason,
                    child.arrival_time,
                    child.first_token_time,
                    time.monotonic(),
                )
            )

    def _fail_all(self, error: Exception) -> None:
        for child in list(self._children.values()):
            self._finish(child, "abort")
            child.queue.put_nowait(error)
        for future in self._results.values():
            if not future.done():
                future.set_exception(error)


def _resolve(future: asyncio.Future, out: EngineCoreOutput) -> None:
    """A prefill-only request's future gets its finished output, or the engine's reason for failing it."""
    if future.done() or not out.finished:
        return
    if out.error is not None or out.pooled is None:
        future.set_exception(RequestAbortedError(f"the engine aborted the request: {out.error or out.finish_reason}"))
    else:
        future.set_result(out)


def _generated_ids(out: EngineCoreOutput | None) -> tuple[int, ...]:
    """The tokens a text2text result generated (none for a vector)."""
    return getattr(out.pooled, "token_ids", ()) if out is not None else ()
