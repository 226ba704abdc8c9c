"""Rank 0's view of the other ranks: their processes, their sockets, and the watchdog that
ends the group when one of them dies.

The ranks are plain subprocesses (``python -m stepserve.executor.rank FD``), not
multiprocessing children: the engine core is itself a daemonic multiprocessing child, which may
not have any. Each talks to rank 0 over one end of a socket pair; the tensors of the forward
pass go over torch.distributed. A rank dies with rank 0 (``PR_SET_PDEATHSIG``, and the EOF of
its socket), and rank 0's watchdog sees a rank die at once, so no rank outlives its group.
"""

from __future__ import annotations

import logging
import os
import queue
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
# A rank whose pass raised while rank 0's is still running failed before a collective rank 0
# waits in (an error on one rank only: out of memory, say); an error every rank hits alike
# (a bad request) ends every rank's pass within moments. Past this, the group is ended instead
# of waiting out the collective's timeout.
_STRAY_ERROR_GRACE_S = 5.0
_EOF = object()  # a reader's last message: its rank's socket closed

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
        self.inbox: list[queue.Queue] = []  # per rank: its messages, read by a thread as they come
        self.dead: str | None = None  # why the group is broken, once it is
        self.in_pass = False  # rank 0 is running a pass (set by the worker)
        self._closing = False
        for rank in range(1, size):
            self._spawn(RankStart(config, eos_token_ids, rank, size, self.store, os.getpid()))
        for rank, (process, conn) in enumerate(zip(self.processes, self.conns), start=1):
            self.inbox.append(queue.Queue())
            threading.Thread(
                target=self._watch, args=(rank, process), name=f"stepserve-rank{rank}-watch", daemon=True
            ).start()
            threading.Thread(
                target=self._read, args=(rank, conn), name=f"stepserve-rank{rank}-read", daemon=True
            ).start()

    def _spawn(self, start: RankStart) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "stepserve.executor.rank", str(theirs.fileno())]
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
        for rank in range(1, self.size):
            message = self._recv(rank)
            if isinstance(message, RankFailed):
                self.close()
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{message.traceback.rstrip()}")
            if not isinstance(message, RankReady):
                raise EngineFaultError(f"tensor-parallel rank {rank} sent {type(message).__name__} while starting")
        shutil.rmtree(self.store_dir, ignore_errors=True)  # every rank has met: the rendezvous is over

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
        return [self._recv(rank) for rank in range(1, self.size)]

    def _recv(self, rank: int):
        message = self.inbox[rank - 1].get()
        if message is _EOF:
            self._check_alive()
            raise EngineFaultError(f"tensor-parallel rank {rank} closed its connection")
        return message

    def _read(self, rank: int, conn: Connection) -> None:
        """Move a rank's messages into its inbox; an error report that comes while rank 0 is
        still inside the pass starts the stray-error clock."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self.inbox[rank - 1].put(_EOF)
                return
            self.inbox[rank - 1].put(message)
            if isinstance(message, PassDone) and message.error is not None and self.in_pass:
                timer = threading.Timer(_STRAY_ERROR_GRACE_S, self._stray_error, args=(rank, message.error))
                timer.daemon = True
                timer.start()

    def _stray_error(self, rank: int, error: str) -> None:
        if self.in_pass and self.inbox[rank - 1].qsize() and not self._closing:
            self._end(
                f"tensor-parallel rank {rank} raised {error} while rank 0 is "
                "still in the pass (waiting in a collective); the group is ended"
            )

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineFaultError(self.dead)

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._closing:
            self._end(f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}; the group is ended")

    def _end(self, why: str) -> None:
        """The group is broken: every rank is killed (rank 0 blocked in a collective with them
        gets an error), and in the engine core process the process ends at once."""
        if self.dead is not None:
            return
        self.dead = why
        log.error("%s", why)
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
        self.in_pass = False
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
