"""How clients reach the server: the gRPC port (``--enable_grpc``, ``--grpc_port``), and access
control and request limits as vLLM names them: ``--api-key``, ``--allowed-origins``,
``--root-path``, ``--ssl-keyfile``/``--ssl-certfile`` (``--enable-ssl-refresh``), ``--max-request-body-bytes``.

The key check and the body limit are one pure ASGI middleware each (not Starlette's
``BaseHTTPMiddleware``, which would buffer streams and hide disconnects from the routes). Every
route needs the key, as ``Authorization: Bearer KEY`` (OpenAI's clients) or ``x-api-key: KEY``
(Anthropic's), except the probes and ``/metrics`` (``OPEN_PATHS``), so Kubernetes can watch the
pod without the key and a route added later is guarded by default. ``api_key_ok`` is the one
comparison, for any other door (gRPC, a page). Their errors are in OpenAI's shape, and in
Anthropic's on its Messages routes (``ANTHROPIC_PATH``), whose clients read only their own.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException as StarletteHTTPException

from stepserve.config import ConfigError

API_KEY_ENV = "STEPSERVE_API_KEY"
ANTHROPIC_PATH = "/v1/messages"  # server/anthropic.py's routes: this path and those under it
OPEN_PATHS = frozenset({"/health", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"})
_OPEN_PATTERN = re.compile(r"/v2/models/[^/]+/ready")  # KServe's per-model readiness probe


@dataclass(frozen=True)
class AccessConfig:
    api_key: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": (
                "clients must send 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                f"(default: ${API_KEY_ENV}); probes and /metrics stay open"
            )
        },
    )
    allowed_origins: str | None = field(
        default=None,
        metadata={
            "help": (
                "CORS: origins allowed to call from a browser, comma-separated or a JSON list ('*' for any); "
                "default: no CORS"
            )
        },
    )
    root_path: str = field(default="", metadata={"help": "path prefix a proxy serves this under (ASGI root_path)"})
    ssl_keyfile: str | None = field(
        default=None, metadata={"help": "serve HTTPS (and gRPC over TLS) with this private key"}
    )
    ssl_certfile: str | None = field(
        default=None, metadata={"help": "the certificate chain that goes with --ssl-keyfile"}
    )
    enable_ssl_refresh: bool = field(
        default=False,
        metadata={
            "help": (
                "reload --ssl-keyfile and --ssl-certfile when they change on disk, for the HTTP port's "
                "new connections (a rotated Kubernetes Secret); gRPC keeps the pair it started with"
            )
        },
    )
    max_request_body_bytes: int = field(default=16 * 2**20, metadata={"help": "larger request bodies get 413"})

    def __post_init__(self) -> None:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ConfigError("give both --ssl-keyfile and --ssl-certfile, or neither")
        if self.enable_ssl_refresh and self.ssl_certfile is None:
            raise ConfigError("--enable-ssl-refresh needs --ssl-keyfile and --ssl-certfile")
        for path in (self.ssl_keyfile, self.ssl_certfile):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"TLS file {path!r} does not exist")
        if self.max_request_body_bytes < 1:
            raise ConfigError(f"max_request_body_bytes={self.max_request_body_bytes}: use at least 1")
        if self.api_key == "":
            raise ConfigError(f"the API key is empty: set --api-key or ${API_KEY_ENV} to a secret, or leave both unset")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ConfigError(f"root_path={self.root_path!r}: start it with '/' and do not end it with one")
        self.origins()

    def origins(self) -> list[str]:
        """``allowed_origins`` as a list (a JSON list or comma-separated)."""
        raw = (self.allowed_origins or "").strip()
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"allowed_origins is not a JSON list: {exc}") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError("allowed_origins must be a list of strings")
            return value
        return [part.strip() for part in raw.split(",") if part.strip()]

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None


@dataclass(frozen=True)
class GrpcConfig:
    enable_grpc: bool = field(
        default=False, metadata={"help": "serve KServe v2 over gRPC (GRPCInferenceService) on --grpc_port too"}
    )
    grpc_port: int = field(default=8081, metadata={"help": "gRPC port (KServe's default 8081)"})

    def __post_init__(self) -> None:
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port={self.grpc_port}: use 0 to 65535")


def access_config_from_args(args: argparse.Namespace) -> AccessConfig:
    values = {name: getattr(args, name) for name in AccessConfig.__dataclass_fields__}
    if values["api_key"] is None:
        values["api_key"] = os.environ.get(API_KEY_ENV)
    return AccessConfig(**values)


def api_key_ok(expected: str | None, authorization: str | None, x_api_key: str | None = None) -> bool:
    """Whether the request carries the key, in an ``Authorization: Bearer`` header value or an
    ``x-api-key`` one (always, when none is set). Constant time in the key's content, so timing
    tells an attacker nothing about it."""
    if expected is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    bearer = hmac.compare_digest(token.strip().encode(), expected.encode()) and scheme.lower() == "bearer"
    header = hmac.compare_digest((x_api_key or "").strip().encode(), expected.encode())
    return bearer or header


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or _OPEN_PATTERN.fullmatch(path) is not None


def route_path(scope: dict) -> str:
    """The path the routes see: without the root path (uvicorn prepends it). The same rule as
    Starlette's router, so the key check and the routing never disagree on which route it is."""
    path, root = scope["path"], scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


