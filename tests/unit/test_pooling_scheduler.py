"""Pooling requests in the scheduler, with a pure-Python worker that "pools" a chunk as the
sum of its token ids: chunked prompts fold exactly once per token, they finish after their last
chunk without sampling, last-token pooling reads the prefix cache and mean pooling does not,
preemption recomputes, and one failure stays its own. Nothing here imports torch."""

import pytest

from stepserve.config import SchedulerConfig
from stepserve.core.block_manager import BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.outputs import EngineCoreRequest, ModelRunnerOutput
from stepserve.core.scheduler import Scheduler
from stepserve.errors import InvalidRequestError
from stepserve.sampling import SamplingParams

POOL = SamplingParams(temperature=0.0, max_tokens=1)


class SummingWorker:
    """Pools by summing token ids chunk by chunk (a stand-in for the runner's fold) and samples
    token 7 for generation rows; records every pass and can fail one request's rows."""

    def __init__(self, fail=()):
        self.passes = []
        self.sums = {}
        self.fail = set(fail)

    def execute(self, sched):
        self.passes.append(sched)
        for rid in sched.finished_request_ids:
            self.sums.pop(rid, None)
        if self.fail & {r.request_id for r in sched.requests}:
            raise RuntimeError("boom")
        pooled, tokens = {}, []
        for r in sched.requests:
            if r.pooling is None:
                tokens.append((7,) * sched.num_steps if r.sample else ())
                continue
            tokens.append(())
            total = (0 if r.start == 0 else self.sums[r.request_id]) + sum(
                r.token_ids[r.start : r.start + r.num_new_tokens]
            )
            if r.sample:
                pooled[r.request_id] = total
                self.sums.pop(r.request_id, None)
            else:
                self.sums[r.request_id] = total
        return ModelRunnerOutput(tuple(tokens), pooled=pooled)


def make_core(worker=None, num_blocks=64, block_size=4, max_model_len=64, **sched):
    worker = worker or SummingWorker()
    scheduler = Scheduler(SchedulerConfig(**sched), BlockManager(num_blocks, block_size), max_model_len, {0})
    return EngineCore(scheduler, worker), worker


def pool(core, rid, prompt, mode="mean"):
    core.add_request(EngineCoreRequest(rid, tuple(prompt), POOL, pooling=mode))


def drain(core):
    finished = {}
    while core.has_unfinished:
        for out in core.step():
            assert out.new_token_ids == ()  # nothing is sampled for a pooling request
            finished[out.request_id] = out
    return finished


def drain_all(core):
    results = {}
    while core.has_unfinished:
        for out in core.step():
            results.setdefault(out.request_id, []).append(out)
    return results


def test_chunked_pooling_requests_fold_every_token_once_and_sample_nothing():
    core, worker = make_core(max_num_batched_tokens=10)
    prompts = {"a": list(range(1, 26)), "b": [3, 4, 5], "c": list(range(40, 64))}
    for rid, prompt in prompts.items():
        pool(core, rid, prompt)
    out = drain(core)
    assert {rid: o.pooled for rid, o in out.items()} == {rid: sum(p) for rid, p in prompts.items()}
    assert all(o.finish_reason == "stop" and o.num_prompt_tokens == len(prompts[rid]) for rid, o in out.items())
    assert all(p.num_batched_tokens <= 10 and p.num_steps == 1 for p in worker.passes)
    assert max(len(p.requests) for p in worker.passes) >= 2  # continuous batching: chunks share passes
    assert core.stats().kv_cache_usage == 0 and not core.scheduler.requests


def test_a_prompt_filling_the_context_is_a_pooling_request_but_not_more():
    core, _ = make_core(max_model_len=16)
    pool(core, "full", range(1, 17))  # generation would need room for one token; pooling does not
    assert drain(core)["full"].pooled == sum(range(1, 17))
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len=16"):
        pool(core, "long", range(1, 18))
    with pytest.raises(InvalidRequestError, match="pooling='median'"):
        pool(core, "odd", [1, 2], mode="median")


