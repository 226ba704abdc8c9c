"""The step loop: schedule, execute, update. Pure Python; the worker is handed in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from stepserve.core.outputs import EngineCoreOutput, EngineCoreRequest, ModelRunnerOutput, SchedulerOutput
from stepserve.core.scheduler import Scheduler
from stepserve.errors import InvalidRequestError


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

    def add_request(self, msg: EngineCoreRequest) -> None:
        """Accept a resolved request; anything unresolved is refused here, a last line of defence."""
        params = msg.params
        if not params.is_resolved:
            raise InvalidRequestError("max_tokens must be resolved before the engine sees a request", "max_tokens")
        if not msg.prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(msg.prompt_token_ids) + params.max_tokens > self.scheduler.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(msg.prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={self.scheduler.max_model_len}",
                "max_tokens",
            )
        if msg.request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {msg.request_id!r} is already in flight", "request_id")
        self.scheduler.add(msg)

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids)

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        result = self.worker.execute(sched)
        return self.scheduler.update(sched, result)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def stats(self) -> EngineStats:
        s = self.scheduler
        prefix = s.blocks.prefix_stats
        return EngineStats(len(s.running), len(s.waiting), s.blocks.usage, prefix.queries, prefix.hits, s.num_preemptions)
