"""The FastAPI app: routes, the one exception -> HTTP mapping, SSE framing, disconnects.

Every POST route goes through ``_serve``: read the raw body, run the protocol handler while
watching for the client to go away (a disconnect cancels the handler, whose ``finally`` aborts
the engine request and frees its KV blocks), and turn any exception into a response through
``http_error``. A client error is a 4xx there, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepserve.engine.async_engine import AdmissionLimits, AsyncEngine
from stepserve.engine.core_client import CoreClient
from stepserve.errors import (
    ClientTimeoutError,
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    QueueFullError,
    RequestAbortedError,
    RequestTimeoutError,
)
from stepserve.server import kserve, openai, openai_tasks
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.fields import UnknownFieldPolicy
from stepserve.structured.compiler import GrammarCompiler
from stepserve.structured.reasoning import PARSERS as REASONING_PARSERS
from stepserve.structured.reasoning import marker_ids
from stepserve.version import __version__
from stepserve.server.metrics import CONTENT_TYPE, ServerMetrics
from stepserve.server.playground import add_playground_routes
from stepserve.server.stats_log import start_stats_logger
from stepserve.server.schemas import (
    ChatCompletionRequest,
    LoraAdapterRequest,
    CompletionRequest,
    KServeV1Request,
    KServeV2Request,
    parse_body,
)
from stepserve.server.task_routes import add_task_routes
from stepserve.server.anthropic import add_messages_routes
from stepserve.server.anthropic import error_body as anthropic_error_body
from stepserve.server.responses import add_responses_routes

if TYPE_CHECKING:
    from stepserve.engine.front import FrontInfo

log = logging.getLogger("stepserve.server")

Handler = Callable[[ServingContext, bytes], Awaitable[dict | AsyncIterator[dict]]]


@dataclass(frozen=True)
class HttpError:
    """An exception as the client sees it."""

    status: int  # HTTP status
    type: str  # OpenAI error type
    message: str  # what went wrong, for a person
    param: str | None = None  # the request parameter at fault, if one is
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def http_error(exc: Exception) -> HttpError:
    """The one mapping from exception types to HTTP statuses."""
    if isinstance(exc, InvalidRequestError):
        return HttpError(400, "invalid_request_error", exc.message, exc.param)
    if isinstance(exc, ModelNotFoundError):
        return HttpError(404, "not_found_error", str(exc), "model")
    if isinstance(exc, NotFoundError):
        return HttpError(404, "not_found_error", exc.message, exc.param)
    if isinstance(exc, QueueFullError):
        return HttpError(429, "queue_full", str(exc) or "too many requests are waiting", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return HttpError(
            503, "engine_unavailable", str(exc) or "the engine is not running", headers={"Retry-After": "1"}
        )
    if isinstance(exc, RequestTimeoutError):
        return HttpError(504, "request_timeout", str(exc))
    if isinstance(exc, ClientTimeoutError):
        return HttpError(408, "request_timeout", str(exc), headers={"Connection": "close"})
    if isinstance(exc, RequestAbortedError):
        return HttpError(500, "request_aborted", str(exc))
    if isinstance(exc, StarletteHTTPException):
        return HttpError(
            exc.status_code, "not_found_error" if exc.status_code == 404 else "invalid_request_error", str(exc.detail)
        )
    log.error("unexpected error while handling a request", exc_info=exc)
    return HttpError(500, "internal_error", f"internal error: {type(exc).__name__}")


# -- running a handler --------------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work: Awaitable):
    """``work``'s result, or ``_ClientGone`` after cancelling it if the client left first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():  # cancel() only requests it: the task ends (and aborts) later
        raise _ClientGone()
    return task.result()


@dataclass(frozen=True)
class Wire:
    """How one API writes errors and streams: OpenAI's by default (``data:`` lines, an error
    chunk, ``[DONE]``). Anthropic's Messages and OpenAI's Responses name each event (``event:``
    lines, from the chunk's ``type``) and end without ``[DONE]``."""

    error_body: Callable[[HttpError], dict] = HttpError.body
    named_events: bool = False  # an ``event: TYPE`` line before each chunk's data
    done: str | None = "data: [DONE]\n\n"  # the stream's last line

    def frame(self, chunk: dict) -> str:
        event = f"event: {chunk['type']}\n" if self.named_events and "type" in chunk else ""
        return f"{event}data: {json.dumps(chunk)}\n\n"

    def error_response(self, exc: Exception) -> JSONResponse:
        err = http_error(exc)
        return JSONResponse(self.error_body(err), status_code=err.status, headers=err.headers)


OPENAI_WIRE = Wire()


