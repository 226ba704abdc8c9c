"""Scheduler behaviour with a deterministic pure-Python worker: budgets, chunked prefill,
preemption, multi-step without overshoot. Nothing here imports torch."""

import subprocess
import sys

import pytest

from stepserve.config import SchedulerConfig
from stepserve.core.block_manager import BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.outputs import EngineCoreRequest, ModelRunnerOutput
from stepserve.core.scheduler import Scheduler
from stepserve.sampling import SamplingParams

EOS = 0


class CountingWorker:
    """Emits (last token + 1) % 50 each step, so sequences are predictable; records passes."""

    def __init__(self):
        self.passes = []

    def execute(self, sched):
        self.passes.append(sched)
        out = []
        for r in sched.requests:
            if not r.sample:
                out.append(())
                continue
            last, tokens = r.token_ids[r.start + r.num_new_tokens - 1], []
            for _ in range(sched.num_steps):
                last = (last + 1) % 50
                tokens.append(last)
            out.append(tuple(tokens))
        return ModelRunnerOutput(tuple(out))


def make_core(num_blocks=64, block_size=4, max_model_len=128, **sched):
    worker = CountingWorker()
    scheduler = Scheduler(SchedulerConfig(**sched), BlockManager(num_blocks, block_size), max_model_len, {EOS})
    return EngineCore(scheduler, worker), worker


def add(core, rid, prompt, max_tokens, **kw):
    params = SamplingParams(max_tokens=max_tokens, **kw)
    core.add_request(EngineCoreRequest(rid, tuple(prompt), params))


def drain(core):
    results = {}
    while core.has_unfinished:
        for out in core.step():
            tokens, _ = results.get(out.request_id, ([], None))
            results[out.request_id] = (tokens + list(out.new_token_ids), out.finish_reason)
    return results


