"""Rank 0's view of the other ranks: their processes, their sockets, and the watchdog that
ends the group when one of them dies.

The ranks are plain subprocesses (``python -m stepserve.distributed.worker FD``), not
multiprocessing children: the engine core is itself a daemonic multiprocessing child, which may
not have any. Each talks to rank 0 over one end of a socket pair; the tensors of the forward
pass go over torch.distributed. A rank dies with rank 0 (``PR_SET_PDEATHSIG``, and the EOF of
its socket), and rank 0's watchdog sees a rank die at once, so no rank outlives its group.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from stepserve.core.engine_core import EngineFaultError
from stepserve.distributed.messages import CloseRank, PassDone, RankFailed, RankReady, RankStart

log = logging.getLogger("stepserve.distributed")

_CLOSE_WAIT_S = 10.0  # how long a closing rank may take to exit before it is killed

# Set in the engine core process (``end_process_on_rank_death``): there, a dead rank ends the
# whole process at once, so the supervisor restarts the group even while rank 0 is blocked
# inside a collective. In-process engines (the offline ``LLM``) get an error on their next pass.
_EXIT_ON_RANK_DEATH = False


def end_process_on_rank_death() -> None:
    """Called by the engine core process before it builds the engine."""
    global _EXIT_ON_RANK_DEATH
    _EXIT_ON_RANK_DEATH = True


class RankProcesses:
    """Ranks 1..size-1 of one group: started together, watched together, ended together."""

    def __init__(self, config, eos_token_ids: frozenset[int], size: int) -> None:
        self.size = size
        self.store_dir = Path(tempfile.mkdtemp(prefix="stepserve-tp-"))
        self.store = str(self.store_dir / "store")  # torch.distributed's FileStore rendezvous
        self.conns: list[Connection] = []
        self.processes: list[subprocess.Popen] = []
        self.dead: str | None = None  # why the group is broken, once it is
        self._closing = False
        for rank in range(1, size):
            self._spawn(RankStart(config, eos_token_ids, rank, size, self.store, os.getpid()))
        for rank, process in enumerate(self.processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"stepserve-rank{rank}-watch", daemon=True).start()

    def _spawn(self, start: RankStart) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "stepserve.distributed.worker", str(theirs.fileno())]
        self.processes.append(subprocess.Popen(command, pass_fds=(theirs.fileno(),)))
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(start)
        self.conns.append(conn)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def wait_ready(self) -> None:
        """Block until every rank has built its shard; a rank that failed is a startup error."""
        for rank, conn in enumerate(self.conns, start=1):
            message = self._recv(rank, conn)
            if isinstance(message, RankFailed):
                self.close()
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{message.traceback.rstrip()}")
            if not isinstance(message, RankReady):
                raise EngineFaultError(f"tensor-parallel rank {rank} sent {type(message).__name__} while starting")

    def broadcast(self, message) -> None:
        """Send one message to every rank (a scheduler pass, a reseed)."""
        self._check_alive()
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(message)
            except OSError as exc:
                raise EngineFaultError(f"tensor-parallel rank {rank} is unreachable: {exc}") from None

    def gather(self) -> list[PassDone]:
        """Each rank's report of the pass just broadcast."""
        return [self._recv(rank, conn) for rank, conn in enumerate(self.conns, start=1)]

    def _recv(self, rank: int, conn: Connection):
        try:
            return conn.recv()
        except (EOFError, OSError):
            self._check_alive()
            raise EngineFaultError(f"tensor-parallel rank {rank} closed its connection") from None

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineFaultError(self.dead)

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if self._closing:
            return
        self.dead = f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}; the group is ended"
        log.error("%s", self.dead)
        self._kill_all()
        if _EXIT_ON_RANK_DEATH:
            os._exit(1)  # the supervisor sees the core exit and restarts the whole group

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """End every rank (politely, then by force) and remove the rendezvous files."""
        if self._closing:
            return
        self._closing = True
        for conn in self.conns:
            try:
                conn.send(CloseRank())
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(_CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)
