"""The step loop: schedule, execute, update. Pure Python; the worker is handed in."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from stepserve.core.outputs import POOLINGS, EngineCoreOutput, EngineCoreRequest, ModelRunnerOutput, SchedulerOutput
from stepserve.core.scheduler import Scheduler
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


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics."""

    num_running: int  # requests in the running batch
    num_waiting: int  # requests queued (new or preempted)
    kv_cache_usage: float  # share of KV blocks held by requests, 0..1
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int  # requests preempted so far


class EngineCore:
    """Owns the scheduler and drives the worker; the front end talks to it with typed messages."""

    def __init__(self, scheduler: Scheduler, worker: Worker) -> None:
        self.scheduler = scheduler
        self.worker = worker
        self._failed_passes = 0

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
            raise InvalidRequestError(f"the input ({len(msg.prompt_token_ids)} tokens) exceeds max_model_len={self.scheduler.max_model_len}", "input")

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids)

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        result = self._execute(sched)
        self._count_failed_passes(sched, result)
        return self.scheduler.update(sched, result)

    def _count_failed_passes(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> None:
        """Passes in which every request failed, in a row, mean a broken engine, not bad requests."""
        if len(result.errors) < len(sched.requests):
            self._failed_passes = 0
            return
        self._failed_passes += 1
        if self._failed_passes >= MAX_FAILED_PASSES:
            raise EngineFaultError(f"{self._failed_passes} passes in a row failed for every request: {next(iter(result.errors.values()))}")

    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run the pass; if it raises, find the request(s) at fault (DESIGN invariant 2)."""
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
            raise EngineFaultError(f"every request of the pass failed, alone too: {next(iter(parts[-1].errors.values()))}")
        for request, part in zip(sched.requests, parts):
            if part.errors:
                log.error("request %s failed in the engine and is aborted: %s", request.request_id, part.errors[request.request_id])
        return ModelRunnerOutput(
            sampled_token_ids=tuple(p.sampled_token_ids[0] for p in parts),
            logprobs=tuple(p.logprobs[0] if p.logprobs else None for p in parts),
            errors={k: v for p in parts for k, v in p.errors.items()},
            prompt_logprobs={k: v for p in parts for k, v in p.prompt_logprobs.items()},
            pooled={k: v for p in parts for k, v in p.pooled.items()},
        )

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def stats(self) -> EngineStats:
        s = self.scheduler
        prefix = s.blocks.prefix_stats
        return EngineStats(len(s.running), len(s.waiting), s.blocks.usage, prefix.queries, prefix.hits, s.num_preemptions)
