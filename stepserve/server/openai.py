"""The OpenAI protocol: requests become resolved prompts, engine updates become responses.

``complete`` and ``chat`` validate everything (docs/architecture.md, invariant 1) before the engine sees a
token, then return either a response body or, for ``stream=true``, an async iterator of chunk
bodies that the app frames as server-sent events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import TypeVar

from stepserve.core.outputs import TokenLogprob
from stepserve.engine.async_engine import PromptInput, Update
from stepserve.engine.output_processor import RequestState
from stepserve.errors import InvalidRequestError
from stepserve.sampling import SamplingParams
from stepserve.server.context import ServingContext
from stepserve.server.constraints import output_constraint, requested_constraints
from stepserve.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, _SamplingFields
from stepserve.server.tool_calls import ToolDeltas, ToolMode, message, template_tool_calls, template_tools, tool_mode
from stepserve.sampling import GrammarSpec
from stepserve.structured.tool_parsers import keeps_special_tokens

ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default on /v1/completions

Chunks = AsyncIterator[dict]
_T = TypeVar("_T")
_R = TypeVar("_R")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- request -> SamplingParams ------------------------------------------------------------


def sampling_params(
    ctx: ServingContext,
    req: _SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    structured: GrammarSpec | None = None,
) -> SamplingParams:
    """The request's SamplingParams, ``max_tokens`` still unresolved; 400 on any bad value."""
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidRequestError(
            "prompt_logprobs is not available with stream=true: prompt logprobs come only in a whole response "
            "(vLLM refuses them with stream too); send stream=false, or use echo with logprobs on /v1/completions",
            "prompt_logprobs",
        )
    ctx.check_token_ids(req.stop_token_ids or (), "stop_token_ids")
    ctx.check_token_ids(_bias_ids(req.logit_bias), "logit_bias")
    _check_best_of(req)
    if req.top_k > ctx.vocab_size:
        raise InvalidRequestError(
            f"top_k={req.top_k} exceeds the vocabulary size {ctx.vocab_size} (parameter=top_k)", "top_k"
        )
    return SamplingParams(
        n=req.n,
        temperature=_given_or_default(ctx, req, "temperature", 1.0),
        top_p=_given_or_default(ctx, req, "top_p", 1.0),
        top_k=_given_or_default(ctx, req, "top_k", 0),
        min_p=_given_or_default(ctx, req, "min_p", 0.0),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=_given_or_default(ctx, req, "repetition_penalty", 1.0),
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        logit_bias=req.logit_bias,
        skip_special_tokens=req.skip_special_tokens,
        structured=structured,
        prompt_logprobs=req.prompt_logprobs,
    )


def _check_best_of(req: _SamplingFields) -> None:
    """best_of is honoured only as n: every sampled completion is returned (as vLLM V1)."""
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError(
            f"best_of={req.best_of} must equal n={req.n}: completions are not ranked, every one sampled is returned "
            "(parameter=best_of)",
            "best_of",
        )


def _given_or_default(ctx: ServingContext, req: _SamplingFields, name: str, fallback: float) -> float:
    """The request's value; if it left the field out (or sent null), the model's default
    (--generation-config), else ``fallback``."""
    value = getattr(req, name) if name in req.model_fields_set else None
    if value is None:
        value = getattr(ctx.sampling_defaults, name)
    return fallback if value is None else value


def _bias_ids(bias: dict[str, float] | None) -> list[int]:
    try:
        return [int(key) for key in bias or {}]
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", "logit_bias") from None


def _renamed(exc: InvalidRequestError, names: dict[str, str]) -> InvalidRequestError:
    """The same error, naming the parameter as this route's client spelled it."""
    param = names.get(exc.param, exc.param)
    message = exc.message.replace(f"(parameter={exc.param})", f"(parameter={param})")
    return InvalidRequestError(message, param)


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


def completion_prompts(
    ctx: ServingContext,
    req: CompletionRequest,
    constraint: tuple[str, GrammarSpec] | None,
) -> list[tuple[str, PromptInput]]:
    """(prompt text, resolved prompt) for each prompt of the request; ``constraint`` is what
    ``output_constraint`` gave for it."""
    if req.suffix is not None:
        raise InvalidRequestError("suffix is not supported: this server does not fill in the middle", "suffix")
    params = sampling_params(ctx, req, req.max_tokens, req.logprobs, constraint[1] if constraint else None)
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get their logprobs too
        params = params.replace(prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0))
    items = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else list(req.prompt)
    if not items:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    out = []
    for item in items:
        ids = ctx.encode(item, "prompt") if isinstance(item, str) else tuple(item)
        ctx.check_token_ids(ids, "prompt")
        text = item if isinstance(item, str) else ctx.tokenizer.decode(ids)
        out.append((text, ctx.prompt_input(ids, params, COMPLETIONS_DEFAULT_MAX_TOKENS)))
    return out