# -- middleware ---------------------------------------------------------------------------


_ANTHROPIC_TYPES = {401: "authentication_error", 413: "request_too_large"}  # the statuses sent here


def error_body(path: str, status: int, message: str) -> dict:
    """A refusal in OpenAI's error shape, or in Anthropic's on its routes."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[status], "message": message}}
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}


async def _send_error(scope, send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(route_path(scope), status, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def open_without_key(app, *paths: str) -> None:
    """Let exact ``paths`` through the key check: static pages that hold no data and send the
    key themselves (a playground). Call it before ``secure_app``."""
    app.state.open_paths = frozenset(getattr(app.state, "open_paths", frozenset()) | set(paths))


class ApiKeyMiddleware:
    """401 for a request without the key (``error_body``'s shape), except on ``OPEN_PATHS``
    and the paths given to ``open_without_key``. A CORS preflight carries no key by design: the
    CORS middleware, outside this one, answers it before it gets here."""

    def __init__(self, app, api_key: str, open_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or is_open_path(path) or path in self.open_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if api_key_ok(self.api_key, authorization, headers.get(b"x-api-key", b"").decode("latin-1")):
            return await self.app(scope, receive, send)
        message = "Incorrect or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        await _send_error(scope, send, 401, message, {"WWW-Authenticate": "Bearer"})


class BodyTooLarge(StarletteHTTPException):
    """The body passed ``--max-request-body-bytes`` while it streamed in: a 413 through the
    app's one error mapping (``http_error`` maps Starlette's HTTP exceptions to their status)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-request-body-bytes)")


class BodyLimitMiddleware:
    """413 for a body over the limit: at once by its Content-Length, else as soon as that many
    bytes arrived (the route reading the body gets ``BodyTooLarge``). The body is not read
    here, so the route's own body timeout still governs a slow client."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, send)
        started = False
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, send)

    async def _too_large(self, scope, send) -> None:
        await _send_error(scope, send, 413, BodyTooLarge(self.limit).detail, {"Connection": "close"})


def secure_app(app, config: AccessConfig):
    """Add the limits, the key check and CORS (outermost, so preflights and 401s carry its headers)."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(BodyLimitMiddleware, limit=config.max_request_body_bytes)
    if config.api_key is not None:
        app.add_middleware(
            ApiKeyMiddleware, api_key=config.api_key, open_paths=getattr(app.state, "open_paths", frozenset())
        )
    origins = config.origins()
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in origins,
        )
    return app
