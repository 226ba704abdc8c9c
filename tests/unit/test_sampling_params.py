"""SamplingParams validation and the max_tokens rule (docs/architecture.md, invariant 1). No torch."""

import pytest

from stepserve.errors import InvalidRequestError
from stepserve.sampling import SamplingParams, resolve_max_tokens


def test_omitted_means_remaining_context_or_route_default():
    assert resolve_max_tokens(None, 10, 100) == 90
    assert resolve_max_tokens(None, 10, 100, omitted_default=16) == 16
    assert resolve_max_tokens(None, 95, 100, omitted_default=16) == 5
    assert resolve_max_tokens(None, 10, 100, default_max_tokens=20) == 20
    assert resolve_max_tokens(None, 10, 100, omitted_default=16, default_max_tokens=8) == 8


def test_given_value_is_checked_against_context_and_limit():
    assert resolve_max_tokens(90, 10, 100) == 90
    with pytest.raises(InvalidRequestError, match="91.*10 tokens.*100.*90") as err:
        resolve_max_tokens(91, 10, 100)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="limit of 50"):
        resolve_max_tokens(60, 10, 100, max_tokens_limit=50)
    for bad in (0, -1, 1.5, "ten", True):
        with pytest.raises(InvalidRequestError) as err:
            resolve_max_tokens(bad, 10, 100)
        assert err.value.param == "max_tokens"


def test_prompt_that_leaves_no_room_is_refused():
    for prompt_len in (100, 150):
        with pytest.raises(InvalidRequestError, match="no room") as err:
            resolve_max_tokens(None, prompt_len, 100)
        assert err.value.param == "prompt"


def test_resolved_params_have_no_none_the_engine_computes_with():
    p = SamplingParams(temperature=0.5).resolve(10, 100)
    assert p.is_resolved and p.max_tokens == 90
    assert not SamplingParams().is_resolved
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=50).resolve(10, 30)


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 2),
        ("top_k", -2),
        ("min_p", 1.5),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0),
        ("seed", "x"),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 101}),
    ],
)
def test_each_invalid_field_names_itself(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert field in str(err.value)


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, temperature=1e-9, logit_bias={"5": 2})
    assert p.stop == ("###",) and p.top_k == 0 and p.greedy and p.logit_bias == ((5, 2.0),)
