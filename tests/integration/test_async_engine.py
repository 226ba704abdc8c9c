"""Asynchronous scheduling through the real model runner (tiny float32 model on the CPU): the
same tokens as the synchronous loop for greedy and seeded requests, with multi-step windows,
stop tokens, max_tokens, preemption, aborts, penalties and logprobs, and the overlap happens
(a pass is submitted before the one before it is collected)."""

import pytest

from stepserve import LLM, SamplingParams
from stepserve.core.outputs import EngineCoreRequest

PROMPTS = ["Hello there", "The quick brown fox", "a", "Once upon a time, in a land far away", "1 2 3 4 5 6 7", "zz"]


def engine(tiny_llama, asynchronous, steps, **kw):
    options = dict(num_blocks=512, block_size=4, max_model_len=192) | kw
    return LLM(model=str(tiny_llama), num_scheduler_steps=steps, async_scheduling=asynchronous, **options)


def results(llm, prompts, params):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in llm.generate(prompts, params)]


def record_calls(llm):
    """Log the runner's submit/collect order (the real methods still run)."""
    runner, log = llm.core.worker, []
    submit, collect = runner.submit, runner.collect
    runner.submit = lambda sched: (log.append("submit"), submit(sched))[1]
    runner.collect = lambda pending: (log.append("collect"), collect(pending))[1]
    return log


@pytest.fixture(scope="module")
def baseline(tiny_llama):
    return engine(tiny_llama, False, 1)


def mixed_params(base):
    """Greedy and seeded rows; stop tokens taken from the baseline at odd offsets; max_tokens
    that end inside a multi-step window."""
    params = []
    for i, row in enumerate(base):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True))
        elif i % 3 == 1:
            params.append(
                SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[row[0][0][4 + i]])
            )
        else:
            params.append(
                SamplingParams(temperature=1.3, top_p=0.9, seed=100 + i, max_tokens=37, ignore_eos=True, logprobs=2)
            )
    return params


@pytest.mark.parametrize("steps", [1, 8])
def test_async_equals_sync(tiny_llama, baseline, steps):
    base = results(baseline, PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    params = mixed_params(base)
    expected = results(engine(tiny_llama, False, steps), PROMPTS, params)
    llm = engine(tiny_llama, True, steps)
    log = record_calls(llm)
    outs = llm.generate(PROMPTS, params)
    assert [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs] == expected
    assert expected == results(baseline, PROMPTS, params)  # and multi-step equals single-step
    assert any(a == b == "submit" for a, b in zip(log, log[1:]))  # overlap happened
    seeded = [o.outputs[0] for o, p in zip(outs, params) if p.logprobs]
    assert all(len(c.logprobs) == len(c.token_ids) for c in seeded)
    assert llm.core.stats().kv_cache_usage == 0.0


def test_async_preemption_keeps_outputs(tiny_llama, baseline):
    prompts = [p * 2 for p in PROMPTS] + ["spare " * 5, "more text here"]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 4 + [
        SamplingParams(temperature=1.0, seed=7 + i, max_tokens=40, ignore_eos=True) for i in range(4)
    ]
    expected = results(baseline, prompts, params)
    tight = engine(tiny_llama, True, 4, num_blocks=48, max_model_len=160)
    assert results(tight, prompts, params) == expected
    assert tight.core.scheduler.num_preemptions > 0
    assert tight.core.stats().kv_cache_usage == 0.0


def test_async_penalties_wait_for_tokens_and_match(tiny_llama, baseline):
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5
    )
    assert results(engine(tiny_llama, True, 4), PROMPTS, params) == results(baseline, PROMPTS, params)


def test_async_abort_mid_stream(tiny_llama, baseline):
    llm = engine(tiny_llama, True, 4)
    core = llm.core
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = [r[0][0] for r in results(baseline, ids, params)]
    for i, prompt in enumerate(ids):
        core.add_request(EngineCoreRequest(f"a{i}", tuple(prompt), params))
    got, finished, steps = {}, {}, 0
    while core.has_unfinished:
        outs = core.step()
        steps += 1
        if steps == 3:
            outs += core.abort(["a1", "a4"])
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    for i, want in enumerate(expected):
        tokens = got.get(f"a{i}", [])
        if i in (1, 4):
            assert finished[f"a{i}"] == "abort" and tokens == want[: len(tokens)] and len(tokens) < len(want)
        else:
            assert (tokens, finished[f"a{i}"]) == (want, "length")
    assert core.stats().kv_cache_usage == 0.0
