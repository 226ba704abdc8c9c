"""Ranks 1..N-1 of a tensor-parallel group: ``python -m stepserve.executor.rank FD``, started by
rank 0 (``distributed/ranks.py``). Each builds its shard of the model with the same builder as
rank 0, then runs every pass rank 0 sends and reports how it went (``tensor_parallel.py``)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from stepserve.distributed.messages import CloseRank, PassDone, PassMessage, RankFailed, RankReady, RankStart, Reseed
from stepserve.executor.builder import build_worker, pick_device
from stepserve.executor.tensor_parallel import PassDecoder, digest


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

    device_type = pick_device(start.config.model.device).type
    if device_type == "cpu":
        set_cpu_threads(start.size)
    else:
        import torch

        torch.cuda.set_device(start.rank)
    init_group(start.rank, start.size, start.store, device_type)
    return build_worker(
        start.config, eos_token_ids=start.eos_token_ids, rank=TensorParallel(start.rank, start.size)
    ).runner


def _serve(conn: Connection, runner) -> None:
    """Run every pass rank 0 sends, report how it went; return when told to close."""
    passes = PassDecoder()
    while True:
        message = conn.recv()
        if isinstance(message, PassMessage):
            try:
                report = PassDone(digest(runner.execute(passes.decode(message))), None)
            except Exception as exc:  # rank 0 raised it too, or the group ends
                report = PassDone(None, type(exc).__name__)
            conn.send(report)
        elif isinstance(message, Reseed):
            runner.reseed(message.seed)
        elif isinstance(message, CloseRank):
            return


def main(fd: int) -> None:
    """Entry point of ranks 1..N-1 (``python -m stepserve.executor.rank FD``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's to handle
    conn = Connection(fd)
    start: RankStart = conn.recv()
    _die_with_parent(start.parent_pid)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[rank {start.rank}]: %(message)s"
    )
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
