"""The worker of a tensor-parallel engine: on rank 0, ``TensorParallelWorker`` sends each
scheduler pass to the other ranks and runs it too; ranks 1..N-1 run ``main``'s loop.

Every rank runs the same ``ModelRunner.execute`` on the same ``SchedulerOutput``: the same
forward (joined by the all-reduces), the same logits (the LM head is replicated and its input is
the all-reduced hidden state), so the same sampled tokens from generators seeded alike. That is
what multi-step needs: each rank feeds its own sampled tokens into the next step, with no
broadcast per step. Rank 0 checks it after every pass: each rank reports a hash of its tokens
(or the type of the exception its pass raised), and ranks that disagree end the group, because
their KV caches no longer hold the same sequences.
"""

from __future__ import annotations

import dataclasses
import logging

from stepserve.core.engine_core import EngineFaultError
from stepserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from stepserve.distributed.messages import PassDone, PassMessage, Reseed
from stepserve.distributed.ranks import RankProcesses

log = logging.getLogger("stepserve.distributed")


def digest(output: ModelRunnerOutput) -> int:
    return hash(output.sampled_token_ids)  # ints and tuples hash alike in every process


class PassEncoder:
    """Rank 0's side of ``PassMessage``: how many tokens of each request the ranks hold (and
    so whether they have its params)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def encode(self, sched: SchedulerOutput) -> PassMessage:
        for request_id in sched.finished_request_ids:
            self.sent.pop(request_id, None)
        requests, offsets = [], []
        for r in sched.requests:
            have = self.sent.get(r.request_id, 0)
            # A request's params never change: sent with its first pass only.
            requests.append(
                dataclasses.replace(r, token_ids=tuple(r.token_ids[have:]), params=None if have else r.params)
            )
            offsets.append(have)
            self.sent[r.request_id] = len(r.token_ids)  # a request's tokens only ever grow
        return PassMessage(dataclasses.replace(sched, requests=tuple(requests)), tuple(offsets))


class PassDecoder:
    """The other ranks' side: each request's tokens so far, rebuilt from the new ones."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.params: dict[str, object] = {}  # each request's SamplingParams, from its first pass

    def decode(self, message: PassMessage) -> SchedulerOutput:
        sched = message.sched
        for request_id in sched.finished_request_ids:
            self.tokens.pop(request_id, None)
            self.params.pop(request_id, None)
        requests = []
        for r, have in zip(sched.requests, message.offsets):
            tokens = self.tokens.setdefault(r.request_id, [])
            if len(tokens) != have:  # never expected: both sides apply the same passes in order
                raise EngineFaultError(
                    f"request {r.request_id}: this rank holds {len(tokens)} tokens, rank 0 sent from {have}"
                )
            tokens.extend(r.token_ids)
            if have == 0:
                self.params[r.request_id] = r.params
            requests.append(dataclasses.replace(r, token_ids=tokens, params=self.params[r.request_id]))
        return dataclasses.replace(sched, requests=tuple(requests))


def check_agreement(reports: list[PassDone], output: ModelRunnerOutput | None, error: Exception | None) -> None:
    """After a pass: ranks that agree with rank 0 let it return its output (or re-raise its
    exception, which the core handles as that pass's failure); a rank that disagrees means the
    group is broken, and the core must end."""
    mine = "completed it" if error is None else f"raised {type(error).__name__}"
    mine_digest = None if output is None else digest(output)
    for rank, report in enumerate(reports, start=1):
        theirs = "completed it" if report.error is None else f"raised {report.error}"
        if theirs != mine:
            raise EngineFaultError(
                f"tensor-parallel ranks disagree on a pass: rank {rank} {theirs}, rank 0 {mine}; the group is ended"
            )
        if report.digest != mine_digest:
            raise EngineFaultError(f"tensor-parallel rank {rank} sampled other tokens than rank 0; the group is ended")
    if error is not None:
        raise error


class TensorParallelWorker:
    """Rank 0's worker: what the engine core drives in place of the bare ``ModelRunner``."""

    def __init__(self, runner, ranks: RankProcesses) -> None:
        self.runner = runner
        self.ranks = ranks
        self.encoder = PassEncoder()

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def rank_pids(self) -> list[int]:
        return self.ranks.pids

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.ranks.in_pass = True  # before the ranks can answer: see RankProcesses._read
        try:
            self.ranks.broadcast(self.encoder.encode(sched))
            output, error = self._run_here(sched)
        finally:
            self.ranks.in_pass = False
        check_agreement(self.ranks.gather(), output, error)
        return output

    def _run_here(self, sched: SchedulerOutput) -> tuple[ModelRunnerOutput | None, Exception | None]:
        try:
            return self.runner.execute(sched), None
        except Exception as exc:  # reported after the other ranks say how their pass went
            return None, exc

    def reseed(self, seed: int) -> None:
        self.ranks.broadcast(Reseed(seed))
        self.runner.reseed(seed)

    def close(self) -> None:
        """End the other ranks and leave the process group (an in-process engine's shutdown)."""
        import torch.distributed as dist

        self.ranks.close()
        if dist.is_initialized():
            dist.destroy_process_group()