@pytest.mark.parametrize(("mode", "hits"), [("last", True), ("mean", False), ("cls", False)])
def test_only_last_token_pooling_reads_the_prefix_cache(mode, hits):
    core, worker = make_core()
    shared = list(range(1, 13))  # three full blocks of 4
    pool(core, "first", shared + [20, 21], mode)
    drain(core)
    pool(core, "second", shared + [30], mode)
    out = drain(core)["second"]
    assert (out.num_cached_tokens == 12) is hits and (out.num_cached_tokens == 0) is not hits
    (last,) = [p for p in worker.passes if p.requests[0].request_id == "second"]
    assert last.requests[0].start == (12 if hits else 0)
    assert core.stats().prefix_cache_hits == (12 if hits else 0)


def test_pooling_and_generation_share_passes():
    core, worker = make_core(max_num_batched_tokens=8)
    core.add_request(EngineCoreRequest("gen", (1, 2, 3), SamplingParams(temperature=0.0, max_tokens=4)))
    pool(core, "emb", range(1, 21))
    results = drain_all(core)
    assert results["emb"][-1].pooled == sum(range(1, 21)) and len(results["emb"]) == 1
    assert [t for o in results["gen"] for t in o.new_token_ids] == [7, 7, 7, 7]
    assert any({r.pooling for r in p.requests} == {None, "mean"} for p in worker.passes)


def test_preempted_pooling_request_recomputes_from_the_start():
    # 5 usable blocks of 4: a generation growing to 16 tokens and a pooled prompt of 12 do not fit together
    core, worker = make_core(num_blocks=6, max_num_batched_tokens=3)
    core.add_request(EngineCoreRequest("gen", (1, 2, 3, 4), SamplingParams(temperature=0.0, max_tokens=12)))
    pool(core, "emb", range(1, 13))
    out = drain_all(core)
    assert out["emb"][-1].pooled == sum(range(1, 13))
    assert [t for o in out["gen"] for t in o.new_token_ids] == [7] * 12
    assert core.stats().num_preemptions >= 1
    starts = [r.start for p in worker.passes for r in p.requests if r.request_id == "emb"]
    assert starts.count(0) >= 2  # computed from its first token again after the preemption


def test_a_failing_pooling_request_fails_alone():
    core, _ = make_core(worker=SummingWorker(fail={"bad"}))
    pool(core, "good", [1, 2, 3])
    pool(core, "bad", [4, 5])
    out = drain(core)
    assert out["good"].pooled == 6 and out["good"].error is None
    assert out["bad"].finish_reason == "abort" and "boom" in out["bad"].error and out["bad"].pooled is None


def test_a_worker_that_returns_no_vector_aborts_the_request():
    class Forgetful(SummingWorker):
        def execute(self, sched):
            return ModelRunnerOutput(((),) * len(sched.requests))

    core, _ = make_core(worker=Forgetful())
    pool(core, "r", [1, 2])
    out = drain(core)["r"]
    assert out.finish_reason == "abort" and "no result" in out.error


def test_an_encoder_request_is_scheduled_whole_or_waits():
    """An encoder attends both ways, so its input is never chunked: with a 10-token budget a
    12-token input waits until a pass can take it whole, and it never reads the prefix cache."""
    core, worker = make_core(max_num_batched_tokens=10)
    pool(core, "short", range(1, 7), mode="encoder")  # 6 tokens
    pool(core, "long", range(1, 13), mode="encoder")  # 12 tokens: more than the budget
    first = core.scheduler.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in first.requests] == [("short", 6)]
    core.scheduler.update(first, worker.execute(first))
    second = core.scheduler.schedule()
    assert second.requests == ()  # the budget can never hold it: the engine builder raises it to max_model_len
    core, worker = make_core(max_num_batched_tokens=12)
    pool(core, "a", range(1, 13), mode="encoder")
    pool(core, "b", range(1, 13), mode="encoder")  # the same input: no prefix-cache hit for an encoder
    finished = drain(core)
    assert finished["a"].pooled == finished["b"].pooled == sum(range(1, 13))
    assert [[(s.request_id, s.start, s.num_new_tokens) for s in p.requests] for p in worker.passes] == [
        [("a", 0, 12)],
        [("b", 0, 12)],
    ]
