"""Body parsing cannot raise anything but a 400: depth and size limits, strict JSON, and a lone
surrogate named by the field that holds it."""

import json

import pytest

from stepserve.errors import InvalidRequestError
from stepserve.server import json_body
from stepserve.server.json_body import MAX_DEPTH, loads


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def param_of(raw: str | bytes) -> str | None:
    with pytest.raises(InvalidRequestError) as err:
        loads(raw.encode() if isinstance(raw, str) else raw)
    return err.value.param


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_a_400():
    assert loads(('{"prompt": ' + nested(MAX_DEPTH - 1) + "}").encode())["prompt"]  # the body's object is a level too
    assert param_of('{"prompt": ' + nested(MAX_DEPTH) + "}") == "prompt"


@pytest.mark.parametrize("depth", [1024, 1025, 50_000, 1_000_000])
def test_any_depth_is_a_400_never_a_recursion_error(depth):
    assert param_of('{"prompt": ' + nested(depth) + "}") in ("prompt", "body")


def test_too_many_values_is_a_400(monkeypatch):
    monkeypatch.setattr(json_body, "MAX_VALUES", 100)
    assert loads(json.dumps({"prompt": list(range(90))}).encode())
    assert param_of(json.dumps({"prompt": list(range(101))})) == "prompt"


@pytest.mark.parametrize(
    "raw,param",
    [
        ('{"prompt": "\\ud800 hi"}', "prompt"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', "messages"),
        ('{"parameters": {"stop": ["ok", "\\ud83d"]}}', "parameters"),
        ('{"\\ud800": 1}', "\\ud800"),
        ('{"prompt": "\\ud83d\\ude00 is fine", "stop": "\\udfff"}', "stop"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_its_field(raw, param):
    with pytest.raises(InvalidRequestError) as err:
        loads(raw.encode())
    assert err.value.param == param
    assert "surrogate" in err.value.message
    err.value.message.encode("utf-8")  # the error itself can be sent


def test_a_surrogate_encoded_as_utf8_bytes_is_named_too():
    assert param_of(b'{"p": "\xed\xa0\x80"}') == "p"


def test_a_surrogate_pair_is_a_character():
    assert loads(b'{"prompt": "\\ud83d\\ude00"}')["prompt"] == "\U0001f600"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"t": NaN}',
        b'{"t": Infinity}',
        b'{"t": -Infinity}',
        b'{"t": 1e999}',
        b'{"t": [1, -1e999]}',
        b'{"t": {"u": NaN}}',
    ],
)
def test_nan_and_infinity_are_a_400_naming_the_field(raw):
    assert param_of(raw) == "t"
    with pytest.raises(InvalidRequestError, match="NaN and infinite numbers are not JSON"):
        loads(raw)


@pytest.mark.parametrize(
    "raw", [b'{"t": Nan}', b'{"t": Infinite}', b'{"p": "\xff"}', b"", b"[]", b"null", b'{"a": 1', b"\xef\xbb\xbf{}"]
)
def test_what_is_not_a_strict_json_object_is_a_400_on_the_body(raw):
    assert param_of(raw) == "body"
