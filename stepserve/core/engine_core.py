"""The step loop: schedule, execute, update. Pure Python; the worker is handed in.

With asynchronous scheduling (a worker that can ``submit`` a pass and ``collect`` it later),
one step schedules and submits pass k+1 while pass k still runs on the device, then collects
pass k and applies it: the host's scheduling, input preparation and result handling overlap
the device's work instead of following it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from stepserve.core.kv_events import KVEventSink
from stepserve.core.outputs import POOLINGS, EngineCoreOutput, EngineCoreRequest, ModelRunnerOutput, SchedulerOutput
from stepserve.core.request import RequestStatus
from stepserve.core.scheduler import Scheduler
from stepserve.core.speculative import SpecCounters
from stepserve.errors import InvalidRequestError

log = logging.getLogger("stepserve.engine")

MAX_FAILED_PASSES = 3  # consecutive passes that fail for every request before the core gives up


class EngineFaultError(RuntimeError):
    """The engine itself is broken (not one request): the core must die and be restarted."""


def _failed(sched: SchedulerOutput, exc: Exception) -> ModelRunnerOutput:
    """A result that aborts every request of ``sched`` with ``exc`` as the reason."""
    reason = f"{type(exc).__name__}: {exc}"
    return ModelRunnerOutput(((),) * len(sched.requests), (), {r.request_id: reason for r in sched.requests})


class Worker(Protocol):
    """What the core drives: computes one scheduler pass."""

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...


class AsyncWorker(Worker, Protocol):
    """A worker that can start a pass and hand its results back later. A decode row's input
    may be a PLACEHOLDER: the token the previously submitted pass sampled last for it."""

    def submit(self, sched: SchedulerOutput) -> object: ...  # starts the pass, no host sync

    def collect(self, handle: object) -> ModelRunnerOutput: ...  # waits for it


def _needs_outputs(sched: SchedulerOutput) -> bool:
    """Does the next pass need this pass's tokens on the host? Penalties count them and grammar
    matchers follow them, so such rows wait for the results instead of using placeholders; a
    pass that verified proposals, or after which a draft model proposed, advanced its rows by
    a number of tokens known only from its results."""
    if sched.num_proposals or any(s.draft_token_ids for s in sched.requests):
        return True
    return any(
        s.sample
        and (p.structured is not None or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)
        for s in sched.requests
        for p in (s.params,)
    )


@dataclass(frozen=True)
class InFlight:
    """A pass submitted to the worker whose results are not applied yet."""

    sched: SchedulerOutput  # what was submitted
    handle: object  # the worker's handle for ``collect``


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics."""

    num_running: int  # requests in the running batch
    num_waiting: int  # requests queued (new or preempted)
    kv_cache_usage: float  # share of KV blocks held by requests, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int  # requests preempted so far
    running_loras: tuple[str, ...] = ()  # names of the LoRA adapters of running requests
    waiting_loras: tuple[str, ...] = ()  # and of waiting ones
    num_kv_blocks: int = 0  # blocks in the KV cache, the null block included (vLLM's num_gpu_blocks); 0: unknown
    block_size: int = 0  # tokens per KV block; 0: unknown
    speculative: SpecCounters | None = None  # speculative decoding's counts so far; None: not speculating


