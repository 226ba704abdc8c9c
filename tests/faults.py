"""Test-only core factories for the spawned engine process: they wrap the real worker so that a
chosen request (or every pass) raises. Production code never reads these."""

from stepserve.config import EngineConfig
from stepserve.engine.core_process import build_core

POISON_TOKEN = 66  # "B" in the tiny byte tokenizer: a prompt starting with it is poisoned


class FaultyWorker:
    def __init__(self, worker, mode: str):
        self.worker, self.mode = worker, mode

    def execute(self, sched):
        if self.mode == "step" and any(r.token_ids[0] == POISON_TOKEN for r in sched.requests):
            raise RuntimeError("injected engine fault in step()")
        if self.mode == "request" and any(r.token_ids[0] == POISON_TOKEN for r in sched.requests):
            raise ValueError("injected fault in one request")
        return self.worker.execute(sched)


def faulty_core(config: EngineConfig, mode: str):
    core, info = build_core(config)
    core.worker = FaultyWorker(core.worker, mode)
    if mode == "step":
        # A fault in step() itself, outside any one request: the core must die and come back.
        step = core.step

        def broken_step():
            if any(r.token_ids[0] == POISON_TOKEN for r in core.scheduler.running + list(core.scheduler.waiting)):
                raise RuntimeError("injected exception in EngineCore.step")
            return step()

        core.step = broken_step
    return core, info


def crashing_core(config: EngineConfig):
    raise RuntimeError("injected failure while building the engine")


def short_lived_core(config: EngineConfig, seconds: float = 0.5):
    """A core that comes up, then its process dies on its own shortly after."""
    import os
    import threading

    core, info = build_core(config)
    threading.Timer(seconds, os._exit, (1,)).start()
    return core, info
