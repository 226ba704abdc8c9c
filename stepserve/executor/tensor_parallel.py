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
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from stepserve.core.engine_core import EngineFaultError
from stepserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from stepserve.distributed.messages import CloseRank, PassDone, PassMessage, RankFailed, RankReady, RankStart, Reseed
from stepserve.distributed.ranks import RankProcesses

log = logging.getLogger("stepserve.distributed")


def _digest(output: ModelRunnerOutput) -> int:
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
            requests.append(dataclasses.replace(r, token_ids=tuple(r.token_ids[have:]), params=None if have else r.params))
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
                raise EngineFaultError(f"request {r.request_id}: this rank holds {len(tokens)} tokens, rank 0 sent from {have}")
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
    digest = None if output is None else _digest(output)
    for rank, report in enumerate(reports, start=1):
        theirs = "completed it" if report.error is None else f"raised {report.error}"
        if theirs != mine:
            raise EngineFaultError(f"tensor-parallel ranks disagree on a pass: rank {rank} {theirs}, rank 0 {mine}; the group is ended")
        if report.digest != digest:
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


# -- ranks 1..N-1 ------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Exit when rank 0 does, even if it is killed: the kernel's parent-death signal where
    there is one (Linux), and a watcher thread in any case."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # rank 0 died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="stepserve-parent-watch", daemon=True).start()


def _build(start: RankStart):
    from stepserve.distributed.group import TensorParallel, init_group, set_cpu_threads
    from stepserve.executor.builder import build_worker, pick_device

    device_type = pick_device(start.config.model.device).type
    if device_type == "cpu":
        set_cpu_threads(start.size)
    else:
        import torch

        torch.cuda.set_device(start.rank)
    init_group(start.rank, start.size, start.store, device_type)
    return build_worker(start.config, eos_token_ids=start.eos_token_ids, rank=TensorParallel(start.rank, start.size)).runner


def _serve(conn: Connection, runner) -> None:
    """Run every pass rank 0 sends, report how it went; return when told to close."""
    passes = PassDecoder()
    while True:
        message = conn.recv()
        if isinstance(message, PassMessage):
            try:
                report = PassDone(_digest(runner.execute(passes.decode(message))), None)
            except Exception as exc:  # rank 0 raised it too, or the group ends
                report = PassDone(None, type(exc).__name__)
            conn.send(report)
        elif isinstance(message, Reseed):
            runner.reseed(message.seed)
        elif isinstance(message, CloseRank):
            return


def main(fd: int) -> None:
    """Entry point of ranks 1..N-1 (``python -m stepserve.executor.tensor_parallel FD``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's to handle
    conn = Connection(fd)
    start: RankStart = conn.recv()
    _die_with_parent(start.parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[rank {start.rank}]: %(message)s")
    try:
        runner = _build(start)
    except BaseException:  # noqa: BLE001 - rank 0 must hear why
        conn.send(RankFailed(start.rank, traceback.format_exc()))
        os._exit(1)
    conn.send(RankReady(start.rank, os.getpid()))
    try:
        _serve(conn, runner)
    except (EOFError, OSError):
        os._exit(1)  # rank 0 is gone
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
