"""Runs the engine core in its own process and brings it back when it dies (docs/architecture.md, invariant 3).

``SupervisedCoreClient`` is a ``CoreClient``: the async front cannot tell it from the in-thread
client. Death is detected two ways: the ``CoreFatal`` sentinel the core sends from its error
handler, and the pipe's EOF when the process is gone (kill -9, OOM). On death every in-flight
request fails at once (one ``engine_error`` batch), readiness turns false, and a restart is
scheduled (the first at once, then with exponential backoff). A restart reuses what the first
core learned where the caller says how (``restart_factory``: the KV cache's size, so that it skips
the memory-profiling pass). With a spare (``spare="on"``, or ``"auto"`` on CUDA) a second process
waits beside the running core with the engine imported and its CUDA context made; a restart hands
it the factory, so it only builds (weights, graphs), and a new spare starts once it is ready.
When the restart budget is spent, liveness fails too and Kubernetes takes over.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stepserve.config import SPARE_CORE_CHOICES
from stepserve.core.engine_core import EngineStats
from stepserve.core.outputs import EngineCoreRequest
from stepserve.engine.core_client import CoreOutputs
from stepserve.engine.core_process import (
    AbortRequests,
    AddRequest,
    Build,
    CoreFactory,
    CoreFatal,
    CoreReady,
    CoreStepOutputs,
    Shutdown,
    core_main,
)
from stepserve.errors import EngineDeadError

log = logging.getLogger("stepserve.supervisor")

EMPTY_STATS = EngineStats(0, 0, 0.0, 0, 0, 0)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # restarts allowed before liveness fails
    backoff_s: float = 1.0  # wait before the second restart (the first is at once); doubled for each one after
    max_backoff_s: float = 30.0  # the longest wait between restarts


class _CoreProcess:
    """One spawned core and the thread that reads its pipe; with ``factory=None`` a spare that
    waits for ``Build``."""

    def __init__(
        self, factory: CoreFactory | None, on_message: Callable, on_exit: Callable, spare_device: str | None = None
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        name = "stepserve-core" if factory is not None else "stepserve-spare"  # as /proc/PID/comm shows them
        self.process = ctx.Process(target=core_main, args=(child, factory, spare_device), name=name, daemon=True)
        self.process.start()
        child.close()
        self._on_message, self._on_exit = on_message, on_exit
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="stepserve-core-reader", daemon=True)
        self._reader.start()

    def send(self, message) -> None:
        with self._lock:
            self.conn.send(message)

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.send(Shutdown())
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _read(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                self._on_message(self, message)
                if isinstance(message, CoreFatal):
                    break
        except (EOFError, OSError):
            pass  # the process is gone
        self.process.join(10)
        self._on_exit(self, self.process.exitcode)


class SupervisedCoreClient:
    """A ``CoreClient`` over a core process that is restarted when it dies.

    Must be created inside the running event loop.
    """

    def __init__(
        self,
        factory: CoreFactory,
        policy: RestartPolicy = RestartPolicy(),
        on_restart: Callable[[], None] | None = None,
        restart_factory: Callable[[object], CoreFactory] | None = None,
        spare: str = "off",
    ) -> None:
        if spare not in SPARE_CORE_CHOICES:
            raise ValueError(f"spare={spare!r}: choose one of {', '.join(SPARE_CORE_CHOICES)}")
        self._factory = factory
        self._spare_mode = spare
        self._spare: _CoreProcess | None = None  # a process waiting to take over, or None
        # Given the first core's ModelInfo, the factory for restarts (None: the same factory).
        self._restart_factory = restart_factory
        self.policy = policy
        self._on_restart = on_restart
        self._loop = asyncio.get_running_loop()
        self._outputs: asyncio.Queue[CoreOutputs] = asyncio.Queue()
        self._stats = EMPTY_STATS
        self._state = "starting"  # starting, ready, restarting, failed, stopped
        self.restarts = 0
        self.info = None
        self.core_pid: int | None = None
        self.ready = threading.Event()
        self._core = self._spawn()

    # -- CoreClient ----------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        if self._state != "ready":
            raise EngineDeadError("the engine is restarting")
        try:
            self._core.send(AddRequest(request))
        except OSError as exc:
            raise EngineDeadError(f"the engine is not reachable: {exc}") from None

    def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids and self._state == "ready":
            try:
                self._core.send(AbortRequests(tuple(request_ids)))
            except OSError:
                pass  # a dead core holds no blocks

    async def get_outputs(self) -> CoreOutputs:
        return await self._outputs.get()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_alive(self) -> bool:
        """Readiness: a core is up and taking requests."""
        return self._state == "ready"

    @property
    def is_live(self) -> bool:
        """Liveness: false only once the restart budget is spent."""
        return self._state != "failed"

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until the first core is ready (True) or failed to start (False)."""
        self.ready.wait(timeout)
        return self._state == "ready"

    def shutdown(self) -> None:
        self._state = "stopped"
        spare, self._spare = self._spare, None
        self._core.stop()
        if spare is not None:
            spare.stop()

    @property
    def spare_pid(self) -> int | None:
        """The waiting spare core's process id, or None."""
        spare = self._spare
        return spare.process.pid if spare is not None else None

    # -- the core's side (reader threads) ------------------------------------------------

    def _spawn(self) -> _CoreProcess:
        self.ready.clear()
        factory = self._factory
        if self.restarts and self.info is not None and self._restart_factory is not None:
            factory = self._restart_factory(self.info)
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                spare.send(Build(factory))
                log.info("the spare engine core (pid %d) takes over", spare.process.pid)
                return spare
            except OSError:
                log.warning("the spare engine core (pid %d) is gone; starting a new process", spare.process.pid)
        return _CoreProcess(factory, self._on_message, self._on_exit)

    def _start_spare(self, device: str) -> None:
        if self._state == "stopped" or self._spare is not None or self._spare_mode == "off":
            return
        if self._spare_mode == "auto" and device != "cuda":
            return
        self._spare = _CoreProcess(None, self._on_message, self._on_exit, spare_device=device)

    def _on_message(self, proc: _CoreProcess, message) -> None:
        if proc is not self._core:
            return
        if isinstance(message, CoreStepOutputs):
            self._stats = message.stats
            self._publish(CoreOutputs(message.outputs))
        elif isinstance(message, CoreReady):
            self.info, self.core_pid = message.info, message.pid
            if message.stats is not None:
                self._stats = message.stats
            if self._state != "stopped":
                self._state = "ready"
            self.ready.set()
            log.info("engine core ready (pid %d, restarts so far: %d)", message.pid, self.restarts)
            self._start_spare(getattr(message.info, "device", "cpu"))
        elif isinstance(message, CoreFatal):
            log.error("engine core failed (pid %s):\n%s", self.core_pid, message.traceback.rstrip())

    def _on_exit(self, proc: _CoreProcess, exitcode: int | None) -> None:
        if proc is self._spare:
            self._spare = None  # a new one starts when the running core is next ready
            if self._state != "stopped":
                log.warning("the spare engine core (pid %s) exited with code %s", proc.process.pid, exitcode)
            return
        if proc is not self._core or self._state == "stopped":
            return
        was_starting = self._state == "starting"
        self._state = "restarting"
        self._stats = EMPTY_STATS
        log.error("engine core (pid %s) exited with code %s; failing in-flight requests", self.core_pid, exitcode)
        self._publish(CoreOutputs((), engine_error="the engine core died and is restarting; retry shortly"))
        if was_starting and self.info is None:
            # It never came up: a configuration or model problem that a restart cannot fix.
            self._state = "failed"
            log.critical("the engine core failed before it was ever ready; not restarting")
            self.ready.set()
            return
        # The first restart is at once (a one-off crash costs no wait); a crash loop backs off.
        delay = (
            0.0
            if self.restarts == 0
            else min(self.policy.backoff_s * 2 ** (self.restarts - 1), self.policy.max_backoff_s)
        )
        timer = threading.Timer(delay, self._restart)
        timer.daemon = True
        timer.start()

    def _restart(self) -> None:
        if self._state == "stopped":
            return
        if self.restarts >= self.policy.max_restarts:
            self._state = "failed"
            log.critical("engine restart budget (%d) spent: liveness now fails", self.policy.max_restarts)
            return
        self.restarts += 1
        log.warning("restarting the engine core (restart %d of %d)", self.restarts, self.policy.max_restarts)
        if self._on_restart is not None:
            self._loop.call_soon_threadsafe(self._on_restart)
        self._state = "starting"
        self._core = self._spawn()

    def _publish(self, batch: CoreOutputs) -> None:
        try:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, batch)
        except RuntimeError:
            pass  # the event loop closed during shutdown
