"""Raw request bytes -> a JSON object, with limits, so that no body can raise anything but a 400.

``orjson`` parses (strict UTF-8, no NaN or Infinity, no lone surrogates, its own depth limit of
1024); then one iterative walk bounds the nesting depth and the number of values much lower,
because later code (pydantic, chat templates, ``repr`` in error messages) recurses. A string
that cannot be encoded (a lone surrogate escape such as ``"\\ud800"``) is a 400 naming the field
that holds it, found by a second, stdlib parse only on that error path; so is a NaN, Infinity or
a number too large for a double (``1e999``).
"""

from __future__ import annotations

import json
import math

import orjson

from stepserve.errors import InvalidRequestError

MAX_DEPTH = 64  # nesting of arrays and objects; a real request needs fewer than 10
MAX_VALUES = 2**21  # JSON values in one body (a batch of token-id prompts is the largest honest case)


def loads(raw: bytes) -> dict:
    """The body as a JSON object within the limits, or a 400 naming the field at fault."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(raw, exc) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", param="body")
    _check_shape(body)
    return body


def _check_shape(body: dict) -> None:
    """Depth and size, walked without recursion; the error names the top-level field."""
    stack = [(value, 1, key) for key, value in body.items()]
    count = len(stack)
    while stack:
        value, depth, field = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise InvalidRequestError(
                f"{field}: nested deeper than {MAX_DEPTH} levels (parameter={field})", param=field
            )
        children = value.values() if isinstance(value, dict) else value
        count += len(children)
        if count > MAX_VALUES:
            raise InvalidRequestError(f"the request body holds more than {MAX_VALUES} JSON values", param=field)
        stack.extend((child, depth + 1, field) for child in children)


def _decode_error(raw: bytes, exc: orjson.JSONDecodeError) -> InvalidRequestError:
    reason = str(exc)
    if "surrogate" in reason:
        where = _path_of(raw, _has_surrogate)
        if where is not None:
            path, field = where
            message = (
                f"{path}: the string holds a lone UTF-16 surrogate, "
                f"which cannot be encoded as UTF-8 (parameter={field})"
            )
            return InvalidRequestError(message, param=field)
    if "infinity" in reason or raw[exc.pos :].startswith((b"NaN", b"Infinity")):  # -Infinity: pos is past the sign
        where = _path_of(raw, _non_finite)
        if where is not None:
            path, field = where
            return InvalidRequestError(
                f"{path}: NaN and infinite numbers are not JSON; send a finite number (parameter={field})", param=field
            )
    return InvalidRequestError(f"the request body is not valid JSON: {exc}", param="body")


def _path_of(raw: bytes, found) -> tuple[str, str] | None:
    """(dotted path, top-level field) of the first key or value for which ``found`` is true.

    Only reached after orjson refused the body for a surrogate or a non-finite number, so the
    body is otherwise JSON; the stdlib parser accepts escaped surrogates, NaN, Infinity and
    1e999, and its recursion is caught.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    stack = [(body, [])]
    while stack:
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            here = [*path, str(key)]
            if found(key) or found(child):
                return _printable(".".join(here)), _printable(here[0])
            if len(here) < MAX_DEPTH:
                stack.append((child, here))
    return None


def _printable(text: str) -> str:
    """``text`` with any surrogate escaped, so that the error itself can be sent as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogate(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _non_finite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)
