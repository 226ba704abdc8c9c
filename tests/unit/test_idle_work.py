"""Background work waits for an idle engine: llguidance's tokenizer is built when the core has had
nothing to do for a while, or when a constrained request first needs it, never beside the
loading or busy passes (its thread holds the GIL against them)."""

import multiprocessing
import threading
import time

import torch

from stepserve.engine import core_process
from stepserve.structured.bitmask import GrammarMatchers


def test_the_tokenizer_build_starts_once_and_only_when_asked():
    starts = []

    def start():
        starts.append(time.monotonic())
        return lambda: "built"

    grammars = GrammarMatchers(start, 320, {256}, torch.device("cpu"))
    assert starts == []  # nothing at construction (the engine is still loading)
    grammars.start_tokenizer()
    grammars.start_tokenizer()
    assert len(starts) == 1
    assert grammars.ll_tokenizer() == "built" and len(starts) == 1
    lazy = GrammarMatchers(start, 320, {256}, torch.device("cpu"))
    assert lazy.ll_tokenizer() == "built" and len(starts) == 2  # the first constrained request starts it


class _Core:
    def __init__(self):
        self.work, self.idle_calls = 0, []

    @property
    def has_unfinished(self):
        return self.work > 0

    def step(self):
        self.work -= 1
        return []

    def stats(self):
        return None

    def idle(self):
        self.idle_calls.append(time.monotonic())


def test_the_core_loop_calls_idle_once_after_a_quiet_spell(monkeypatch):
    monkeypatch.setattr(core_process, "_IDLE_POLL_S", 0.01)
    monkeypatch.setattr(core_process, "_IDLE_WORK_AFTER_S", 0.3)
    ours, theirs = multiprocessing.Pipe()
    core = _Core()
    core.work = 50  # busy first: no idle call while it steps
    started = time.monotonic()
    loop = threading.Thread(target=core_process._loop, args=(theirs, core))
    loop.start()
    time.sleep(0.8)
    ours.send(core_process.Shutdown())
    loop.join(5)
    assert not loop.is_alive()
    assert len(core.idle_calls) == 1 and core.idle_calls[0] - started >= 0.3


def test_spare_core_choices_are_checked_at_startup():
    import pytest

    from stepserve.config import ConfigError
    from stepserve.server.config import ServerConfig

    assert ServerConfig(spare_core="off").spare_core == "off"
    with pytest.raises(ConfigError, match="spare_core='always': choose auto, on, off"):
        ServerConfig(spare_core="always")