class EngineCore:
    """Owns the scheduler and drives the worker; the front end talks to it with typed messages."""

    def __init__(
        self,
        scheduler: Scheduler,
        worker: Worker,
        async_scheduling: bool = False,
        kv_events: KVEventSink | None = None,
    ) -> None:
        """``kv_events``: where each step's KV-cache events go (the block manager must record them)."""
        self.scheduler = scheduler
        self.worker = worker
        self.kv_events = kv_events
        self._failed_passes = 0
        self.async_scheduling = async_scheduling and hasattr(worker, "submit")
        self._in_flight: InFlight | None = None
        self.last_pass: SchedulerOutput | None = None  # the pass whose results the last step applied

    def add_request(self, msg: EngineCoreRequest) -> None:
        """Accept a resolved request; anything unresolved is refused here, a last line of defence."""
        params = msg.params
        if not params.is_resolved:
            raise InvalidRequestError("max_tokens must be resolved before the engine sees a request", "max_tokens")
        if not msg.prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if msg.pooling is not None:
            self._check_pooling(msg)
        elif len(msg.prompt_token_ids) + params.max_tokens > self.scheduler.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(msg.prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={self.scheduler.max_model_len}",
                "max_tokens",
            )
        if msg.request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {msg.request_id!r} is already in flight", "request_id")
        self.scheduler.add(msg)

    def _check_pooling(self, msg: EngineCoreRequest) -> None:
        """A pooling request computes its prompt and nothing more: the prompt must fit."""
        if msg.pooling not in POOLINGS:
            raise InvalidRequestError(f"pooling={msg.pooling!r}: use one of {', '.join(POOLINGS)}", "pooling")
        if len(msg.prompt_token_ids) > self.scheduler.max_model_len:
            raise InvalidRequestError(
                f"the input ({len(msg.prompt_token_ids)} tokens) exceeds max_model_len={self.scheduler.max_model_len}",
                "input",
            )

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids)

    def step(self) -> list[EngineCoreOutput]:
        outputs = self._step_async() if self.async_scheduling else self._step_sync()
        if self.kv_events is not None:
            self.publish_kv_events()
        return outputs

    def _step_sync(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        return self._apply(sched, self._execute(sched))

    def publish_kv_events(self) -> None:
        """Hand the block manager's events since the last call to the sink, as one batch."""
        events = self.scheduler.blocks.take_events()
        if events and self.kv_events is not None:
            self.kv_events.publish(events)

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (``AllBlocksCleared``); False, changing nothing, while requests hold blocks."""
        done = self.scheduler.blocks.reset_prefix_cache()
        self.publish_kv_events()
        return done

    def _apply(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        self._count_failed_passes(sched, result)
        self.last_pass = sched
        return self.scheduler.update(sched, result)

    # -- asynchronous scheduling ---------------------------------------------------------

    def _step_async(self) -> list[EngineCoreOutput]:
        """Schedule and submit the next pass, then collect and apply the one in flight."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None and (_needs_outputs(previous.sched) or self.scheduler.speculating):
            return self._collect(previous)  # no overlap: the next pass needs its tokens (or proposes from them)
        if previous is not None:
            self.scheduler.assume(previous.sched)
        sched = self.scheduler.schedule()
        current = self._submit(sched) if not sched.is_empty else None
        outputs: list[EngineCoreOutput] = []
        if previous is not None:
            try:
                outputs = self._apply(previous.sched, self.worker.collect(previous.handle))
            except Exception as exc:
                outputs = self._rerun(previous, current, exc)
                current = current and InFlight(current.sched, None)  # it read wrong tokens: run it again
        if current is not None and current.handle is None:
            outputs += self._run_consistent(current.sched)
            current = None
        self._in_flight = current
        return outputs

    def _submit(self, sched: SchedulerOutput) -> InFlight:
        if any(s.pooling is not None for s in sched.requests):
            return InFlight(sched, None)  # pooling passes run synchronously (the runner's ``execute``)
        try:
            return InFlight(sched, self.worker.submit(sched))
        except Exception as exc:
            log.warning(
                "submitting a pass of %d requests failed (%r); it runs again without overlap", len(sched.requests), exc
            )
            return InFlight(sched, None)

    def _collect(self, flight: InFlight) -> list[EngineCoreOutput]:
        try:
            return self._apply(flight.sched, self.worker.collect(flight.handle))
        except Exception as exc:
            return self._rerun(flight, None, exc)

    def _rerun(self, failed: InFlight, current: InFlight | None, exc: Exception) -> list[EngineCoreOutput]:
        """Collecting ``failed`` raised: wait for ``current`` (it read ``failed``'s tokens on the
        device; the caller runs it again), undo the assumption, and run ``failed`` again on the
        synchronous path, which isolates the request at fault (docs/architecture.md, invariant 2)."""
        log.warning("a pass of %d requests failed (%r); running it again", len(failed.sched.requests), exc)
        if current is not None and current.handle is not None:
            try:
                self.worker.collect(current.handle)
            except Exception:  # noqa: S110 - its results are dropped either way
                pass
        self.scheduler.unassume()
        return self._apply(failed.sched, self._execute(failed.sched))

    def _run_consistent(self, sched: SchedulerOutput) -> list[EngineCoreOutput]:
        """Run a pass that was scheduled while another ran, without overlap, for its requests
        whose state still matches it (not finished, aborted or preempted since)."""
        requests = self.scheduler.requests
        rows = tuple(
            s
            for s in sched.requests
            if (r := requests.get(s.request_id)) is not None
            and r.status is RequestStatus.RUNNING
            and r.num_computed_tokens == s.start
        )
        if not rows:
            return []
        sched = dataclasses.replace(sched, requests=rows, num_batched_tokens=sum(s.num_new_tokens for s in rows))
        return self._apply(sched, self._execute(sched))

    def _count_failed_passes(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> None:
        """Passes in which every request failed, in a row, mean a broken engine, not bad requests."""
        if len(result.errors) < len(sched.requests):
            self._failed_passes = 0
            return
        self._failed_passes += 1
        if self._failed_passes >= MAX_FAILED_PASSES:
            raise EngineFaultError(
                f"{self._failed_passes} passes in a row failed for every request: {next(iter(result.errors.values()))}"
            )

    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run the pass; if it raises, find the request(s) at fault (docs/architecture.md, invariant 2)."""
        try:
            return self.worker.execute(sched)
        except EngineFaultError:  # the worker itself is broken (a tensor-parallel rank died): no retry
            raise
        except Exception as exc:
            if len(sched.requests) == 1:
                return _failed(sched, exc)
            log.warning("a pass of %d requests failed (%r); retrying them one by one", len(sched.requests), exc)
            return self._execute_one_by_one(sched)

    def _execute_one_by_one(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Re-run each request alone. Safe: a failed pass advanced nothing, and rewriting the
        same KV slots is idempotent. If every request fails alone too, the fault is the
        engine's, not a request's: raise, and the supervisor takes over."""
        parts = []
        for request in sched.requests:
            alone = dataclasses.replace(sched, requests=(request,), num_batched_tokens=request.num_new_tokens)
            try:
                parts.append(self.worker.execute(alone))
            except EngineFaultError:
                raise
            except Exception as exc:
                parts.append(_failed(alone, exc))
        if all(part.errors for part in parts):
            raise EngineFaultError(
                f"every request of the pass failed, alone too: {next(iter(parts[-1].errors.values()))}"
            )
        for request, part in zip(sched.requests, parts):
            if part.errors:
                log.error(
                    "request %s failed in the engine and is aborted: %s",
                    request.request_id,
                    part.errors[request.request_id],
                )
        return ModelRunnerOutput(
            sampled_token_ids=tuple(p.sampled_token_ids[0] for p in parts),
            logprobs=tuple(p.logprobs[0] if p.logprobs else None for p in parts),
            errors={k: v for p in parts for k, v in p.errors.items()},
            prompt_logprobs={k: v for p in parts for k, v in p.prompt_logprobs.items()},
            pooled={k: v for p in parts for k, v in p.pooled.items()},
        )

    def idle(self) -> None:
        """Called once the core has had no work for a while (``core_process``): the worker may
        start background work that would hold the GIL against busy passes."""
        hook = getattr(self.worker, "idle", None)
        if hook is not None:
            hook()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def stats(self) -> EngineStats:
        s = self.scheduler
        prefix = s.blocks.prefix_stats
        return EngineStats(
            len(s.running),
            len(s.waiting),
            s.blocks.usage,
            prefix.queries,
            prefix.hits,
            s.num_preemptions,
            tuple(sorted({r.lora.name for r in s.running if r.lora is not None})),
            tuple(sorted({r.lora.name for r in s.waiting if r.lora is not None})),
            s.blocks.num_blocks,
            s.blocks.block_size,
            dataclasses.replace(s.spec_counters, accepted_per_pos=list(s.spec_counters.accepted_per_pos))
            if s.spec is not None
            else None,
        )
