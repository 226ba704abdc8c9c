"""What a seed promises (docs/sampling.md): the same seed gives the same tokens whatever else the
engine is doing, and neighbouring seeds give unrelated choices."""

import pytest
import torch

from stepserve import LLM, SamplingParams
from stepserve.sampling import mix_seed

LONG = "Once upon a time, in a land far away, there lived a king who had three daughters. "


def sampled(seed, max_tokens=16, **kw):
    return SamplingParams(temperature=1.5, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(llm, prompts, params):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), num_blocks=512, block_size=4, max_model_len=160)


def test_mix_seed_range_and_spread():
    seeds = {mix_seed(s, i) for s in range(-50, 1000) for i in range(8)}
    assert len(seeds) == 1050 * 8  # no two (seed, index) pairs share a stream
    assert all(0 <= s < 2**63 for s in seeds)
    for seed in (-(2**63), 2**63 - 1, 2**100, 0):  # any int the offline API takes
        torch.Generator().manual_seed(mix_seed(seed, 3))
    assert SamplingParams(seed=None).for_choice(4).seed is None


def test_neighbouring_seeds_share_no_choices(llm):
    """seed + i gave seed=900 and seed=901 four of their five choices in common."""
    a, b = tokens(llm, ["Hello there"] * 2, [sampled(900, n=5), sampled(901, n=5)])
    assert len(set(map(tuple, a))) == 5 and len(set(map(tuple, b))) == 5
    assert not set(map(tuple, a)) & set(map(tuple, b))
    first = tokens(llm, ["Hello there"], sampled(900))[0][0]
    assert first == a[0]  # choice 0 of n=5 is what the same seed gives with n=1


def test_seed_gives_same_tokens_whatever_the_engine_does(tiny_llama, llm):
    prompts = ["Hello there", LONG, "zz"]
    params = [sampled(7, 24), sampled(8, 40, n=2), sampled(9, 30, top_k=20, top_p=0.9, min_p=0.05)]
    alone = [tokens(llm, [p], q)[0] for p, q in zip(prompts, params)]
    assert tokens(llm, prompts, params) == alone  # batched together
    noise = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (5, 33, 17)]
    mixed = tokens(
        llm,
        ["a", prompts[0], "xyz " * 30, prompts[1], "b", prompts[2]],
        [noise[0], params[0], noise[1], params[1], noise[2], params[2]],
    )
    assert mixed[1::2] == alone  # beside unseeded requests that come and go
    for options in (
        dict(num_scheduler_steps=8),  # 8 decode steps per pass
        dict(max_num_batched_tokens=16, enable_prefix_caching=False),  # prompts in chunks
        dict(num_blocks=48),  # too few blocks: preemption and recompute
    ):
        other = LLM(model=str(tiny_llama), block_size=4, max_model_len=160, **{"num_blocks": 512, **options})
        assert tokens(other, prompts, params) == alone, options
        if "num_blocks" in options:
            assert other.core.scheduler.num_preemptions > 0
