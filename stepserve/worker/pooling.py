"""Pooling requests in the model runner (embeddings from decoder models).

A pooling request is prefill-only: its passes compute final hidden states (after the last
norm), never logits, and nothing is sampled for it. Its vector is folded chunk by chunk, so a
prompt longer than one pass's token budget pools exactly as if computed whole: "last" needs only
the final chunk's last row (so a prefix-cache hit loses nothing); "mean", "max" and "cls" read
every row, which is why the scheduler gives them no prefix-cache hits. A pass that mixes pooling
and generation runs as two forwards, one per kind, merged back into the pass's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from stepserve.core.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from stepserve.worker.runner import ModelRunner


@dataclasses.dataclass
class _Partial:
    """A pooling request's fold over the chunks computed so far (float32, on the device)."""

    value: torch.Tensor  # mean: the sum of rows; max: the running maximum; cls: the first row
    count: int  # rows folded in


def fold(partial: _Partial | None, rows: torch.Tensor, mode: str) -> _Partial:
    """``partial`` with one more chunk's rows (``partial`` None: the chunk starts the fold)."""
    count = len(rows) + (partial.count if partial is not None else 0)
    if mode == "last":
        value = rows[-1]
    elif mode == "cls":
        value = rows[0] if partial is None else partial.value
    elif mode == "max":
        value = rows.amax(0) if partial is None else torch.maximum(partial.value, rows.amax(0))
    else:  # mean: the sum now, divided once the prompt ends
        value = rows.sum(0) if partial is None else partial.value + rows.sum(0)
    return _Partial(value, count)


def finish(partial: _Partial, mode: str) -> torch.Tensor:
    return partial.value / partial.count if mode == "mean" else partial.value


class PoolingRows:
    """The per-request folds of pooling requests whose prompt is still being computed."""

    def __init__(self) -> None:
        self._partial: dict[str, _Partial] = {}

    def __len__(self) -> int:
        return len(self._partial)

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget finished, aborted and preempted requests (a preempted one starts again at 0)."""
        for request_id in request_ids:
            self._partial.pop(request_id, None)

    def execute(self, runner: ModelRunner, sched: SchedulerOutput) -> ModelRunnerOutput:
        """The pass's results: pooling requests pooled here, the rest through ``runner.execute``.
        Generation runs first and the folds are kept only once the pooling forward succeeded,
        so a failed pass that the core retries request by request folds no chunk twice."""
        pooling = tuple(r for r in sched.requests if r.pooling is not None)
        others = tuple(r for r in sched.requests if r.pooling is None)
        generated = (
            runner.execute(_part(sched, others, sched.num_steps, sched.finished_request_ids)) if others else None
        )
        pooled, errors = self._pool(runner, _part(sched, pooling, 1, ()))
        return _merge(sched, generated, others, pooled, errors)

    def _pool(self, runner: ModelRunner, sched: SchedulerOutput) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        hidden = runner.hidden_states(sched).float()
        kept: dict[str, _Partial] = {}
        done: list[tuple[str, torch.Tensor]] = []
        offset = 0
        for r in sched.requests:
            rows = hidden[offset : offset + r.num_new_tokens]
            offset += r.num_new_tokens
            partial = fold(None if r.start == 0 else self._partial.get(r.request_id), rows, r.pooling)
            if r.sample:  # the chunk ends the prompt: the vector is due
                done.append((r.request_id, finish(partial, r.pooling)))
            elif r.pooling != "last":  # "last" keeps nothing between chunks
                kept[r.request_id] = partial
        vectors = torch.stack([v for _, v in done]).cpu().numpy() if done else None  # the one sync
        self.drop(rid for rid, _ in done)
        self._partial.update(kept)
        if vectors is None:
            return {}, {}
        finite = np.isfinite(vectors).all(axis=1)
        pooled = {rid: vectors[i] for i, (rid, _) in enumerate(done) if finite[i]}
        errors = {
            rid: "the model produced non-finite hidden states for this request"
            for i, (rid, _) in enumerate(done)
            if not finite[i]
        }
        return pooled, errors


def _part(
    sched: SchedulerOutput, requests: tuple[ScheduledRequest, ...], num_steps: int, finished: tuple[str, ...]
) -> SchedulerOutput:
    """The pass cut to some of its requests."""
    return dataclasses.replace(
        sched,
        requests=requests,
        num_steps=num_steps,
        finished_request_ids=finished,
        num_batched_tokens=sum(r.num_new_tokens for r in requests),
    )


def _merge(
    sched: SchedulerOutput,
    generated: ModelRunnerOutput | None,
    others: tuple[ScheduledRequest, ...],
    pooled: dict,
    errors: dict,
) -> ModelRunnerOutput:
    """One ``ModelRunnerOutput`` aligned with ``sched.requests`` (pooling rows sample nothing)."""
    if generated is None:
        return ModelRunnerOutput(((),) * len(sched.requests), (), errors, pooled=pooled)
    row = {r.request_id: i for i, r in enumerate(others)}
    tokens = tuple(
        generated.sampled_token_ids[row[r.request_id]] if r.request_id in row else () for r in sched.requests
    )
    logprobs = (
        tuple(generated.logprobs[row[r.request_id]] if r.request_id in row else None for r in sched.requests)
        if generated.logprobs
        else ()
    )
    return ModelRunnerOutput(tokens, logprobs, generated.errors | errors, generated.prompt_logprobs, pooled)
