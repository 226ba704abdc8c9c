"""The engine core in its own process: outputs cross the pipe, kill -9 is detected, restarts."""

import asyncio
import functools
import os
import signal
import time


from stepserve.config import EngineConfig
from stepserve.core.outputs import EngineCoreRequest
from stepserve.engine.core_process import core_factory, restart_factory
from stepserve.engine.supervisor import RestartPolicy, SupervisedCoreClient
from stepserve.sampling import SamplingParams


def tiny_config(model_dir) -> EngineConfig:
    return EngineConfig.from_kwargs(model=str(model_dir), num_blocks=256, block_size=4, max_model_len=128)


async def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def collect(client, request_id):
    tokens = []
    while True:
        batch = await asyncio.wait_for(client.get_outputs(), 30)
        if batch.engine_error:
            return tokens, batch.engine_error
        for out in batch.outputs:
            if out.request_id == request_id:
                tokens += out.new_token_ids
                if out.finished:
                    return tokens, out.finish_reason


def request(rid, max_tokens=8):
    return EngineCoreRequest(rid, (72, 105), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def test_kill_is_detected_and_the_core_comes_back(tiny_llama):
    async def scenario():
        restarts = []
        client = SupervisedCoreClient(
            core_factory(tiny_config(tiny_llama)), RestartPolicy(backoff_s=0.1), lambda: restarts.append(1)
        )
        await wait_for(lambda: client.is_alive)
        client.add_request(request("a"))
        tokens, reason = await collect(client, "a")
        assert len(tokens) == 8 and reason == "length"
        client.add_request(request("b", 100))
        os.kill(client.core_pid, signal.SIGKILL)
        started = time.monotonic()
        _, error = await collect(client, "b")
        assert "died" in error and time.monotonic() - started < 3
        assert not client.is_alive and client.is_live
        await wait_for(lambda: client.is_alive)
        assert client.restarts == 1 and restarts == [1]
        client.add_request(request("c"))
        tokens_c, reason = await collect(client, "c")
        assert tokens_c == tokens and reason == "length"
        client.shutdown()

    asyncio.run(scenario())


def test_the_first_restart_is_at_once_and_reuses_the_first_cores_kv_size(tiny_llama):
    """A one-off crash costs no backoff wait; the restart is handed the first core's KV cache
    size (on a GPU that spares the memory-profiling pass) and serves the same tokens."""
    config = EngineConfig.from_kwargs(model=str(tiny_llama), block_size=4, max_model_len=128, cpu_kv_cache_gib=0.01)
    handed = []

    def restarts_with(info):
        handed.append(info.num_kv_blocks)
        return restart_factory(config)(info)

    async def scenario():
        client = SupervisedCoreClient(core_factory(config), RestartPolicy(backoff_s=30), restart_factory=restarts_with)
        await wait_for(lambda: client.is_alive)
        first = client.info.num_kv_blocks
        client.add_request(request("a"))
        tokens, _ = await collect(client, "a")
        os.kill(client.core_pid, signal.SIGKILL)
        assert "died" in (await asyncio.wait_for(client.get_outputs(), 10)).engine_error
        await wait_for(lambda: client.is_alive, timeout=25)  # well inside the 30 s backoff
        assert handed == [first] and client.info.num_kv_blocks == first
        client.add_request(request("b"))
        assert (await collect(client, "b"))[0] == tokens
        client.shutdown()

    asyncio.run(scenario())
    reused = restart_factory(config)(type("Info", (), {"num_kv_blocks": 77})())
    assert reused.args[0].cache.num_blocks == 77  # the restart's config; the first one is untouched
    assert config.cache.num_blocks is None


def test_restart_budget_spent_fails_liveness(tiny_llama):
    import faults

    async def scenario():
        client = SupervisedCoreClient(
            functools.partial(faults.short_lived_core, tiny_config(tiny_llama)),
            RestartPolicy(max_restarts=2, backoff_s=0.05),
        )
        assert await asyncio.to_thread(client.wait_started, 60)
        await wait_for(lambda: not client.is_live, timeout=90)
        assert client.restarts == 2 and not client.is_alive
        client.shutdown()

    asyncio.run(scenario())


def test_a_core_that_never_starts_is_not_restarted(tiny_llama):
    import faults

    async def scenario():
        client = SupervisedCoreClient(
            functools.partial(faults.crashing_core, tiny_config(tiny_llama)), RestartPolicy(backoff_s=0.05)
        )
        assert not await asyncio.to_thread(client.wait_started, 60)
        assert not client.is_live and client.restarts == 0
        client.shutdown()

    asyncio.run(scenario())


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as comm:
        return comm.read().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_spare_core_takes_over_after_a_kill_and_a_new_spare_follows(tiny_llama):
    """``spare="on"``: a second process waits with the engine imported; after kill -9 of the core
    it becomes the core (same tokens), a new spare starts once it is ready, and a spare that dies
    while waiting is dropped (the next restart starts a fresh process). Shutdown ends both."""

    async def scenario():
        client = SupervisedCoreClient(core_factory(tiny_config(tiny_llama)), RestartPolicy(backoff_s=0.1), spare="on")
        await wait_for(lambda: client.is_alive and client.spare_pid is not None)
        await wait_for(lambda: _comm(client.spare_pid) == "stepserve-spare")  # once its interpreter is up
        client.add_request(request("a"))
        tokens, _ = await collect(client, "a")
        first_core, spare = client.core_pid, client.spare_pid
        assert spare != first_core
        assert _comm(first_core) == "stepserve-core"  # what `ps` shows
        os.kill(first_core, signal.SIGKILL)
        assert "died" in (await asyncio.wait_for(client.get_outputs(), 10)).engine_error
        await wait_for(lambda: client.is_alive)
        assert client.core_pid == spare and _comm(spare) == "stepserve-core"  # the spare took over
        await wait_for(lambda: client.spare_pid is not None)
        second_spare = client.spare_pid
        assert second_spare not in (first_core, spare)
        client.add_request(request("b"))
        assert (await collect(client, "b"))[0] == tokens

        os.kill(second_spare, signal.SIGKILL)  # a spare dies while waiting: dropped, not a restart
        await wait_for(lambda: client.spare_pid is None)
        assert client.is_alive and client.restarts == 1
        os.kill(client.core_pid, signal.SIGKILL)
        assert "died" in (await asyncio.wait_for(client.get_outputs(), 10)).engine_error
        await wait_for(lambda: client.is_alive)
        assert client.core_pid not in (first_core, spare, second_spare) and client.restarts == 2
        client.add_request(request("c"))
        assert (await collect(client, "c"))[0] == tokens
        await wait_for(lambda: client.spare_pid is not None)
        last_core, last_spare = client.core_pid, client.spare_pid
        client.shutdown()
        await wait_for(lambda: not _alive(last_core) and not _alive(last_spare), timeout=20)

    asyncio.run(scenario())


def test_no_spare_by_default_on_cpu(tiny_llama):
    async def scenario():
        client = SupervisedCoreClient(core_factory(tiny_config(tiny_llama)), RestartPolicy(), spare="auto")
        await wait_for(lambda: client.is_alive)
        await asyncio.sleep(0.5)
        assert client.spare_pid is None  # auto: a spare only for an engine on CUDA
        client.shutdown()

    asyncio.run(scenario())
