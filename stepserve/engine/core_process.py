"""The engine core in its own process (docs/architecture.md, invariant 3).

The front and the core exchange small typed messages over a pipe: the front sends ``AddRequest``
and ``AbortRequests``; the core answers ``CoreReady`` once built, then ``CoreStepOutputs`` (only
new token ids and finishes) after every step. If the core hits a fatal error it sends
``CoreFatal`` with the traceback before exiting; if it is killed, the pipe's EOF says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from stepserve.config import EngineConfig
from stepserve.core.engine_core import EngineCore, EngineStats
from stepserve.core.outputs import EngineCoreOutput, EngineCoreRequest

_IDLE_POLL_S = 0.5  # how long an idle core waits for a command before looking again
_IDLE_WORK_AFTER_S = 5.0  # no work for this long: the core starts its background work (``EngineCore.idle``)


@dataclass(frozen=True)
class AddRequest:
    request: EngineCoreRequest  # resolved by the front


@dataclass(frozen=True)
class AbortRequests:
    request_ids: tuple[str, ...]  # finish these and free their blocks


@dataclass(frozen=True)
class Shutdown:
    """Stop stepping and exit 0."""


@dataclass(frozen=True)
class Build:
    """To a spare core (started with no factory): build the engine with this factory now."""

    factory: CoreFactory


@dataclass(frozen=True)
class CoreReady:
    info: object  # the builder's ModelInfo
    pid: int  # the core's process id
    stats: EngineStats | None = None  # the built core's first snapshot (its KV cache's size, for metrics)


@dataclass(frozen=True)
class CoreStepOutputs:
    outputs: tuple[EngineCoreOutput, ...]  # new tokens and finishes since the last message
    stats: EngineStats  # a snapshot after the step


@dataclass(frozen=True)
class CoreFatal:
    traceback: str  # why the core is exiting


CoreFactory = Callable[[], tuple[EngineCore, object]]  # builds (core, info) inside the core process


def _import_engine(device: str | None) -> None:
    """What a spare core does ahead of time: the engine's imports (PyTorch, Triton, the model
    code) and, for ``device="cuda"``, the CUDA context, so that a restart only builds."""
    import torch

    import stepserve.engine.builder  # noqa: F401 - the import is the work

    if device == "cuda" and torch.cuda.is_available():
        from stepserve.attention import triton_backend  # noqa: F401 - Triton and the kernels' module

        torch.cuda.init()
        torch.empty(1, device="cuda")  # the context itself


def build_core(config: EngineConfig, eos_token_ids: frozenset[int] | None = None) -> tuple[EngineCore, object]:
    from stepserve.engine.builder import build_engine

    core, _tokenizer, info = build_engine(config, eos_token_ids=eos_token_ids)
    return core, info


def core_factory(config: EngineConfig, eos_token_ids: frozenset[int] | None = None) -> CoreFactory:
    """A picklable factory for the spawned process. ``eos_token_ids``, when the front has read
    them, spare the core (and each restart) loading the tokenizer."""
    return functools.partial(build_core, config, eos_token_ids)


def restart_factory(
    config: EngineConfig, eos_token_ids: frozenset[int] | None = None
) -> Callable[[object], CoreFactory]:
    """For the supervisor's restarts: the factory of a core that reuses the first core's KV cache
    size (its ``ModelInfo``), so that a restart skips the memory-profiling pass (seconds on a GPU;
    the model and the device are the same)."""

    def factory(info) -> CoreFactory:
        if config.cache.num_blocks is not None:
            return core_factory(config, eos_token_ids=eos_token_ids)
        cache = dataclasses.replace(config.cache, num_blocks=info.num_kv_blocks)
        return core_factory(dataclasses.replace(config, cache=cache), eos_token_ids=eos_token_ids)

    return factory


def _name_process(name: str) -> None:
    """The process's name in ``ps`` and /proc (``stepserve-core`` or ``stepserve-spare``), so that
    tools and benchmarks can tell the running core from the spare."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass  # not Linux


def core_main(conn, factory: CoreFactory | None, spare_device: str | None = None) -> None:
    """Entry point of the core process. With ``factory=None`` the process is a spare: it imports
    the engine (and makes the CUDA context for ``spare_device="cuda"``), then waits for ``Build``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's to handle
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    from stepserve.distributed.ranks import end_process_on_rank_death  # in the core process only

    end_process_on_rank_death()  # a dead tensor-parallel rank ends this process: the group restarts
    log = logging.getLogger("stepserve")
    if factory is None:
        _name_process("stepserve-spare")
        start = time.monotonic()
        _import_engine(spare_device)
        log.info(
            "spare engine core process %d ready to take over (imports%s in %.1fs)",
            os.getpid(),
            " and the CUDA context" if spare_device == "cuda" else "",
            time.monotonic() - start,
        )
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone
        if not isinstance(message, Build):
            os._exit(0)  # Shutdown
        factory = message.factory
        _name_process("stepserve-core")
        log.info("engine core process %d (the spare) taking over; building the engine", os.getpid())
    else:
        _name_process("stepserve-core")
        log.info("engine core process %d started; building the engine", os.getpid())
    try:
        core, info = factory()
        conn.send(CoreReady(info, os.getpid(), core.stats()))
        _loop(conn, core)
        _close_kv_events(core)
    except BaseException:  # noqa: BLE001 - the sentinel must go out whatever happened
        try:
            conn.send(CoreFatal(traceback.format_exc()))
        finally:
            os._exit(1)
    os._exit(0)


def _loop(conn, core: EngineCore) -> None:
    busy_at, idle_called = time.monotonic(), False
    while True:
        outputs: list[EngineCoreOutput] = []
        wait = 0 if core.has_unfinished else _IDLE_POLL_S
        while conn.poll(wait):
            message = conn.recv()
            if isinstance(message, Shutdown):
                return
            outputs.extend(_apply(core, message))
            wait = 0
        if core.has_unfinished:
            outputs.extend(core.step())
            busy_at = time.monotonic()
        elif not idle_called and time.monotonic() - busy_at >= _IDLE_WORK_AFTER_S:
            core.idle()
            idle_called = True
        if outputs:
            conn.send(CoreStepOutputs(tuple(outputs), core.stats()))


def _close_kv_events(core: EngineCore) -> None:
    """On a clean shutdown, send the KV events still queued before the process exits."""
    shutdown = getattr(core.kv_events, "shutdown", None)
    if shutdown is not None:
        shutdown()


def _apply(core: EngineCore, message) -> list[EngineCoreOutput]:
    if isinstance(message, AbortRequests):
        return core.abort(message.request_ids)
    try:
        core.add_request(message.request)
    except Exception as exc:  # the front validated it; still, one bad request fails alone
        return [EngineCoreOutput(message.request.request_id, (), finish_reason="abort", error=str(exc))]
    return []
