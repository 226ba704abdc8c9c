"""Edges of SamplingParams and resolve_max_tokens that mutation testing (`make mutate`) found
untested: bounds accepted and refused exactly at the limits, the parameter each error names and
what its message says, and mix_seed's exact values (a seed's tokens are a promise, README)."""

import math

import pytest

from stepserve.errors import InvalidRequestError
from stepserve.sampling import SamplingParams, mix_seed, resolve_max_tokens

RANGES = {  # field: (low, high, low excluded)
    "temperature": (0.0, 100.0, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.0, 2.0, True),
}


def refused(param: str, **kw) -> str:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kw)
    assert err.value.param == param
    return str(err.value)


@pytest.mark.parametrize("field", sorted(RANGES))
def test_ranges_are_exact_and_messages_name_them(field):
    low, high, open_low = RANGES[field]
    SamplingParams(**{field: high})
    if not open_low:
        SamplingParams(**{field: low})
    bracket = "(" if open_low else "["
    for bad in (high + 0.01, low - 0.01) + ((low,) if open_low else ()):
        if field == "temperature" and 0 > bad > -1e-5:
            continue  # rounds to greedy
        message = refused(field, **{field: bad})
        assert f"{field} must be in {bracket}{low}, {high}], got {bad}" in message
    assert f"{field} must be a finite number, got nan" in refused(field, **{field: math.nan})


def test_min_tokens_may_equal_the_resolved_max_tokens():
    assert SamplingParams(min_tokens=4).resolve(10, 14).max_tokens == 4
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(min_tokens=5).resolve(10, 14)
    assert err.value.param == "min_tokens"
    assert "min_tokens=5 must not exceed max_tokens=4" in str(err.value)


def test_prompt_length_checks():
    for bad in (0, -3, 2.5):
        with pytest.raises(InvalidRequestError) as err:
            resolve_max_tokens(None, bad, 100)
        assert err.value.param == "prompt"
    assert resolve_max_tokens(None, 99, 100) == 1  # one token of room is room
    with pytest.raises(InvalidRequestError) as err:
        resolve_max_tokens(None, 100, 100)
    assert err.value.param == "prompt" and "100 tokens" in str(err.value)


def test_mix_seed_values_are_pinned():
    """Changing mix_seed changes every seeded completion: do it on purpose, and say so."""
    assert mix_seed(0, 0) == 2928822574489494037
    assert mix_seed(900, 1) == 5775714879522018363
    assert mix_seed(-7, 3) == 2329991545993984087
    assert max(mix_seed(s, 0) for s in range(200)) >= 2**62  # all 63 bits are used


def test_other_limits_and_messages():
    SamplingParams(logit_bias={5: -100.0, 6: 100.0}, logprobs=20, stop_token_ids=[0], min_tokens=3, max_tokens=3)
    assert "logit_bias must be in [-100.0, 100.0], got -100.5" in refused("logit_bias", logit_bias={5: -100.5})
    assert "logit_bias keys must be token ids, got 'x'" in refused("logit_bias", logit_bias={"x": 1.0})
    assert "logprobs must be at most 20, got 21" in refused("logprobs", logprobs=21)
    assert "stop must be a non-empty string or a list of them, got ''" in refused("stop", stop=[""])
    assert "n must be an integer, got 1.5" in refused("n", n=1.5)
    assert "n must be at least 1, got 0" in refused("n", n=0)
    assert "stop_token_ids must be at least 0, got -1" in refused("stop_token_ids", stop_token_ids=[-1])
    assert "min_tokens=4 must not exceed max_tokens=3" in refused("min_tokens", min_tokens=4, max_tokens=3)
    assert "temperature must be a finite number, got True" in refused(
        "temperature", temperature=True
    )  # bool is no number


def test_normalized_fields():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()
    assert SamplingParams(temperature=0.9e-5).temperature == 0.0  # below 1e-5 is greedy
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    zero = SamplingParams(temperature=0).temperature
    assert zero == 0.0 and isinstance(zero, float)