async def off_loop(compile_fn: Callable[[ServingContext, _T], _R], ctx: ServingContext, req: _T) -> _R:
    """``compile_fn(ctx, req)``, in a worker thread when the request carries a constraint or
    tools: checking a new grammar may take up to its time bound (seconds), and the event loop
    must keep serving every other request meanwhile. Free requests stay on the loop (no hop)."""
    if not requested_constraints(req) and not getattr(req, "tools", None):
        return compile_fn(ctx, req)
    return await asyncio.to_thread(compile_fn, ctx, req)


def _is_ids(prompt) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


async def complete(ctx: ServingContext, req: CompletionRequest) -> dict | Chunks:
    ctx.check_model(req.model)
    prompts = completion_prompts(ctx, req, await off_loop(output_constraint, ctx, req))
    request_id = new_id("cmpl")
    if req.stream:
        return _completion_chunks(ctx, req, request_id, prompts)
    inputs = [p for _, p in prompts]
    states = await _collect(ctx, request_id, inputs)
    choices = [_completion_choice(ctx, req, prompts, s) for s in states]
    return _completion_body(ctx, request_id, choices) | {"usage": _usage(inputs, states)}


def _completion_body(ctx: ServingContext, request_id: str, choices: list[dict]) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
        "choices": choices,
    }


