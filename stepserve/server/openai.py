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
from stepserve.server.answer import Answer, AnswerStream, CallArguments, CallStart, ContentPiece, Piece, ReasoningPiece
from stepserve.server.answer import final_answer


Chunks = AsyncIterator[dict]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- request -> SamplingParams ------------------------------------------------------------


def _stop_reason(state: RequestState) -> str | int | None:
    """The stop string or stop token id that ended the completion; None for EOS (as vLLM)."""
    reason = state.stop_reason
    return None if isinstance(reason, int) and reason not in state.params.stop_token_ids else reason


def _usage(prompts: Sequence[PromptInput], states: Sequence[RequestState], resolved: Plan | None = None) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(s.token_ids) for s in states)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if resolved is not None and resolved.thinking is not None:
        answers = [
            final_answer(resolved.tools, resolved.thinking, s.text, s.token_ids, s.finish_reason) for s in states
        ]
        usage["completion_tokens_details"] = {"reasoning_tokens": sum(a.reasoning_tokens for a in answers)}
    return usage


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
    usage = _usage(resolved.inputs, states, resolved)
    body = _chat_body(ctx, request_id, "chat.completion", choices) | {"usage": usage}
    if resolved.prompt_logprobs:
        body["prompt_logprobs"] = vllm_prompt_logprobs(ctx, states[0].prompt_logprobs)
    return body


def _chat_body(ctx: ServingContext, request_id: str, kind: str, choices: list[dict]) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": ctx.model_name, "choices": choices}


def _chat_choice(ctx: ServingContext, resolved: Plan, state: RequestState) -> dict:
    answer = final_answer(resolved.tools, resolved.thinking, state.text, state.token_ids, state.finish_reason)
    return {
        "index": state.index,
        "message": chat_message(answer, with_reasoning=resolved.thinking is not None),
        "logprobs": _chat_logprobs(ctx, state.logprobs) if resolved.logprobs is not None else None,
        "finish_reason": answer.finish_reason,
        "stop_reason": _stop_reason(state),
    }


def chat_message(answer: Answer, with_reasoning: bool) -> dict:
    """OpenAI's assistant message of a finished answer (``reasoning_content`` as vLLM names it)."""
    body: dict = {"role": "assistant", "content": answer.content}
    if with_reasoning:
        body["reasoning_content"] = answer.reasoning
    if answer.calls:
        body["tool_calls"] = answer.calls
    return body


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
    streams = {index: AnswerStream(resolved.tools, resolved.thinking) for index in range(resolved.n)}
    async with aclosing(ctx.engine.generate(request_id, resolved.inputs)) as updates:
        async for update in updates:
            states[update.state.index] = update.state
            for choice in _chat_chunk_choices(ctx, resolved, update, streams[update.state.index]):
                yield chunk(choice)
    if resolved.include_usage:
        usage = _usage(resolved.inputs, [states[i] for i in sorted(states)], resolved)
        yield _chat_body(ctx, request_id, "chat.completion.chunk", []) | {"usage": usage}


def chat_delta(piece: Piece) -> dict:
    """OpenAI's chat delta of one piece of an answer."""
    if isinstance(piece, ReasoningPiece):
        return {"reasoning_content": piece.text}
    if isinstance(piece, ContentPiece):
        return {"content": piece.text}
    if isinstance(piece, CallStart):
        call = {"index": piece.index, "id": piece.call_id, "type": "function"}
        return {"tool_calls": [call | {"function": {"name": piece.name, "arguments": ""}}]}
    assert isinstance(piece, CallArguments)
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}


def _chat_chunk_choices(ctx: ServingContext, resolved: Plan, update: Update, stream: AnswerStream) -> list[dict]:
    """Chunks of one update of a choice: its pieces as deltas (the update's logprobs on the
    first), then the finish."""
    index, delta = update.state.index, update.delta
    pieces = stream.feed(delta.text)
    finish_reason = None
    if delta.finish_reason is not None:
        more, finish_reason = stream.finish(delta.finish_reason)
        pieces += more
    logprobs = _chat_logprobs(ctx, delta.logprobs) if resolved.logprobs is not None and delta.logprobs else None
    if logprobs is not None and not pieces:  # tokens that are no text yet still report their logprobs
        pieces = [ContentPiece("")]
    choices = []
    for i, piece in enumerate(pieces):
        choices.append(
            {
                "index": index,
                "delta": chat_delta(piece),
                "logprobs": logprobs if i == 0 else None,
                "finish_reason": None,
            }
        )
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
