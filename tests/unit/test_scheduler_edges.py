"""The scheduler's contract with the worker and the front end, pass by pass: what each pass asks
for (starts, chunk sizes, steps, block tables that cover every slot written, the token budget
spent to its last token), and what each output carries (logprobs cut at a stop, prompt logprobs
once, usage and cache counts, errors, stop tokens). Written to kill the mutants of
``core/scheduler.py`` that the end-to-end scheduler tests let live (docs/testing.md).
Pure Python, no torch."""

from stepserve.config import SchedulerConfig
from stepserve.core.block_manager import NULL_BLOCK, BlockManager
from stepserve.core.engine_core import EngineCore
from stepserve.core.outputs import EngineCoreRequest, ModelRunnerOutput, TokenLogprob
from stepserve.core.scheduler import Scheduler
from stepserve.sampling import SamplingParams

EOS = 0


def lp(token: int) -> TokenLogprob:
    """The logprob the worker reports for ``token``: a function of the token, so a shifted or
    dropped entry shows."""
    return TokenLogprob(token, -token / 100)


class Worker:
    """Emits (last token + 1) % 50 per step, like the scheduler tests' worker, with what a real
    worker returns beside the tokens: a logprob per token when asked, and each chunk's prompt
    logprobs (position p predicts token p + 1; none for the prompt's last position, so a chunk of
    only that position has no entry, as ``ModelRunner`` does). Every pass is checked: each
    request computes at least one token and its blocks cover every slot the pass writes. The
    core turns a worker's exception into aborts, so broken checks are collected in ``failures``
    (``drain`` asserts there are none) rather than raised."""

    def __init__(self, block_size: int, errors: dict | None = None, check=None):
        self.block_size, self.errors, self.check, self.passes, self.failures = block_size, errors or {}, check, [], []

    def execute(self, sched):
        try:
            self._check(sched)
        except AssertionError as exc:
            self.failures.append(f"pass {len(self.passes)}: {exc!r}")
        return self._execute(sched)

    def _check(self, sched):
        for r in sched.requests:
            assert r.num_new_tokens >= 1 and 1 <= r.num_steps <= sched.num_steps, r
            assert len(r.block_ids) * self.block_size >= r.start + r.num_new_tokens + r.num_steps - 1, r
            if self.check:
                self.check(r)

    def _execute(self, sched):
        self.passes.append(sched)
        tokens, logprobs, prompt = [], [], {}
        for r in sched.requests:
            span = max(0, min(r.start + r.num_new_tokens, r.num_prompt_tokens - 1) - r.start)
            if r.params.prompt_logprobs is not None and span:
                prompt[r.request_id] = tuple(lp(t) for t in r.token_ids[r.start + 1 : r.start + 1 + span])
            out = []
            if r.sample:
                last = r.token_ids[r.start + r.num_new_tokens - 1]
                for _ in range(sched.num_steps):
                    last = (last + 1) % 50
                    out.append(last)
            tokens.append(tuple(out))
            logprobs.append(tuple(map(lp, out)) if r.params.logprobs is not None and out else None)
        errors = {rid: why for rid, why in self.errors.items() if any(r.request_id == rid for r in sched.requests)}
        return ModelRunnerOutput(tuple(tokens), tuple(logprobs), errors, prompt)


def make(num_blocks=64, block_size=4, max_model_len=128, window=0, errors=None, check=None, **config):
    worker = Worker(block_size, errors, check)
    scheduler = Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size), max_model_len, {EOS}, window)
    return EngineCore(scheduler, worker), worker


def add(core, rid, prompt, max_tokens, **params):
    core.add_request(EngineCoreRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, **params)))


def drain(core):
    outputs = []
    while core.has_unfinished:
        outputs += core.step()
    assert core.worker.failures == []
    return outputs


def shape(sched):
    return [(r.request_id, r.start, r.num_new_tokens, r.num_steps) for r in sched.requests]


def test_multistep_passes_start_where_the_accepted_tokens_end():
    core, worker = make(num_scheduler_steps=4, adaptive_steps=False)
    add(core, "a", [10], 12)
    outputs = drain(core)
    assert [shape(p) for p in worker.passes] == [[("a", 0, 1, 1)], [("a", 1, 1, 4)], [("a", 5, 1, 4)], [("a", 9, 1, 3)]]
    assert [p.num_steps for p in worker.passes] == [1, 4, 4, 4]  # the last pass: 3 tokens left
    assert [p.num_batched_tokens for p in worker.passes] == [1, 1, 1, 1]
    assert [t for o in outputs for t in o.new_token_ids] == list(range(11, 23))
    request = worker.passes[0].requests[0]
    assert request.params.max_tokens == 12 and request.num_prompt_tokens == 1