def _completion_choice(ctx: ServingContext, req: CompletionRequest, prompts, state: RequestState) -> dict:
    prompt_text = prompts[state.index // req.n][0] if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        logprobs = _completion_logprobs(ctx, state.logprobs, len(prompt_text))
        if req.echo:
            echoed = _echo_logprobs(
                ctx, prompts[state.index // req.n][1].token_ids, state.prompt_logprobs, req.logprobs
            )
            logprobs = _merge_logprobs(echoed, logprobs)
    choice = {
        "index": state.index,
        "text": prompt_text + state.text,
        "logprobs": logprobs,
        "finish_reason": state.finish_reason,
        "stop_reason": _stop_reason(state),
    }
    if req.prompt_logprobs is not None:
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


async def _completion_chunks(ctx: ServingContext, req: CompletionRequest, request_id: str, prompts) -> Chunks:
    inputs = [p for _, p in prompts]
    offsets: dict[int, int] = {}
    states: dict[int, RequestState] = {}
    async with aclosing(ctx.engine.generate(request_id, inputs)) as updates:
        async for update in updates:
            states[update.state.index] = update.state
            yield _completion_body(ctx, request_id, [_completion_chunk_choice(ctx, req, prompts, update, offsets)])
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = _usage(inputs, [states[i] for i in sorted(states)])
        yield _completion_body(ctx, request_id, []) | {"usage": usage}


def _completion_chunk_choice(
    ctx: ServingContext, req: CompletionRequest, prompts, update: Update, offsets: dict[int, int]
) -> dict:
    """One stream chunk's choice; ``offsets`` holds each choice's characters sent so far."""
    index, delta = update.state.index, update.delta
    echo = prompts[index // req.n][0] if req.echo and index not in offsets else ""
    start = offsets.get(index, 0)
    offsets[index] = start + len(echo) + len(delta.text)
    logprobs = _completion_logprobs(ctx, delta.logprobs, start + len(echo)) if req.logprobs is not None else None
    if echo and logprobs is not None:
        echoed = _echo_logprobs(ctx, prompts[index // req.n][1].token_ids, update.state.prompt_logprobs, req.logprobs)
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


def _message_dict(index: int, message: ChatMessage) -> dict:
    if message.role not in ROLES:
        raise InvalidRequestError(
            f"messages[{index}].role={message.role!r} is not one of {', '.join(ROLES)}", "messages"
        )
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)  # as vLLM joins text parts
    out = {"role": message.role, "content": content or ""}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(message, key) is not None:
            out[key] = getattr(message, key)
    if message.tool_calls is not None:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    return out


def chat_constraints(ctx: ServingContext, req: ChatCompletionRequest) -> tuple[GrammarSpec | None, ToolMode]:
    """The output grammar (from response_format and the like, or forced tool calls) and the tool mode."""
    constraint = output_constraint(ctx, req)
    mode = tool_mode(ctx, req, constraint[0] if constraint else None)
    return mode.spec or (constraint[1] if constraint else None), mode


def chat_prompt(
    ctx: ServingContext, req: ChatCompletionRequest, constraints: tuple[GrammarSpec | None, ToolMode] | None = None
) -> PromptInput:
    """The conversation rendered and resolved; errors name the chat spelling of parameters."""
    if not req.messages:
        raise InvalidRequestError("messages must contain at least one message", "messages")
    messages = [_message_dict(i, m) for i, m in enumerate(req.messages)]
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
    alias = req.max_completion_tokens is not None
    names = {
        "prompt": "messages",
        "logprobs": "top_logprobs",
        "max_tokens": "max_completion_tokens" if alias else "max_tokens",
    }
    try:
        max_tokens = req.max_completion_tokens if alias else req.max_tokens
        spec, mode = constraints if constraints is not None else chat_constraints(ctx, req)
        params = sampling_params(ctx, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, spec)
        if mode.choice == "auto" and keeps_special_tokens(mode.parser):  # its call marker is one (as vLLM)
            params = params.replace(skip_special_tokens=False)
        ids = ctx.encode_chat(messages, req.add_generation_prompt, req.chat_template_kwargs, template_tools(req))
        return ctx.prompt_input(ids, params, None)
    except InvalidRequestError as exc:
        raise _renamed(exc, names) from None


async def chat(ctx: ServingContext, req: ChatCompletionRequest) -> dict | Chunks:
    ctx.check_model(req.model)
    if ctx.tasks is not None:
        ctx.tasks.require(("text_generation",), "/v1/chat/completions")
    constraints = await off_loop(chat_constraints, ctx, req)
    prompt = chat_prompt(ctx, req, constraints)
    mode = constraints[1]
    request_id = new_id("chatcmpl")
    if req.stream:
        return _chat_chunks(ctx, req, request_id, prompt, mode)
    states = await _collect(ctx, request_id, [prompt])
    choices = [_chat_choice(ctx, req, s, mode) for s in states]
    body = _chat_body(ctx, request_id, "chat.completion", choices) | {"usage": _usage([prompt], states)}
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = vllm_prompt_logprobs(ctx, states[0].prompt_logprobs)
    return body


def _chat_body(ctx: ServingContext, request_id: str, kind: str, choices: list[dict]) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": ctx.model_name, "choices": choices}


def _chat_choice(ctx: ServingContext, req: ChatCompletionRequest, state: RequestState, mode: ToolMode) -> dict:
    body, finish_reason = message(mode, state.text, state.finish_reason)
    return {
        "index": state.index,
        "message": body,
        "logprobs": _chat_logprobs(ctx, state.logprobs) if req.logprobs else None,
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


async def _chat_chunks(
    ctx: ServingContext, req: ChatCompletionRequest, request_id: str, prompt: PromptInput, mode: ToolMode
) -> Chunks:
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict) -> dict:
        return _chat_body(ctx, request_id, "chat.completion.chunk", [choice]) | extra

    for index in range(req.n):  # the role comes first, once per choice
        yield chunk(
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )
    states: dict[int, RequestState] = {}
    tools = {index: ToolDeltas(mode) for index in range(req.n)}
    async with aclosing(ctx.engine.generate(request_id, [prompt])) as updates:
        async for update in updates:
            states[update.state.index] = update.state
            for choice in _chat_chunk_choices(ctx, req, update, tools[update.state.index]):
                yield chunk(choice)
    if include_usage:
        usage = _usage([prompt], [states[i] for i in sorted(states)])
        yield _chat_body(ctx, request_id, "chat.completion.chunk", []) | {"usage": usage}


def _chat_chunk_choices(
    ctx: ServingContext, req: ChatCompletionRequest, update: Update, tools: ToolDeltas
) -> list[dict]:
    index, delta = update.state.index, update.delta
    choices = []
    if tools.mode.choice != "none":
        return _tool_chunk_choices(update, tools)
    if delta.text or (req.logprobs and delta.logprobs):
        logprobs = _chat_logprobs(ctx, delta.logprobs) if req.logprobs else None
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
