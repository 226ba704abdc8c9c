"""The error taxonomy: each kind of failure has one type and one path to the client.

- ``InvalidRequestError`` (a ``ValueError``): bad input, HTTP 400, raised before the engine sees it.
- ``ModelNotFoundError``: the request names a model this server does not serve, HTTP 404.
- ``NotFoundError``: the request names something else this server does not hold (a stored response), HTTP 404.
- ``EngineDeadError``: the engine core died or is restarting, HTTP 503 ``engine_unavailable``.
- ``QueueFullError``: admission control refused the request, HTTP 429 with ``Retry-After``.
- ``RequestTimeoutError``: the request ran past the server's timeout, HTTP 504.
- ``ClientTimeoutError``: the client was too slow to send its request, HTTP 408.
- ``RequestAbortedError``: one request failed inside the engine; the others go on.
"""

from __future__ import annotations


class StepserveError(Exception):
    """Base class of every error stepserve raises on purpose."""


class InvalidRequestError(StepserveError, ValueError):
    """A request parameter is invalid; ``param`` names it for the client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFoundError(StepserveError):
    """The request asks for a model that is not served here."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(f"The model `{model}` does not exist. Served models: {', '.join(served)}.")
        self.model = model


class NotFoundError(StepserveError):
    """The request names something this server does not hold (a stored response); ``param``
    names the field that named it, if one did."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class EngineDeadError(StepserveError):
    """The engine core is not running; in-flight and new requests fail fast."""


class QueueFullError(StepserveError):
    """Too many requests are waiting; the client should retry later."""


class RequestTimeoutError(StepserveError):
    """The request ran past the server's ``--request-timeout-s`` and was aborted."""


class ClientTimeoutError(StepserveError):
    """The client did not finish sending its request in time (``--body-timeout-s``)."""


class RequestAbortedError(StepserveError):
    """The engine aborted this one request (an error while computing it)."""