def test_outputs_carry_logprobs_cut_at_the_stop_usage_and_cached_tokens():
    core, worker = make(num_scheduler_steps=4, adaptive_steps=False)
    prompt = [40, 41, 42, 43, 44, 45, 46, 47, 44]  # 9 tokens: 2 full blocks to share
    add(core, "a", prompt, 20, logprobs=1)
    first = drain(core)
    add(core, "b", prompt, 20, logprobs=1)
    second = drain(core)
    for outputs, cached in ((first, 0), (second, 8)):
        tokens = [t for o in outputs for t in o.new_token_ids]
        assert tokens == [45, 46, 47, 48, 49, 0]  # EOS inside a 4-step window: the rest is dropped
        assert [x for o in outputs for x in o.new_logprobs] == [lp(t) for t in tokens]
        assert all(o.num_prompt_tokens == 9 and o.num_cached_tokens == cached for o in outputs)
        assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_token_id == EOS
        assert all(not o.finished for o in outputs[:-1]) and outputs[-1].prompt_logprobs is None
    a_blocks = next(p for p in worker.passes if p.requests[0].request_id == "a").requests[0].block_ids
    b_first = next(p for p in worker.passes if p.requests[0].request_id == "b").requests[0]
    assert b_first.start == 8 and b_first.num_new_tokens == 1
    assert list(b_first.block_ids[:2]) == list(a_blocks[:2])  # the cached blocks themselves
    stats = core.scheduler.blocks.prefix_stats
    assert (stats.queries, stats.hits) == (18, 8)


def test_prompt_logprobs_skip_the_prefix_cache_and_ride_on_the_first_output_once():
    core, worker = make(max_num_batched_tokens=8)
    prompt = [30, 31, 32, 33, 34, 35, 36, 37, 38]  # chunks of 8 and 1: the second predicts nothing
    add(core, "warm", prompt, 2)
    drain(core)
    add(core, "p", prompt, 3, prompt_logprobs=0)
    assert core.step() == []  # the first chunk samples nothing and sends nothing
    outputs = drain(core)
    assert outputs[0].prompt_logprobs == tuple(lp(t) for t in prompt[1:])
    assert all(o.prompt_logprobs is None for o in outputs[1:]) and len(outputs) == 3
    assert all(o.num_cached_tokens == 0 for o in outputs)
    assert [shape(p) for p in worker.passes[-4:-2]] == [[("p", 0, 8, 1)], [("p", 8, 1, 1)]]


def test_the_token_budget_is_spent_to_its_last_token():
    core, worker = make(max_num_batched_tokens=3)
    for rid in "abc":
        add(core, rid, [1], 3)
    drain(core)
    assert [len(p.requests) for p in worker.passes] == [3, 3, 3]  # the third gets the last token
    core, worker = make(max_num_batched_tokens=2)
    for rid in "abc":
        add(core, rid, [1], 3)
    outputs = drain(core)
    assert all(p.num_batched_tokens == sum(r.num_new_tokens for r in p.requests) <= 2 for p in worker.passes)
    assert sorted(o.request_id for o in outputs if o.finished) == ["a", "b", "c"]


def test_every_running_request_advances_every_pass():
    core, worker = make(num_scheduler_steps=2, adaptive_steps=False)
    for rid in "abcd":
        add(core, rid, [5], 5)
    drain(core)
    assert all([r.request_id for r in p.requests] == list("abcd") for p in worker.passes)


def test_a_pass_with_a_prompt_chunk_is_a_single_step():
    core, worker = make(num_scheduler_steps=4, max_num_batched_tokens=8)
    add(core, "short", [1], 20)
    core.step()
    add(core, "long", list(range(1, 21)), 4)
    drain(core)
    chunked = [p for p in worker.passes if any(r.num_new_tokens > 1 for r in p.requests)]
    assert len(chunked) >= 3 and all(p.num_steps == 1 for p in chunked)
    assert any(p.num_steps == 4 for p in worker.passes)


def test_adaptive_steps_count_free_blocks_and_free_seats_exactly():
    # Exactly as many free blocks as the waiting prompt needs: it may be admitted, so 1 step.
    core, worker = make(num_blocks=4, block_size=4, num_scheduler_steps=8)  # 3 usable blocks
    add(core, "a", [1, 2, 3, 4], 4)
    core.step()  # a holds 1 block; 2 free
    add(core, "b", list(range(10, 18)), 1)  # needs 2
    core.step()
    assert worker.passes[-1].num_steps == 1
    # No free seat (max_num_seqs): waiting changes nothing, the pass runs all its steps.
    core, worker = make(max_num_seqs=1, num_scheduler_steps=8)
    add(core, "a", [1], 20)
    core.step()
    add(core, "b", [2], 4)
    core.step()
    assert worker.passes[-1].num_steps == 8 and shape(worker.passes[-1]) == [("a", 1, 1, 8)]
    assert worker.failures == []


