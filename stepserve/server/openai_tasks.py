"""OpenAI ``/v1/embeddings``, vLLM's and Cohere's ``/v1/rerank`` and vLLM's ``/v1/score``, and
``/v1/completions`` for text2text models, over an encoder task."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator

import numpy as np

from stepserve.errors import InvalidRequestError
from stepserve.server import openai as server_openai  # the generation path's validation and formats, shared
from stepserve.server.plan import plan, requested_constraints
from stepserve.tasks import task as T
from stepserve.tasks.inputs import Encoded, resolve_truncation
from stepserve.server.schemas import EmbeddingRequest, RerankRequest, ScoreRequest
from stepserve.tasks.serving import TaskServing

# -- /v1/embeddings ------------------------------------------------------------------------


def _embedding_inputs(ts: TaskServing, req: EmbeddingRequest) -> list[Encoded]:
    truncate = resolve_truncation(req.truncate_prompt_tokens, ts.spec.max_model_len)
    value = req.input
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        value = [value]
    if not value:
        raise InvalidRequestError("input must not be empty", "input")
    return [
        ts.tokens.text(item, f"input[{i}]", "input", truncate)
        if isinstance(item, str)
        else ts.tokens.ids(item, f"input[{i}]", "input", truncate)
        for i, item in enumerate(value)
    ]


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def embeddings(ts: TaskServing, model_name: str, req: EmbeddingRequest) -> dict:
    ts.require((T.EMBEDDING,), "/v1/embeddings")
    ts.check_dimensions(req.dimensions)
    encoded = _embedding_inputs(ts, req)
    request_id, outputs = await ts.run("embd", encoded)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _encode_vector(ts.embedding(out, req.dimensions), req.encoding_format),
        }
        for i, out in enumerate(outputs)
    ]
    tokens = sum(len(e.token_ids) for e in encoded)
    return _list_body(request_id, model_name, data, tokens)


# -- /v1/rerank and /v1/score ----------------------------------------------------------------


async def _pair_scores(
    ts: TaskServing, prefix: str, queries: list[str], documents: list[str], truncate: int | None, param: str
) -> tuple[str, list[float], int]:
    """One score per (query, document) pair: a cross-encoder's activated logit, or the cosine
    similarity of an embedding model's vectors. Also the request id and the tokens read."""
    if ts.task == T.SEQUENCE_CLASSIFICATION:
        if len(ts.spec.labels) != 1:
            raise InvalidRequestError(
                f"scoring needs a cross-encoder with one output label; this model has {len(ts.spec.labels)}", "model"
            )
        encoded = [
            ts.tokens.text(q, f"{param}[{i}]", param, truncate, pair=d)
            for i, (q, d) in enumerate(zip(queries, documents))
        ]
        request_id, outputs = await ts.run(prefix, encoded)
        return request_id, [ts.cross_score(o) for o in outputs], sum(len(e.token_ids) for e in encoded)
    texts = list(dict.fromkeys(queries + documents))  # each distinct text embedded once
    encoded = [ts.tokens.text(t, f"{param}[{i}]", param, truncate) for i, t in enumerate(texts)]
    request_id, outputs = await ts.run(prefix, encoded)
    vectors = {t: _unit(ts.embedding(o)) for t, o in zip(texts, outputs)}
    return (
        request_id,
        [float(vectors[q] @ vectors[d]) for q, d in zip(queries, documents)],
        sum(len(e.token_ids) for e in encoded),
    )


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


async def rerank(ts: TaskServing, model_name: str, req: RerankRequest) -> dict:
    ts.require((T.SEQUENCE_CLASSIFICATION, T.EMBEDDING), "/v1/rerank")
    if not req.documents:
        raise InvalidRequestError("documents must not be empty", "documents")
    if req.top_n is not None and req.top_n < 0:
        raise InvalidRequestError(f"top_n={req.top_n}: use 0 (all) or more", "top_n")
    if not req.query:
        raise InvalidRequestError("query must not be an empty string", "query")
    documents = [d if isinstance(d, str) else d.text for d in req.documents]
    truncate = resolve_truncation(req.truncate_prompt_tokens, ts.spec.max_model_len)
    request_id, scores, tokens = await _pair_scores(
        ts, "rerank", [req.query] * len(documents), documents, truncate, "documents"
    )
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[: req.top_n or None]
    results = [
        {"index": i, "relevance_score": scores[i]}
        | ({"document": {"text": documents[i]}} if req.return_documents else {})
        for i in order
    ]
    return {
        "id": request_id,
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
    }


