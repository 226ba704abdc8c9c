"""The pooling routes, registered beside the OpenAI and KServe ones: ``/v1/embeddings``,
``/v1/rerank``, ``/v1/score`` (also under ``/openai/v1``, and vLLM's ``/rerank``, ``/v2/rerank``,
``/score``). On a server whose model generates text they answer 400 naming ``model``."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from stepserve.errors import InvalidRequestError
from stepserve.server.schemas import parse_body
from stepserve.server import openai_tasks
from stepserve.server.schemas import EmbeddingRequest, RerankRequest, ScoreRequest

ROUTES = (
    ("/embeddings", EmbeddingRequest, openai_tasks.embeddings, ("/v1", "/openai/v1")),
    ("/rerank", RerankRequest, openai_tasks.rerank, ("", "/v1", "/v2", "/openai/v1")),
    ("/score", ScoreRequest, openai_tasks.score, ("", "/v1", "/openai/v1")),
)


def _handler(schema, handle, path: str):
    async def run(ctx, raw: bytes) -> dict:
        req = parse_body(schema, raw, ctx.unknown)
        ctx.check_model(req.model, adapters=False)
        if ctx.tasks is None:
            raise InvalidRequestError(f"{path} is not served by this model: it serves text_generation", "model")
        return await handle(ctx.tasks, ctx.model_name, req)

    return run


def add_task_routes(app: FastAPI, serve: Callable) -> None:
    """``serve`` is the app's ``_serve`` (disconnects, the one error mapping)."""
    for path, schema, handle, prefixes in ROUTES:
        for prefix in prefixes:
            _add(app, serve, prefix + path, _handler(schema, handle, path))


def _add(app: FastAPI, serve: Callable, path: str, handler) -> None:
    async def route(request: Request) -> Response:
        return await serve(request, handler)

    app.add_api_route(path, route, methods=["POST"], name=path)