async def _sse(chunks: AsyncIterator[dict], wire: Wire) -> AsyncIterator[str]:
    """Frame chunks as server-sent events; an error becomes an error event; the wire's end."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield wire.frame(chunk)
        except Exception as exc:
            yield wire.frame(wire.error_body(http_error(exc)))
    if wire.done is not None:
        yield wire.done


async def _read_body(request: Request) -> bytes:
    """The whole body, or a 408 once ``--body-timeout-s`` has passed (a trickling client)."""
    timeout = request.app.state.ctx.config.body_timeout_s
    try:
        return await asyncio.wait_for(request.body(), timeout)
    except TimeoutError:
        raise ClientTimeoutError(f"the request body was not complete after {timeout}s") from None


async def _serve(request: Request, handler: Handler, wire: Wire = OPENAI_WIRE) -> Response:
    try:
        raw = await _read_body(request)
        result = await _until_disconnect(request, handler(request.app.state.ctx, raw))
    except (_ClientGone, ClientDisconnect):
        return Response(status_code=499)
    except Exception as exc:
        return wire.error_response(exc)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(_sse(result, wire), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


# -- routes -------------------------------------------------------------------------------


def _openai_routes(app: FastAPI, prefix: str) -> None:
    @app.post(prefix + "/completions")
    async def completions(request: Request) -> Response:
        return await _serve(
            request, lambda ctx, raw: openai_tasks.any_completion(ctx, parse_body(CompletionRequest, raw, ctx.unknown))
        )

    @app.post(prefix + "/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(
            request, lambda ctx, raw: openai.chat(ctx, parse_body(ChatCompletionRequest, raw, ctx.unknown))
        )

    @app.get(prefix + "/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": [*_base_cards(request), *_adapter_cards(request)]}

    @app.post(prefix + "/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        return await _serve(request, lambda ctx, raw: _lora_update(ctx, raw, load=True))

    @app.post(prefix + "/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        return await _serve(request, lambda ctx, raw: _lora_update(ctx, raw, load=False))


async def _lora_update(ctx: ServingContext, raw: bytes, load: bool) -> dict:
    """vLLM's run-time adapter loading: ``{"lora_name", "lora_path"}`` in, the adapter served
    (or forgotten) at once; off unless ``--enable-lora-runtime-updates``."""
    if ctx.loras is None:
        raise InvalidRequestError("this server serves no LoRA adapters: start it with --enable-lora", "lora_name")
    if not ctx.config.enable_lora_runtime_updates:
        raise InvalidRequestError(
            "loading adapters at run time is off: start the server with --enable-lora-runtime-updates", "lora_name"
        )
    body = parse_body(LoraAdapterRequest, raw, ctx.unknown)
    if load:
        if body.lora_path is None:
            raise InvalidRequestError("lora_path is required", "lora_path")
        ref = await asyncio.to_thread(ctx.loras.add, body.lora_name, body.lora_path)
        return {"object": "lora_adapter", "id": ref.name, "loaded": True}
    ctx.loras.remove(body.lora_name)
    return {"object": "lora_adapter", "id": body.lora_name, "unloaded": True}


def _adapter_cards(request: Request) -> list[dict]:
    """The served adapters, each a model whose ``parent`` is the base (as vLLM lists them)."""
    ctx = _ctx(request)
    if ctx.loras is None:
        return []
    base = _model_card(request)
    return [base | {"id": name, "root": ctx.loras.get(name).path, "parent": ctx.model_name} for name in ctx.loras.names]


def _base_cards(request: Request) -> list[dict]:
    """One card per name of the base model (vLLM lists each ``--served-model-name``)."""
    base = _model_card(request)
    return [base | {"id": name} for name in _ctx(request).model_names]


def _model_card(request: Request) -> dict:
    ctx = _ctx(request)
    started = request.app.state.started
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": started,
        "owned_by": "stepserve",
        "max_model_len": ctx.max_model_len,
    }


def _generation_config(ctx: ServingContext) -> dict:
    """The model's sampling defaults that requests leaving a field out get (--generation-config)."""
    return {"generation_config": ctx.sampling_defaults.as_dict()}


