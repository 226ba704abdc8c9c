"""``python tests/fault_server.py MODE serve ...``: stepserve serve with a core that fails on
purpose when a prompt starts with faults.POISON_TOKEN. MODE is "step" (an exception inside
EngineCore.step: the core dies) or "request" (a fault in one request's computation). Only
tests use this; the server itself reads nothing of it."""

import functools
import sys

import faults
from stepserve import cli
from stepserve.engine import core_process

if __name__ == "__main__":  # the spawned core re-imports this file as __mp_main__
    mode = sys.argv.pop(1)
    core_process.core_factory = lambda config, **_: functools.partial(faults.faulty_core, config, mode)
    sys.exit(cli.main(sys.argv[1:]))