def test_pure_modules_import_no_torch():
    code = (
        "import sys; import stepserve.core.scheduler, stepserve.core.engine_core, stepserve.core.block_manager, "
        "stepserve.sampling, stepserve.config; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_multistep_never_overshoots_and_stops_at_eos(steps):
    core, worker = make_core(num_scheduler_steps=steps, adaptive_steps=False)
    add(core, "len", [10], 13)  # 11..23
    add(core, "eos", [45], 20)  # 46..49 then 0 = EOS
    add(core, "ignore", [45], 7, ignore_eos=True)
    res = drain(core)
    assert res["len"] == (list(range(11, 24)), "length")
    assert res["eos"] == ([46, 47, 48, 49, 0], "stop")
    assert res["ignore"] == ([46, 47, 48, 49, 0, 1, 2], "length")
    assert core.stats().kv_cache_usage == 0.0
    if steps > 1:
        assert any(p.num_steps == steps for p in worker.passes)


def test_lookahead_slots_stay_inside_request_end():
    core, worker = make_core(num_scheduler_steps=8, adaptive_steps=False, num_blocks=40, block_size=4)
    add(core, "a", [1, 2, 3], 5)
    drain(core)
    for sched in worker.passes:
        for r in sched.requests:
            # blocks cover start + chunk + (allowed steps - 1) slots, never beyond prompt + max_tokens
            assert len(r.block_ids) * 4 <= -(-(3 + 5) // 4) * 4


def test_chunked_prefill_respects_token_budget():
    core, worker = make_core(max_num_batched_tokens=16)
    add(core, "long", list(range(1, 41)), 3)
    add(core, "short", [5], 3)
    res = drain(core)
    assert all(p.num_batched_tokens <= 16 for p in worker.passes)
    assert [r.num_new_tokens for r in worker.passes[0].requests] == [16]
    assert res["long"] == ([41 % 50, 42 % 50, 43 % 50], "length")
    assert res["short"] == ([6, 7, 8], "length")


def test_long_prefill_token_threshold_bounds_each_prompts_chunk():
    """vLLM's --long-prefill-token-threshold: a prompt computes at most that many tokens a pass,
    so a decoding request keeps getting a token every pass while a long prompt prefills beside it,
    and another prompt takes the budget the long one leaves; outputs are unchanged."""
    core, worker = make_core(max_num_batched_tokens=32, long_prefill_token_threshold=6)
    add(core, "running", [7], 30)
    first = [t for out in core.step() for t in out.new_token_ids]  # its prompt, alone
    add(core, "long", list(range(1, 41)), 3)
    add(core, "other", list(range(1, 9)), 2)
    res = drain(core)
    chunks = [{r.request_id: r.num_new_tokens for r in p.requests} for p in worker.passes[1:] if len(p.requests) > 1]
    assert chunks[0] == {"running": 1, "long": 6, "other": 6}
    assert all(c.get("long", 0) <= 6 and c.get("other", 0) <= 6 and c["running"] == 1 for c in chunks)
    assert sum(c.get("long", 0) for c in chunks) >= 40 - 1  # its last prompt token may sample alone
    assert res["long"] == ([41 % 50, 42 % 50, 43 % 50], "length")
    assert res["other"] == ([9, 10], "length")
    assert first + res["running"][0] == [(7 + i) % 50 for i in range(1, 31)]


def test_long_prefill_token_threshold_must_not_be_negative():
    from stepserve.config import ConfigError

    with pytest.raises(ConfigError, match="long_prefill_token_threshold=-1"):
        SchedulerConfig(long_prefill_token_threshold=-1)


def test_max_num_seqs_limits_batch():
    core, worker = make_core(max_num_seqs=2)
    for i in range(5):
        add(core, f"r{i}", [i + 1], 4)
    res = drain(core)
    assert len(res) == 5 and all(reason == "length" for _, reason in res.values())
    assert max(len(p.requests) for p in worker.passes) == 2


def test_preemption_when_blocks_run_out_completes_everything():
    core, _ = make_core(num_blocks=12, block_size=4, max_model_len=40)  # 11 usable blocks
    for i in range(4):
        add(core, f"r{i}", [i + 1] * 8, 20, ignore_eos=True)  # 7 blocks each at the end
    res = drain(core)
    assert core.scheduler.num_preemptions > 0
    for i in range(4):
        assert res[f"r{i}"] == ([(i + 1 + k) % 50 for k in range(1, 21)], "length")
    assert core.stats().kv_cache_usage == 0.0


def test_adaptive_steps_run_single_steps_while_requests_wait():
    core, worker = make_core(num_scheduler_steps=8)
    add(core, "a", [1], 30)
    core.step()  # prefill of a
    core.step()  # decode: nothing waits, 8 steps
    assert worker.passes[-1].num_steps == 8
    add(core, "b", [2], 30)
    core.step()
    assert worker.passes[-1].num_steps == 1  # b is admitted at once
    assert {r.request_id for r in worker.passes[-1].requests} == {"a", "b"}


def test_abort_frees_blocks_and_reports():
    core, _ = make_core()
    add(core, "a", [1, 2, 3], 30)
    core.step()
    outs = core.abort(["a", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
    assert core.stats().kv_cache_usage == 0.0 and not core.has_unfinished


def test_finished_ids_reach_the_worker_even_after_idle_passes():
    core, worker = make_core()
    add(core, "a", [1], 2)
    drain(core)
    core.step()  # idle: nothing scheduled, the id is kept
    add(core, "b", [1], 2)
    drain(core)
    assert "a" in {rid for p in worker.passes for rid in p.finished_request_ids}


class FaultyWorker(CountingWorker):
    """Raises whenever a request whose prompt starts with ``poison`` is in the pass."""

    def __init__(self, poison=None, always=False):
        super().__init__()
        self.poison, self.always = poison, always

    def execute(self, sched):
        if self.always or any(r.token_ids[0] == self.poison for r in sched.requests):
            raise RuntimeError("injected fault")
        return super().execute(sched)


def test_a_faulty_request_fails_alone():
    core, _ = make_core()
    core.worker = FaultyWorker(poison=13)
    add(core, "good", [1, 2], 5)
    add(core, "bad", [13, 2], 5)
    add(core, "good2", [3], 5)
    res = drain(core)
    assert res["bad"] == ([], "abort")
    assert res["good"] == ([3, 4, 5, 6, 7], "length") and res["good2"] == ([4, 5, 6, 7, 8], "length")
    assert core.stats().kv_cache_usage == 0.0


def test_a_broken_worker_is_an_engine_fault():
    from stepserve.core.engine_core import EngineFaultError

    core, _ = make_core()
    core.worker = FaultyWorker(always=True)
    add(core, "a", [1], 5)
    add(core, "b", [2], 5)
    with pytest.raises(EngineFaultError):
        drain(core)


def test_single_request_failures_in_a_row_are_an_engine_fault():
    from stepserve.core.engine_core import EngineFaultError

    core, _ = make_core()
    core.worker = FaultyWorker(always=True)
    with pytest.raises(EngineFaultError):
        for i in range(5):
            add(core, f"r{i}", [1], 5)
            drain(core)