def _score_pairs(req: ScoreRequest) -> tuple[list[str], list[str]]:
    """vLLM's pairing: one text_1 against every text_2, or text_1[i] with text_2[i]."""
    first = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
    second = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
    if not first or not second:
        raise InvalidRequestError("text_1 and text_2 must not be empty", "text_1" if not first else "text_2")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise InvalidRequestError(
            f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text_1, or as many as text_2", "text_2"
        )
    return first, second


async def score(ts: TaskServing, model_name: str, req: ScoreRequest) -> dict:
    ts.require((T.SEQUENCE_CLASSIFICATION, T.EMBEDDING), "/v1/score")
    first, second = _score_pairs(req)
    truncate = resolve_truncation(req.truncate_prompt_tokens, ts.spec.max_model_len)
    request_id, scores, tokens = await _pair_scores(ts, "score", first, second, truncate, "text_2")
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return _list_body(request_id, model_name, data, tokens)


def _list_body(request_id: str, model_name: str, data: list[dict], tokens: int) -> dict:
    """OpenAI's list response (embeddings, scores), with the prompt tokens read as usage."""
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "model": model_name,
        "data": data,
        "usage": usage,
    }


# -- /v1/completions ------------------------------------------------------------------------


async def any_completion(ctx, req) -> dict | AsyncIterator[dict]:
    """``/v1/completions`` on whatever the server runs: text generation on the engine, or a
    text2text model (the other tasks refuse it, naming the model's task)."""
    if ctx.tasks is None:
        return await server_openai.complete(ctx, req)
    ctx.check_model(req.model, adapters=False)
    return await complete(ctx.tasks, ctx, req)


# -- text2text -------------------------------------------------------------

# Completion fields that text2text does not honour, a 400, never ignored: echo would return the
# encoder's input as if the decoder had written it, an encoder-decoder has no suffix, and
# transformers' generate gives no prompt logprobs.
_UNSUPPORTED = {"echo": False, "suffix": None, "prompt_logprobs": None}


def _check_supported(req) -> None:
    for name, neutral in _UNSUPPORTED.items():
        if getattr(req, name, neutral) not in (neutral, [], {}):
            raise InvalidRequestError(f"{name} is not supported by text2text_generation models", name)


def _within(ts: TaskServing, token_ids: tuple[int, ...], text: str, skip_special: bool) -> int:
    """How many of the tokens it takes to write ``text`` (the output cut at a stop string)."""
    for k in range(len(token_ids) + 1):
        if len(ts.tokens.decode(token_ids[:k], skip_special)) >= len(text):
            return k
    return len(token_ids)


def _apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """The text cut before the first stop string, and that string (None when none matched)."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    at, stop = min(hits)
    return text[:at], stop


async def complete(ts: TaskServing, ctx, req) -> dict | AsyncIterator[dict]:
    """``/v1/completions`` on a text2text model: the same validation and ``max_tokens`` resolution as the LLM path."""
    ts.require((T.TEXT2TEXT,), "/v1/completions")
    _check_supported(req)
    constraints = requested_constraints(req)
    if constraints:  # generate takes no grammar
        field = constraints[0][0]
        raise InvalidRequestError(f"{field}: structured output is not supported by text2text_generation models", field)
    resolved = await plan(ctx, req)
    prompts = resolved.inputs
    encoded, fields = [], []
    for prompt in prompts:
        for i in range(prompt.params.n):
            encoded.append(Encoded(prompt.token_ids, None))
            fields.append(prompt.params.for_choice(i))  # choice i's own seed, as on the LLM path
    request_id, outputs = await ts.run("cmpl", encoded, params=fields)
    choices = []
    for index, out in enumerate(outputs):
        params = prompts[index // req.n].params
        text, stop = _apply_stop(ts.tokens.decode(out.token_ids, params.skip_special_tokens), params.stop)
        reason = "stop" if stop is not None else out.finish_reason
        logprobs = None
        if out.logprobs is not None:
            kept = (
                out.logprobs
                if stop is None
                else out.logprobs[: _within(ts, out.token_ids, text, params.skip_special_tokens)]
            )
            logprobs = server_openai._completion_logprobs(ctx, kept, 0)  # the LLM path's format
        choices.append(
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason, "stop_reason": stop}
        )
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
        "choices": choices,
    }
    if req.stream:
        return _one_chunk_stream(body, usage, req.stream_options is not None and req.stream_options.include_usage)
    return body | {"usage": usage}


async def _one_chunk_stream(body: dict, usage: dict, include_usage: bool) -> AsyncIterator[dict]:
    """``transformers`` generate returns whole texts: a stream is one chunk per choice."""
    for choice in body["choices"]:
        yield body | {"choices": [choice]}
    if include_usage:
        yield body | {"choices": [], "usage": usage}
