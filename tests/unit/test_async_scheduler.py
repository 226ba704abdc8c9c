"""Asynchronous scheduling with a pure-Python worker: the core schedules and submits pass k+1
before pass k's results are back, and every request's tokens and finish reason are exactly what
the synchronous loop gives (stops inside multi-step windows, max_tokens, preemption, aborts, a
failing pass). Nothing here imports torch."""

import random

import pytest

from stepserve.config import SchedulerConfig
from stepserve.core.block_manager import BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.outputs import EngineCoreRequest, ModelRunnerOutput
from stepserve.core.request import PLACEHOLDER
from stepserve.core.scheduler import Scheduler
from stepserve.sampling import SamplingParams

EOS = 0
POISON = 49  # a prompt starting with it makes collecting its pass raise (once per pass)


def next_token(last: int, position: int) -> int:
    """Deterministic in (last token, position), like greedy decoding: stops land at varied offsets."""
    return (last * 7 + position * 3 + 1) % 50


class SyncWorker:
    """Computes each pass at once; records the order of calls."""

    def __init__(self, log=None):
        self.log = log if log is not None else []
        self.last = {}  # request id -> (tokens of its last pass)

    def _run(self, sched):
        out = []
        for r in sched.requests:
            if not r.sample:
                out.append(())
                continue
            pos = r.start + r.num_new_tokens - 1
            last = r.token_ids[pos]
            if last == PLACEHOLDER:  # only an asynchronous core sends these
                last = self._resolve(r)
            tokens = []
            for _ in range(sched.num_steps):
                last = next_token(last, pos)
                pos += 1
                tokens.append(last)
            out.append(tuple(tokens))
        return out

    def _resolve(self, r):
        tokens, steps = self.last[r.request_id]
        return tokens[steps - 1]

    def _remember(self, sched, out):
        self.last = {r.request_id: (t, r.num_steps) for r, t in zip(sched.requests, out) if r.sample}

    def execute(self, sched):
        self.log.append("execute")
        out = self._run(sched)
        self._remember(sched, out)
        return ModelRunnerOutput(tuple(out))


class AsyncWorker(SyncWorker):
    """``submit`` computes the pass (a placeholder input is the last token the previous
    submitted pass sampled for that request) and ``collect`` hands it back later."""

    def __init__(self, log=None, poison=False):
        super().__init__(log)
        self.poison = poison

    def submit(self, sched):
        self.log.append("submit")
        # A request whose last tokens are in flight is not scheduled again (it would have no step left).
        assert all(r.num_steps >= 1 for r in sched.requests), [r.num_steps for r in sched.requests]
        out = self._run(sched)
        self._remember(sched, out)
        return sched, out

    def collect(self, handle):
        self.log.append("collect")
        sched, out = handle
        if self.poison and any(r.token_ids[0] == POISON for r in sched.requests):
            raise RuntimeError("injected fault while collecting")
        return ModelRunnerOutput(tuple(out))

    def execute(self, sched):  # the synchronous path of a rerun
        self.log.append("execute")
        if self.poison and any(r.token_ids[0] == POISON for r in sched.requests):
            raise ValueError("injected fault in one request")
        out = self._run(sched)
        self._remember(sched, out)
        return ModelRunnerOutput(tuple(out))


def make_core(asynchronous, num_blocks=64, block_size=4, max_model_len=96, poison=False, **sched):
    worker = AsyncWorker(poison=poison) if asynchronous else SyncWorker()
    scheduler = Scheduler(SchedulerConfig(**sched), BlockManager(num_blocks, block_size), max_model_len, {EOS})
    return EngineCore(scheduler, worker, async_scheduling=asynchronous), worker


def workload(seed=0, count=10):
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(1, 49) for _ in range(rng.randrange(1, 20))]
        kw = {}
        if i % 3 == 0:
            kw["ignore_eos"] = True
        if i % 4 == 1:
            kw["stop_token_ids"] = (rng.randrange(1, 50),)
        requests.append((f"r{i}", prompt, rng.randrange(1, 40), kw))
    return requests


def run(core, requests, abort_at=None):
    """Drive the core to the end; ``abort_at``: {step number: [request ids]}."""
    for rid, prompt, max_tokens, kw in requests:
        core.add_request(EngineCoreRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, **kw)))
    results, step = {}, 0
    while core.has_unfinished:
        outs = core.step()
        for rid in (abort_at or {}).get(step, ()):
            outs += core.abort([rid])
        step += 1
        for out in outs:
            tokens, _ = results.get(out.request_id, ([], None))
            results[out.request_id] = (tokens + list(out.new_token_ids), out.finish_reason)
    return results


