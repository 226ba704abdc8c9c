"""The front's handle on the engine core: add, abort, outputs, stats.

``CoreClient`` is the whole boundary the async front sees. ``ThreadCoreClient`` runs the
``EngineCore`` in a background thread of this process; a client that runs the core in its own
process (docs/architecture.md, invariant 3) implements the same four calls, and nothing above it changes.

Thread safety: the front never touches the core. It puts commands on a queue that the engine
thread applies between steps, and the engine thread hands each step's outputs back to the
event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from stepserve.core.engine_core import EngineCore, EngineStats
from stepserve.core.outputs import EngineCoreOutput, EngineCoreRequest

log = logging.getLogger("stepserve.engine")

_IDLE_WAIT_S = 0.5  # how long the idle engine thread blocks on its command queue


@dataclass(frozen=True)
class CoreOutputs:
    """One batch of outputs from the core, in the order it produced them."""

    outputs: tuple[EngineCoreOutput, ...]  # new tokens and finishes of this step
    engine_error: str | None = None  # set once when the core died: every request in flight fails


class CoreClient(Protocol):
    """What the async front needs from an engine core, wherever it runs."""

    def add_request(self, request: EngineCoreRequest) -> None: ...

    def abort(self, request_ids: Sequence[str]) -> None: ...

    async def get_outputs(self) -> CoreOutputs: ...

    def stats(self) -> EngineStats: ...

    @property
    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class _Add:
    request: EngineCoreRequest  # a resolved request for the core


@dataclass(frozen=True)
class _Abort:
    request_ids: tuple[str, ...]  # requests to finish and free


class ThreadCoreClient:
    """Steps an ``EngineCore`` in a daemon thread; must be created inside the event loop."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._outputs: asyncio.Queue[CoreOutputs] = asyncio.Queue()
        self._stats = core.stats()
        self._alive = True
        self._thread = threading.Thread(target=self._run, name="stepserve-engine", daemon=True)
        self._thread.start()

    # -- the front's side ----------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        self._commands.put(_Add(request))

    def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            self._commands.put(_Abort(tuple(request_ids)))

    async def get_outputs(self) -> CoreOutputs:
        return await self._outputs.get()

    def stats(self) -> EngineStats:
        return self._stats  # a snapshot the engine thread replaces after each iteration

    @property
    def is_alive(self) -> bool:
        return self._alive

    def shutdown(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=5)

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self._core.has_unfinished):
                outputs = self._core.step() if self._core.has_unfinished else []
                self._stats = self._core.stats()
                self._publish(CoreOutputs(tuple(outputs)))
        except Exception:  # the core is broken: fail everything in flight, loudly, once
            log.error("engine core died:\n%s", traceback.format_exc())
            self._alive = False
            self._publish(CoreOutputs((), engine_error="the engine core died; see the server log"))

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; False once shutdown was asked for."""
        outputs: list[EngineCoreOutput] = []
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                if command is None:
                    return False
                outputs.extend(self._apply(command))
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if outputs:
            self._publish(CoreOutputs(tuple(outputs)))
        return True

    def _apply(self, command: _Add | _Abort) -> list[EngineCoreOutput]:
        if isinstance(command, _Abort):
            return self._core.abort(command.request_ids)
        try:
            self._core.add_request(command.request)
        except Exception as exc:  # the front validated it; still, one bad request fails alone
            log.exception("engine refused request %s", command.request.request_id)
            return [EngineCoreOutput(command.request.request_id, (), finish_reason="abort", error=str(exc))]
        return []

    def _publish(self, batch: CoreOutputs) -> None:
        if not (batch.outputs or batch.engine_error):
            return
        try:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, batch)
        except RuntimeError:  # the event loop closed while the server shut down
            pass
