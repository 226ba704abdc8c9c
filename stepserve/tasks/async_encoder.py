"""The async front of the encoder core: one future per ``EncoderRequest``, fed by one task that
reads the core's output batches; the same admission, timeout, death and metrics rules as the
LLM's ``AsyncEngine``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from stepserve.core.engine_core import EngineStats
from stepserve.engine.async_engine import AdmissionLimits, FinishedRequest, TokenCounts
from stepserve.engine.core_client import CoreClient, CoreOutputs
from stepserve.errors import EngineDeadError, QueueFullError, RequestAbortedError, RequestTimeoutError
from stepserve.tasks.messages import EncoderOutput, EncoderRequest

log = logging.getLogger("stepserve.requests")


class AsyncEncoder:
    """Feeds a ``CoreClient`` running an ``EncoderCore`` and hands each output to its caller."""

    def __init__(self, client: CoreClient, on_finish: Callable[[FinishedRequest], None] | None = None, limits: AdmissionLimits = AdmissionLimits()) -> None:
        self.client = client
        self.limits = limits
        self._on_finish = on_finish
        self._waiting: dict[str, asyncio.Future] = {}
        self.token_counts = TokenCounts()  # for the periodic stats line: inputs computed, tokens generated
        self._handler = asyncio.get_running_loop().create_task(self._handle_outputs())

    @property
    def is_ready(self) -> bool:
        return self.client.is_alive and not self._handler.done()

    def stats(self) -> EngineStats:
        return self.client.stats()

    async def shutdown(self) -> None:
        self._handler.cancel()
        await asyncio.to_thread(self.client.shutdown)

    async def run(self, request_id: str, requests: Sequence[EncoderRequest]) -> list[EncoderOutput]:
        """Every request's output, in order; the rest are aborted if one fails or the caller leaves."""
        self._admit(len(requests))
        arrival = time.monotonic()
        loop = asyncio.get_running_loop()
        futures = [self._waiting.setdefault(r.request_id, loop.create_future()) for r in requests]
        outcome = "abort"
        try:
            for r in requests:
                self.client.add_request(r)
            outputs = await self._gather(futures, arrival)
            outcome = ",".join(sorted({o.finish_reason or "stop" for o in outputs}))
            return outputs
        finally:
            self._release(request_id, requests, futures, arrival, outcome)

    def _admit(self, count: int) -> None:
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        limit = self.limits.max_in_flight
        if limit is not None and len(self._waiting) + count > limit:
            raise QueueFullError(f"the server is at capacity ({len(self._waiting)} inputs in flight); retry shortly")

    async def _gather(self, futures: list[asyncio.Future], arrival: float) -> list[EncoderOutput]:
        timeout = self.limits.request_timeout_s
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), None if timeout is None else max(arrival + timeout - time.monotonic(), 0)))
        except TimeoutError:
            raise RequestTimeoutError(f"the request ran past the server's timeout of {timeout}s and was aborted") from None

    def _release(self, request_id: str, requests: Sequence[EncoderRequest], futures: list[asyncio.Future], arrival: float, outcome: str) -> None:
        """Forget the request, abort what the core still holds, count it (one log line, metrics)."""
        for r in requests:
            self._waiting.pop(r.request_id, None)
        self.client.abort([r.request_id for r, f in zip(requests, futures) if not f.done()])
        now = time.monotonic()
        outputs = [f.result() if f.done() and not f.cancelled() and f.exception() is None else None for f in futures]
        for r, out in zip(requests, outputs):
            self._observe(r, out, arrival, now)
        log.info(
            "request %s finished: prompt_tokens=%d output_tokens=%d inputs=%d finish_reason=%s latency=%.3fs",
            request_id, sum(len(r.token_ids) for r in requests), sum(len(o.token_ids) for o in outputs if o is not None),
            len(requests), outcome, now - arrival,
        )

    def _observe(self, request: EncoderRequest, out: EncoderOutput | None, arrival: float, now: float) -> None:
        generated = len(out.token_ids) if out is not None else 0
        if out is not None:
            self.token_counts.prompt += len(request.token_ids)
            self.token_counts.generation += generated
        if self._on_finish is None:
            return
        reason = out.finish_reason if out is not None else "abort"
        first = now if generated else None  # text2text answers at once: its first token arrives with the last
        self._on_finish(FinishedRequest(request.request_id, len(request.token_ids), generated, reason or "stop", arrival, first, now))

    async def _handle_outputs(self) -> None:
        while True:
            batch: CoreOutputs = await self.client.get_outputs()
            try:
                self._dispatch(batch)
            except Exception:  # never let one bad batch stop every request's outputs
                log.exception("output handling failed")

    def _dispatch(self, batch: CoreOutputs) -> None:
        if batch.engine_error is not None:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(EngineDeadError(batch.engine_error))
            return
        for out in batch.outputs:
            future = self._waiting.get(out.request_id)
            if future is None or future.done():
                continue
            if out.error is not None:
                future.set_exception(RequestAbortedError(f"the engine aborted the request: {out.error}"))
            else:
                future.set_result(out)