CONFIGS = [
    dict(num_scheduler_steps=1),
    dict(num_scheduler_steps=4),
    dict(num_scheduler_steps=8, adaptive_steps=False),
    dict(num_scheduler_steps=8, max_num_batched_tokens=16),  # chunked prefill beside decode rows
    dict(num_scheduler_steps=3, max_num_seqs=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_async_gives_the_synchronous_tokens(config, seed):
    requests = workload(seed)
    sync_core, _ = make_core(False, **config)
    async_core, worker = make_core(True, **config)
    expected = run(sync_core, requests)
    assert run(async_core, requests) == expected
    # The overlap happened: a pass was submitted while the one before was not collected yet.
    assert any(a == b == "submit" for a, b in zip(worker.log, worker.log[1:]))
    assert "execute" not in worker.log
    for rid, prompt, max_tokens, kw in requests:
        tokens, reason = expected[rid]
        assert len(tokens) <= max_tokens  # invariant 4
        assert reason in ("stop", "length")
    assert (
        async_core.stats().kv_cache_usage == 0.0
        and async_core.scheduler.blocks.num_free_blocks == sync_core.scheduler.blocks.num_free_blocks
    )


@pytest.mark.parametrize("steps", [1, 4])
def test_async_preemption_keeps_tokens(steps):
    requests = workload(3, count=12)
    roomy, _ = make_core(False, num_blocks=256, num_scheduler_steps=steps)
    tight, _ = make_core(True, num_blocks=14, num_scheduler_steps=steps)
    assert run(tight, requests) == run(roomy, requests)
    assert tight.scheduler.num_preemptions > 0
    assert tight.stats().kv_cache_usage == 0.0


def test_async_aborts_free_blocks_and_leave_others_alone():
    requests = [(rid, prompt, 30, {"ignore_eos": True}) for rid, prompt, _, _ in workload(4, count=8)]
    full = run(make_core(False, num_scheduler_steps=4)[0], requests)
    core, _ = make_core(True, num_scheduler_steps=4)
    got = run(core, requests, abort_at={2: ["r1"], 3: ["r5", "r6"], 5: ["r0"]})
    for rid in full:
        tokens, reason = got[rid] if rid in got else ([], "abort")
        if rid in ("r0", "r1", "r5", "r6"):
            assert reason == "abort" and tokens == full[rid][0][: len(tokens)]
        else:
            assert (tokens, reason) == full[rid]
    assert core.stats().kv_cache_usage == 0.0 and not core.has_unfinished


def test_async_failing_pass_is_rerun_and_only_the_bad_request_fails():
    requests = [(rid, prompt, 12, {"ignore_eos": True}) for rid, prompt, _, _ in workload(5, count=6)]
    requests.append(("bad", [POISON, 3, 4], 12, {"ignore_eos": True}))
    core, worker = make_core(True, poison=True, num_scheduler_steps=4)
    got = run(core, requests)
    expected = run(make_core(False, num_scheduler_steps=4)[0], requests[:-1])
    assert got.pop("bad") == ([], "abort")
    assert got == expected
    assert "execute" in worker.log  # the rerun went through the synchronous path
    assert core.stats().kv_cache_usage == 0.0


def test_rows_needing_their_tokens_on_the_host_wait_for_them():
    """Penalties count the previous tokens: such a pass is collected before the next is scheduled."""
    core, worker = make_core(True, num_scheduler_steps=2)
    core.add_request(
        EngineCoreRequest("p", (5, 6, 7), SamplingParams(max_tokens=9, ignore_eos=True, repetition_penalty=1.2))
    )
    while core.has_unfinished:
        core.step()
    assert not any(a == b == "submit" for a, b in zip(worker.log, worker.log[1:]))


def test_placeholders_never_leak_into_outputs_or_prefix_cache():
    """A second prompt that repeats the first request's prompt and outputs hits the prefix cache
    as often as without asynchronous scheduling: the cached blocks hold the real tokens."""
    hits = {}
    for asynchronous in (False, True):
        core, _ = make_core(asynchronous, num_scheduler_steps=4)
        prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15]
        first = run(core, [("a", prompt, 20, {"ignore_eos": True})])["a"][0]
        assert PLACEHOLDER not in first
        second = run(core, [("b", prompt + first[:15], 5, {"ignore_eos": True})])
        hits[asynchronous] = (core.scheduler.blocks.prefix_stats.hits, first, second)
    assert hits[True] == hits[False] and hits[True][0] >= 20
