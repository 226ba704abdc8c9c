"""The OpenAI protocol: a request's plan (``plan.py``) runs on the engine, its updates become responses.

``complete`` and ``chat`` validate everything (docs/architecture.md, invariant 1) before the engine sees a
token, then return either a response body or, for ``stream=true``, an async iterator of chunk
bodies that the app frames as server-sent events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from stepserve.core.outputs import TokenLogprob
from stepserve.engine.async_engine import PromptInput, Update
from stepserve.engine.output_processor import RequestState
from stepserve.server.context import ServingContext
from stepserve.server.schemas import ChatCompletionRequest, CompletionRequest
from stepserve.server.plan import Plan, plan
from stepserve.server.tool_calls import ToolDeltas, message


Chunks = AsyncIterator[dict]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- request -> SamplingParams ------------------------------------------------------------


def _stop_reason(state: RequestState) -> str | int | None:
    """The stop string or stop token id that ended the completion; None for EOS (as vLLM)."""
    reason = state.stop_reason
    return None if isinstance(reason, int) and reason not in state.params.stop_token_ids else reason


def _usage(prompts: Sequence[PromptInput], states: Sequence[RequestState]) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(s.token_ids) for s in states)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _collect(ctx: ServingContext, request_id: str, prompts: Sequence[PromptInput]) -> list[RequestState]:
    """Run a request to the end; its completions' states in choice order."""
    states: dict[int, RequestState] = {}
    async with aclosing(ctx.engine.generate(request_id, prompts)) as updates:
        async for update in updates:
            states[update.state.index] = update.state
    return [states[i] for i in sorted(states)]


# -- /v1/completions ----------------------------------------------------------------------


async def complete(ctx: ServingContext, req: CompletionRequest) -> dict | Chunks:
    ctx.check_model(req.model)
    resolved = await plan(ctx, req)
    request_id = new_id("cmpl")
    if resolved.stream:
        return _completion_chunks(ctx, request_id, resolved)
    inputs = resolved.inputs
    states = await _collect(ctx, request_id, inputs)
    choices = [_completion_choice(ctx, resolved, s) for s in states]
    return _completion_body(ctx, request_id, choices) | {"usage": _usage(inputs, states)}


def _completion_body(ctx: ServingContext, request_id: str, choices: list[dict]) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
        "choices": choices,
    }