def test_preemption_frees_the_blocks_at_once_tells_the_worker_and_counts_once():
    core, worker = make(num_blocks=4, block_size=4)  # 3 usable blocks
    add(core, "a", [1, 2, 3, 4], 8, ignore_eos=True)
    add(core, "b", [11, 12, 13, 14], 8, ignore_eos=True)
    core.step()  # both prompts: one block each
    assert core.stats().num_preemptions == 0
    core.step()  # a grows to 2 blocks; b finds none and is preempted (recompute later)
    assert shape(worker.passes[-1]) == [("a", 4, 1, 1)] and worker.passes[-1].finished_request_ids == ("b",)
    assert core.scheduler.blocks.num_free_blocks == 1  # b's block is back
    assert core.stats().num_preemptions == 1 and core.stats().num_waiting == 1
    assert [(o.request_id, o.finish_reason) for o in core.abort(["b"])] == [("b", "abort")]
    outputs = drain(core)
    assert [t for o in outputs for t in o.new_token_ids] == [7, 8, 9, 10, 11, 12]  # a's 3rd to 8th
    assert core.stats().num_preemptions == 1 and core.stats().kv_cache_usage == 0.0


def test_a_preempted_request_recomputes_and_still_ends_right():
    core, worker = make(num_blocks=4, block_size=4)
    add(core, "a", [1, 2, 3, 4], 8, ignore_eos=True)
    add(core, "b", [11, 12, 13, 14], 8, ignore_eos=True)
    outputs = drain(core)
    b = [t for o in outputs if o.request_id == "b" for t in o.new_token_ids]
    assert b == [15, 16, 17, 18, 19, 20, 21, 22] and core.stats().num_preemptions == 1
    recompute = next(
        p
        for p in worker.passes
        if p.requests and p.requests[0].request_id == "b" and p.requests[0].start == 0 and len(p.requests) == 1
    )
    assert recompute.requests[0].num_new_tokens == 5  # its prompt and its one accepted token


def test_every_preemption_counts_once_and_every_request_still_ends_right():
    core, worker = make(num_blocks=5, block_size=4)  # 4 usable blocks for 3 requests of 3
    for i, rid in enumerate("abc"):
        add(core, rid, [10 * i + k for k in range(1, 5)], 8, ignore_eos=True)
    outputs = drain(core)
    for i, rid in enumerate("abc"):
        assert [t for o in outputs if o.request_id == rid for t in o.new_token_ids] == [
            10 * i + k for k in range(5, 13)
        ]
    # c, then b, preempted (each told to the worker once); a finished; b finished.
    assert [rid for p in worker.passes for rid in p.finished_request_ids] == ["c", "b", "a", "b"]
    assert core.stats().num_preemptions == 2


def test_abort_skips_unknown_ids_and_takes_waiting_requests_off_the_queue():
    core, _ = make(max_num_seqs=1)
    add(core, "running", [1], 5)
    add(core, "waiting", [2], 5)
    core.step()
    outputs = core.abort(["unknown", "waiting"])
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("waiting", "abort")]
    assert core.stats().num_waiting == 0 and [o.request_id for o in drain(core) if o.finished] == ["running"]


def test_a_request_aborted_while_its_pass_ran_gets_no_output_and_others_go_on():
    core, worker = make()
    add(core, "a", [1], 5)
    add(core, "b", [2], 5)
    core.step()
    scheduler = core.scheduler
    sched = scheduler.schedule()
    scheduler.abort(["a"])
    outputs = scheduler.update(sched, worker.execute(sched))
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("b", (4,))]
    assert worker.failures == []


def test_a_worker_error_aborts_that_request_alone_in_the_same_pass():
    core, _ = make(errors={"bad": "RuntimeError: injected"})
    add(core, "bad", [1], 5)
    add(core, "good", [2], 5)
    outputs = core.step()
    assert [(o.request_id, o.finish_reason, o.error, o.new_token_ids) for o in outputs] == [
        ("bad", "abort", "RuntimeError: injected", ()),
        ("good", None, None, (3,)),
    ]
    assert core.worker.failures == []


def test_an_all_windowed_model_hands_back_exactly_the_blocks_behind_the_window():
    """The next query sits at ``start`` and sees ``window`` keys: the leading table entries that
    hold only positions before ``start - window + 1`` are the null block, no more, no fewer."""
    seen = []

    def check(r):  # while the pass runs: block_ids is the live table
        released = max(r.start - 6 + 1, 0) // 4
        assert list(r.block_ids[:released]) == [NULL_BLOCK] * released, r.start
        assert NULL_BLOCK not in r.block_ids[released:], r.start
        seen.append(released)

    for steps in (1, 4):
        core, _ = make(block_size=4, window=6, num_scheduler_steps=steps, adaptive_steps=False, check=check)
        add(core, "a", list(range(1, 11)), 30, ignore_eos=True)
        add(core, "b", [7], 30, ignore_eos=True)
        drain(core)
    assert max(seen) >= 6  # the window did hand blocks back
