"""Engine behaviour on a tiny random model: multi-step, the incident, preemption, prefix caching,
seeds, batch invariance, logprobs, stop strings and tokens, penalties."""

import pytest

from stepserve import LLM, SamplingParams

PROMPTS = ["Hello there", "The quick brown fox", "a", "Once upon a time, in a land far away", "1 2 3 4 5 6 7", "zz"]


@pytest.fixture(scope="module")
def engines(tiny_llama):
    return {
        n: LLM(model=str(tiny_llama), num_scheduler_steps=n, num_blocks=512, block_size=4, max_model_len=256)
        for n in (1, 2, 4, 8)
    }


def greedy(max_tokens=None, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def test_multistep_identical_with_stops_inside_windows(engines):
    base = run(engines[1], PROMPTS, greedy(40, ignore_eos=True))
    # Stop tokens taken from the baseline at odd offsets, max_tokens that end mid-window.
    params = [
        greedy(3 + 2 * i, ignore_eos=True)
        if i % 2
        else greedy(40, ignore_eos=True, stop_token_ids=[base[i].token_ids[5 + i]])
        for i in range(len(PROMPTS))
    ]
    results = {n: [(c.token_ids, c.finish_reason) for c in run(llm, PROMPTS, params)] for n, llm in engines.items()}
    for n in (2, 4, 8):
        assert results[n] == results[1], f"N={n} differs from N=1"
    for (tokens, reason), p in zip(results[1], params):
        assert len(tokens) <= p.max_tokens
        if p.stop_token_ids:
            assert reason == "stop" and tokens[-1] == p.stop_token_ids[0] and p.stop_token_ids[0] not in tokens[:-1]
        else:
            assert reason == "length" and len(tokens) == p.max_tokens


def test_multistep_frees_lookahead_blocks(engines):
    llm = engines[8]
    run(llm, PROMPTS, greedy(13, ignore_eos=True))
    assert llm.core.stats().kv_cache_usage == 0.0
    assert not llm.core.has_unfinished


def test_incident_no_max_tokens_with_multistep(tiny_llama):
    """KServe's incident: N=8, max_tokens left out. Must run to the context end, others unaffected."""
    llm = LLM(model=str(tiny_llama), num_scheduler_steps=8, num_blocks=256, block_size=4, max_model_len=64)
    prompt = llm.tokenizer.encode("Tell me everything")
    others = ["Hello there", "zz"]
    outs = llm.generate([prompt] + others, [SamplingParams(ignore_eos=True)] + [greedy(7, ignore_eos=True)] * 2)
    assert len(outs[0].outputs[0].token_ids) == 64 - len(prompt)
    assert outs[0].outputs[0].finish_reason == "length"
    alone = run(llm, others, greedy(7, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs[1:]] == [c.token_ids for c in alone]


def test_preemption_keeps_outputs(tiny_llama):
    prompts = [p * 2 for p in PROMPTS] + ["spare " * 5, "more text here"]
    params = greedy(60, ignore_eos=True)
    roomy = LLM(model=str(tiny_llama), num_blocks=1024, block_size=4, max_model_len=160)
    tight = LLM(model=str(tiny_llama), num_blocks=48, block_size=4, max_model_len=160)
    expected = [c.token_ids for c in run(roomy, prompts, params)]
    assert [c.token_ids for c in run(tight, prompts, params)] == expected
    assert tight.core.scheduler.num_preemptions > 0
    assert tight.core.stats().kv_cache_usage == 0.0


def test_prefix_caching_hits_and_changes_nothing(tiny_llama):
    prefix = "You are a helpful assistant. Answer briefly and precisely. " * 2
    prompts = [prefix + q for q in ("What is 2+2?", "Name a color.", "Say hi.")]
    cached = LLM(model=str(tiny_llama), num_blocks=512, block_size=4, max_model_len=256)
    plain = LLM(model=str(tiny_llama), num_blocks=512, block_size=4, max_model_len=256, enable_prefix_caching=False)
    first = run(cached, prompts[:1], greedy(16))
    rest = run(cached, prompts[1:], greedy(16))
    stats = cached.core.stats()
    assert stats.prefix_cache_hits >= len(cached.tokenizer.encode(prefix)) // 4 * 4 * 2 - 8
    assert [c.token_ids for c in first + rest] == [c.token_ids for c in run(plain, prompts, greedy(16))]
    assert plain.core.stats().prefix_cache_hits == 0


def test_seeded_sampling_reproducible_alone_and_in_batch(engines):
    llm = engines[1]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    a = run(llm, ["Hello there"], params)[0].token_ids
    b = run(llm, ["Hello there"], params)[0].token_ids
    mixed = run(llm, ["zz", "Hello there", "a"], [greedy(30), params, SamplingParams(temperature=0.7, max_tokens=10)])[
        1
    ].token_ids
    other_seed = run(llm, ["Hello there"], params.replace(seed=99))[0].token_ids
    assert a == b == mixed
    assert a != other_seed


def test_greedy_alone_equals_inside_mixed_batch(engines):
    for n in (1, 8):
        llm = engines[n]
        alone = run(llm, ["The quick brown fox"], greedy(30))[0].token_ids
        batch = run(
            llm,
            ["a", "The quick brown fox", "Once upon a time", "zz" * 30],
            [
                SamplingParams(temperature=0.9, max_tokens=20),
                greedy(30),
                greedy(5),
                SamplingParams(temperature=1.0, max_tokens=40, seed=3),
            ],
        )[1].token_ids
        assert alone == batch


def test_n_completions(engines):
    out = engines[1].generate("Hello", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logprobs_match_greedy_choice(engines):
    c = run(engines[4], ["Hello there"], greedy(10, logprobs=3, ignore_eos=True))[0]
    assert len(c.logprobs) == 10
    for token, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0


def test_stop_string_truncates_text(engines):
    llm = engines[2]
    full = run(llm, ["Once upon a time"], greedy(40, ignore_eos=True))[0]
    text = full.text
    starts = [i for i in range(5, len(text) - 2) if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i]
    stop = text[starts[0] : starts[0] + 2]
    c = run(llm, ["Once upon a time"], greedy(40, ignore_eos=True, stop=[stop]))[0]
    assert c.text == full.text[: full.text.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert llm.core.stats().kv_cache_usage == 0.0


def test_min_tokens_masks_stop_tokens(engines):
    llm = engines[4]
    base = run(llm, ["Hello there"], greedy(30, ignore_eos=True))[0].token_ids
    stop = base[1]
    early = run(llm, ["Hello there"], greedy(30, stop_token_ids=[stop]))[0]
    late = run(llm, ["Hello there"], greedy(30, stop_token_ids=[stop], min_tokens=10))[0]
    assert len(early.token_ids) == 2
    assert len(late.token_ids) > 10 and stop not in late.token_ids[:10]


def test_penalties_and_logit_bias(engines):
    llm = engines[1]
    plain = run(llm, ["zz"], greedy(40, ignore_eos=True))[0].token_ids
    penalized = run(llm, ["zz"], greedy(40, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0))[0].token_ids
    assert len(set(penalized)) > len(set(plain))
    forced = run(llm, ["zz"], greedy(8, ignore_eos=True, logit_bias={65: 100}))[0].token_ids
    assert forced == [65] * 8


def test_unresolved_params_never_enter_the_core(engines):
    from stepserve.core.outputs import EngineCoreRequest
    from stepserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        engines[8].core.add_request(EngineCoreRequest("x", (1, 2, 3), SamplingParams(max_tokens=None)))
    assert err.value.param == "max_tokens"
    assert not engines[8].core.has_unfinished