def _completion_choice(ctx: ServingContext, resolved: Plan, state: RequestState) -> dict:
    prompt_text = resolved.prompts[state.index // resolved.n].text if resolved.echo else ""
    logprobs = None
    if resolved.logprobs is not None:
        logprobs = _completion_logprobs(ctx, state.logprobs, len(prompt_text))
        if resolved.echo:
            echoed = _echo_logprobs(
                ctx,
                resolved.prompts[state.index // resolved.n].input.token_ids,
                state.prompt_logprobs,
                resolved.logprobs,
            )
            logprobs = _merge_logprobs(echoed, logprobs)
    choice = {
        "index": state.index,
        "text": prompt_text + state.text,
        "logprobs": logprobs,
        "finish_reason": state.finish_reason,
        "stop_reason": _stop_reason(state),
    }
    if resolved.prompt_logprobs:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(ctx, state.prompt_logprobs)
    return choice


def vllm_prompt_logprobs(ctx: ServingContext, entries) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first), token id -> logprob,
    rank and text, for the token itself and its top alternatives."""
    if entries is None:
        return None

    def one(lp: TokenLogprob) -> dict:
        out = {
            str(t): {"logprob": v, "rank": r, "decoded_token": ctx.decode_token(t)}
            for r, (t, v) in enumerate(lp.top, 1)
        }
        out[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": ctx.decode_token(lp.token_id)}
        return out

    return [None if lp is None else one(lp) for lp in entries]


def _completion_logprobs(ctx: ServingContext, logprobs: Sequence[TokenLogprob], offset: int) -> dict:
    """The completions format: parallel lists of tokens, their logprobs, alternatives, offsets."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        token = ctx.decode_token(lp.token_id)
        top = {ctx.decode_token(t): v for t, v in lp.top}
        top.setdefault(token, lp.logprob)
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def _echo_logprobs(ctx: ServingContext, prompt_ids: Sequence[int], entries, k: int) -> dict:
    """Echoed prompt tokens with their logprobs and ``k`` alternatives (the first token has none)."""
    tokens = [ctx.decode_token(t) for t in prompt_ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    entries = entries or [None] * len(tokens)
    values = [None if lp is None else lp.logprob for lp in entries]
    tops = [
        None
        if lp is None
        else {ctx.decode_token(t): v for t, v in lp.top[:k]} | {ctx.decode_token(lp.token_id): lp.logprob}
        for lp in entries
    ]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _merge_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


async def _completion_chunks(ctx: ServingContext, request_id: str, resolved: Plan) -> Chunks:
    inputs = resolved.inputs
    offsets: dict[int, int] = {}
    states: dict[int, RequestState] = {}
    async with aclosing(ctx.engine.generate(request_id, inputs)) as updates:
        async for update in updates:
            states[update.state.index] = update.state
            yield _completion_body(ctx, request_id, [_completion_chunk_choice(ctx, resolved, update, offsets)])
    if resolved.include_usage:
        usage = _usage(inputs, [states[i] for i in sorted(states)])
        yield _completion_body(ctx, request_id, []) | {"usage": usage}


def _completion_chunk_choice(ctx: ServingContext, resolved: Plan, update: Update, offsets: dict[int, int]) -> dict:
    """One stream chunk's choice; ``offsets`` holds each choice's characters sent so far."""
    index, delta = update.state.index, update.delta
    echo = resolved.prompts[index // resolved.n].text if resolved.echo and index not in offsets else ""
    start = offsets.get(index, 0)
    offsets[index] = start + len(echo) + len(delta.text)
    logprobs = _completion_logprobs(ctx, delta.logprobs, start + len(echo)) if resolved.logprobs is not None else None
    if echo and logprobs is not None:
        echoed = _echo_logprobs(
            ctx, resolved.prompts[index // resolved.n].input.token_ids, update.state.prompt_logprobs, resolved.logprobs
        )
        logprobs = _merge_logprobs(echoed, logprobs)
    stop_reason = _stop_reason(update.state) if delta.finish_reason else None
    return {
        "index": index,
        "text": echo + delta.text,
        "logprobs": logprobs,
        "finish_reason": delta.finish_reason,
        "stop_reason": stop_reason,
    }


# -- /v1/chat/completions -----------------------------------------------------------------


async def chat(ctx: ServingContext, req: ChatCompletionRequest) -> dict | Chunks:
    ctx.check_model(req.model)
    if ctx.tasks is not None:
        ctx.tasks.require(("text_generation",), "/v1/chat/completions")
    resolved = await plan(ctx, req)
    request_id = new_id("chatcmpl")
    if resolved.stream:
        return _chat_chunks(ctx, request_id, resolved)
    states = await _collect(ctx, request_id, resolved.inputs)
    choices = [_chat_choice(ctx, resolved, s) for s in states]
    body = _chat_body(ctx, request_id, "chat.completion", choices) | {"usage": _usage(resolved.inputs, states)}
    if resolved.prompt_logprobs:
        body["prompt_logprobs"] = vllm_prompt_logprobs(ctx, states[0].prompt_logprobs)
    return body


def _chat_body(ctx: ServingContext, request_id: str, kind: str, choices: list[dict]) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": ctx.model_name, "choices": choices}


def _chat_choice(ctx: ServingContext, resolved: Plan, state: RequestState) -> dict:
    body, finish_reason = message(resolved.tools, state.text, state.finish_reason)
    return {
        "index": state.index,
        "message": body,
        "logprobs": _chat_logprobs(ctx, state.logprobs) if resolved.logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": _stop_reason(state),
    }


def _chat_logprobs(ctx: ServingContext, logprobs: Sequence[TokenLogprob]) -> dict:
    """The chat format: one entry per token with its bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        token = ctx.decode_token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ]
    }


async def _chat_chunks(ctx: ServingContext, request_id: str, resolved: Plan) -> Chunks:
    extra = {"usage": None} if resolved.include_usage else {}

    def chunk(choice: dict) -> dict:
        return _chat_body(ctx, request_id, "chat.completion.chunk", [choice]) | extra

    for index in range(resolved.n):  # the role comes first, once per choice
        yield chunk(
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )
    states: dict[int, RequestState] = {}
    tools = {index: ToolDeltas(resolved.tools) for index in range(resolved.n)}
    async with aclosing(ctx.engine.generate(request_id, resolved.inputs)) as updates:
        async for update in updates:
            states[update.state.index] = update.state
            for choice in _chat_chunk_choices(ctx, resolved, update, tools[update.state.index]):
                yield chunk(choice)
    if resolved.include_usage:
        usage = _usage(resolved.inputs, [states[i] for i in sorted(states)])
        yield _chat_body(ctx, request_id, "chat.completion.chunk", []) | {"usage": usage}


def _chat_chunk_choices(ctx: ServingContext, resolved: Plan, update: Update, tools: ToolDeltas) -> list[dict]:
    index, delta = update.state.index, update.delta
    choices = []
    if tools.mode.choice != "none":
        return _tool_chunk_choices(update, tools)
    wants_logprobs = resolved.logprobs is not None
    if delta.text or (wants_logprobs and delta.logprobs):
        logprobs = _chat_logprobs(ctx, delta.logprobs) if wants_logprobs else None
        choices.append({"index": index, "delta": {"content": delta.text}, "logprobs": logprobs, "finish_reason": None})
    if delta.finish_reason is not None:
        choices.append(
            {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": delta.finish_reason,
                "stop_reason": _stop_reason(update.state),
            }
        )
    return choices


def _tool_chunk_choices(update: Update, tools: ToolDeltas) -> list[dict]:
    """Chunks of a choice whose text may hold tool calls: content and tool_calls deltas."""
    index, delta = update.state.index, update.delta
    deltas = tools.feed(delta.text)
    finish_reason = None
    if delta.finish_reason is not None:
        more, finish_reason = tools.finish(delta.finish_reason)
        deltas += more
    choices = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    if finish_reason is not None:
        choices.append(
            {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": _stop_reason(update.state),
            }
        )
    return choices