def _kserve_routes(app: FastAPI) -> None:
    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Response:
        return await _serve(
            request, lambda ctx, raw: kserve.v1_predict(ctx, name, parse_body(KServeV1Request, raw, ctx.unknown))
        )

    @app.get("/v1/models/{name}")
    async def v1_model(name: str, request: Request) -> Response:
        # KServe v1 model status and OpenAI's model retrieval share this path: answer both.
        return _guard(
            lambda: (
                _ctx(request).check_model(name)
                or _model_card(request)
                | {"name": name, "ready": _ctx(request).engine.is_ready}
                | _generation_config(_ctx(request))
            )
        )

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request) -> Response:
        return await _serve(
            request, lambda ctx, raw: kserve.v2_infer(ctx, name, parse_body(KServeV2Request, raw, ctx.unknown))
        )

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str, request: Request) -> Response:
        return _guard(lambda: kserve.v2_metadata(_ctx(request), name))

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str, request: Request) -> Response:
        return _guard(lambda: _ready_body(_ctx(request), name))

    @app.get("/v2")
    async def v2_server() -> dict:
        return {"name": "stepserve", "version": __version__, "extensions": []}


def _guard(build: Callable[[], dict]) -> Response:
    try:
        return JSONResponse(build())
    except Exception as exc:
        return http_error(exc).response()


def _ready_body(ctx: ServingContext, name: str) -> dict:
    ctx.check_model(name)
    if not ctx.engine.is_ready:
        raise EngineDeadError("the engine is not ready")
    return {"name": name, "ready": True}


def _health_routes(app: FastAPI) -> None:
    @app.get("/v2/health/live")
    async def live(request: Request) -> Response:
        # Engine trouble shows in readiness; liveness fails only once restarts are spent.
        is_live = getattr(request.app.state.client, "is_live", True)
        return JSONResponse({"live": is_live}, status_code=200 if is_live else 503)

    @app.get("/v2/health/ready")
    async def ready(request: Request) -> Response:
        is_ready = _ctx(request).engine.is_ready
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/health")
    async def health(request: Request) -> Response:
        return Response(status_code=200 if _ctx(request).engine.is_ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def _thinking_markers(tokenizer, config: ServerConfig) -> tuple[int, int] | None:
    if config.reasoning_parser is None:
        return None
    return marker_ids(tokenizer, REASONING_PARSERS[config.reasoning_parser])


def create_app(
    make_client: Callable[[], CoreClient],
    tokenizer,
    info: FrontInfo,
    config: ServerConfig,
    max_running: int,
    tasks=None,
    loras=None,
) -> FastAPI:
    """The app; the engine core (a process, or a thread) starts with the server and stops with it.

    ``make_client`` is called inside the event loop; ``max_running`` is the engine's
    ``max_num_seqs``, so that ``max_queue_len`` counts what waits beyond the running batch.
    ``tasks`` (a ``tasks.setup.TaskFront``) serves an encoder task instead of generation.
    ``loras`` (a ``server.lora.LoraRegistry``) holds the LoRA adapters served, when they are.
    """
    model_name = config.model_name or info.name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grammars = None  # the other tasks take no output constraint (a 400 naming the field)
        if tasks is None:
            grammars = GrammarCompiler(tokenizer, info.vocab_size, info.eos_token_ids)
            grammars.prepare()  # beside the engine core's start
        client = make_client()
        app.state.client = client
        wait_started = getattr(client, "wait_started", None)
        if wait_started is not None and not await asyncio.to_thread(wait_started):
            raise RuntimeError("the engine core failed to start; see the log above")
        max_loras = getattr(loras, "max_loras", 0)
        app.state.metrics = ServerMetrics(
            model_name, client.stats, lambda: getattr(client, "restarts", 0), max_loras, config.metrics_compat
        )
        limits = AdmissionLimits(max_running + config.max_queue_len, config.request_timeout_s)
        if tasks is None:
            engine, serving = AsyncEngine(client, tokenizer, app.state.metrics.observe, limits), None
        else:
            engine, serving = tasks.start(client, app.state.metrics.observe, limits)
        unknown = UnknownFieldPolicy(config.allow_unknown_fields)
        app.state.ctx = ServingContext(
            engine,
            tokenizer,
            model_name,
            info.max_model_len,
            info.vocab_size,
            config,
            sampling_defaults=info.sampling_defaults,
            unknown=unknown,
            tasks=serving,
            grammars=grammars,
            thinking_markers=_thinking_markers(tokenizer, config),
            loras=loras,
        )
        app.state.started = int(time.time())
        stats_task = start_stats_logger(engine, client, config)
        yield
        if stats_task is not None:
            stats_task.cancel()
        await engine.shutdown()

    app = FastAPI(title="stepserve", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        return http_error(exc).response()

    _openai_routes(app, "/v1")
    _openai_routes(app, "/openai/v1")
    add_task_routes(app, _serve)
    add_messages_routes(app, _serve, Wire(error_body=anthropic_error_body, named_events=True, done=None))
    add_responses_routes(app, _serve, Wire(named_events=True, done=None))
    _kserve_routes(app)
    _health_routes(app)
    if not config.disable_playground:
        add_playground_routes(app)
    return app
