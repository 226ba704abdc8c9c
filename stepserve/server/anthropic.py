"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A Messages request (``anthropic_schemas.py``) is written down as the chat completions request
it stands for and resolved by ``plan_chat`` like any other (docs/architecture.md, invariant 1),
so the two routes honour the same things and refuse the same things; its errors are renamed to
Anthropic's spelling (``max_tokens``, ``stop_sequences``, ``input_schema``). The engine's output
is read once by ``answer.py`` and written here as a message with content blocks, or as
Anthropic's named server-sent events (the app's ``Wire`` frames them and writes errors in
Anthropic's shape).

What is accepted and has no effect: ``metadata.user_id`` (an identifier of the end user, not
a behaviour) and ``cache_control`` (prefix caching is automatic here). What cannot be honoured
is a 400 naming it: image and document blocks, server tools, ``service_tier``, ``container``,
``mcp_servers``, a final assistant message (prefill), and ``thinking`` without
``--reasoning-parser``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import Response

from stepserve.engine.output_processor import RequestState
from stepserve.errors import InvalidRequestError
from stepserve.server.answer import Answer, AnswerStream, CallArguments, CallStart, ContentPiece, Piece, ReasoningPiece
from stepserve.server.answer import final_answer
from stepserve.server.context import ServingContext
from stepserve.server.plan import Plan, plan
from stepserve.server.anthropic_schemas import CountTokensRequest, MediaBlock, Message, MessagesRequest, TextBlock
from stepserve.server.anthropic_schemas import Tool, ToolChoice, ToolResultBlock, ToolUseBlock, parse
from stepserve.server.schemas import ChatCompletionRequest

log = logging.getLogger("stepserve.server")

Chunks = AsyncIterator[dict]
MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens

# -- the request as the chat completions request it stands for ----------------------------


def chat_request(ctx: ServingContext, req: CountTokensRequest) -> ChatCompletionRequest:
    body: dict = {"model": req.model, "messages": _messages(req)}
    body |= _tools(req.tools, req.tool_choice) | _thinking(ctx, req)
    if isinstance(req, MessagesRequest):
        body |= _sampling(req)
    return ChatCompletionRequest.model_validate(body)


def _messages(req: CountTokensRequest) -> list[dict]:
    if not req.messages:
        raise InvalidRequestError("messages must contain at least one message (parameter=messages)", "messages")
    if req.messages[-1].role == "assistant":
        raise InvalidRequestError(
            f"messages[{len(req.messages) - 1}] is an assistant message: continuing a prefilled answer is not "
            "supported; end the conversation with a user message (parameter=messages)",
            "messages",
        )
    system = _system(req.system or [])
    out = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(req.messages):
        out += _turn(i, message)
    return out


def _system(blocks: list[TextBlock]) -> str:
    # Claude Code starts its system prompt with a billing line that changes every request; left
    # in, it would make every prompt's prefix new to the prefix cache (as vLLM drops it too).
    return "\n".join(b.text for b in blocks if not b.text.startswith("x-anthropic-billing-header"))


def _turn(index: int, message: Message) -> list[dict]:
    """The chat messages of one turn: a user turn's tool results come first, as tool messages."""
    texts, calls, results = [], [], []
    for j, block in enumerate(message.content):
        where = f"messages[{index}].content[{j}]"
        if isinstance(block, MediaBlock):
            raise InvalidRequestError(
                f"{where}: {block.type} blocks are not supported: this server's model reads text only "
                "(parameter=messages)",
                "messages",
            )
        if isinstance(block, (ToolUseBlock, ToolResultBlock)) and message.role != _ROLE_OF[block.type]:
            raise InvalidRequestError(
                f"{where}: {block.type} blocks belong to {_ROLE_OF[block.type]} messages (parameter=messages)",
                "messages",
            )
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
        elif isinstance(block, ToolResultBlock):
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(where, block)})
        # thinking and redacted_thinking blocks: left out (anthropic_schemas.ThinkingBlock)
    if message.role == "assistant":
        return [{"role": "assistant", "content": "\n".join(texts)} | ({"tool_calls": calls} if calls else {})]
    return results + ([{"role": "user", "content": "\n".join(texts)}] if texts or not results else [])


_ROLE_OF = {"tool_use": "assistant", "tool_result": "user"}


def _result_text(where: str, block: ToolResultBlock) -> str:
    for k, part in enumerate(block.content):
        if isinstance(part, MediaBlock):
            raise InvalidRequestError(
                f"{where}.content[{k}]: {part.type} blocks are not supported in tool results: this server's model "
                "reads text only (parameter=messages)",
                "messages",
            )
    text = "\n".join(part.text for part in block.content)
    return f"Error: {text}" if block.is_error else text


def _tools(tools: list[Tool] | None, choice: ToolChoice | None) -> dict:
    out: dict = {}
    for i, tool in enumerate(tools or ()):
        if tool.input_schema is None:
            raise InvalidRequestError(
                f"tools[{i}].input_schema is required: a JSON schema of the tool's input (parameter=tools)", "tools"
            )
    if tools:
        out["tools"] = [_function(tool) for tool in tools]
    if choice is None:
        return out
    if (choice.name is not None) != (choice.type == "tool"):
        raise InvalidRequestError(
            "tool_choice.name is required with type=tool, and only with it (parameter=tool_choice)", "tool_choice"
        )
    if choice.type == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


def _function(tool: Tool) -> dict:
    function = {"name": tool.name, "parameters": tool.input_schema}
    for key in ("description", "strict"):
        if getattr(tool, key) is not None:
            function[key] = getattr(tool, key)
    return {"type": "function", "function": function}


def _thinking(ctx: ServingContext, req: CountTokensRequest) -> dict:
    """enabled and disabled set the template's ``enable_thinking``; adaptive leaves the template's
    default. Thinking is shown only where --reasoning-parser can tell it from the answer."""
    thinking = req.thinking
    if thinking is None:
        return {}
    if (thinking.budget_tokens is not None) != (thinking.type == "enabled"):
        raise InvalidRequestError(
            "thinking.budget_tokens is required with type=enabled, and only with it (parameter=thinking)", "thinking"
        )
    if thinking.type == "disabled":
        return {"chat_template_kwargs": {"enable_thinking": False}}
    if ctx.config.reasoning_parser is None:
        raise InvalidRequestError(
            f"thinking type={thinking.type} needs the server started with --reasoning-parser, which tells the "
            "model's thinking from its answer (parameter=thinking)",
            "thinking",
        )
    if thinking.type == "adaptive":
        return {}
    budget, max_tokens = thinking.budget_tokens, getattr(req, "max_tokens", None)
    if budget < MIN_THINKING_BUDGET or (max_tokens is not None and budget >= max_tokens):
        raise InvalidRequestError(
            f"thinking.budget_tokens={budget} must be at least {MIN_THINKING_BUDGET} and less than "
            f"max_tokens={max_tokens} (parameter=thinking)",
            "thinking",
        )
    return {"chat_template_kwargs": {"enable_thinking": True}}


def _sampling(req: MessagesRequest) -> dict:
    """Only the fields the request gave: one left out takes the model's default (--generation-config)."""
    out: dict = {"max_tokens": req.max_tokens, "stream": req.stream}
    if req.stop_sequences is not None:
        out["stop"] = req.stop_sequences
    for name in ("temperature", "top_p", "top_k"):
        if getattr(req, name) is not None:
            out[name] = getattr(req, name)
    return out


_PARAMS = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences"}
_SPELLING = ((".function.parameters", ".input_schema"), (".function.name", ".name"), ("].function", "]"))


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    """A chat request's error, naming the field as Anthropic's client spelled it."""
    param = _PARAMS.get(exc.param, exc.param)
    message = exc.message.replace(f"(parameter={exc.param})", f"(parameter={param})")
    if param != exc.param and message.startswith(f"{exc.param} "):  # "stop must be ..."
        message = param + message[len(exc.param) :]
    for chat, ours in _SPELLING:
        message = message.replace(chat, ours)
    return InvalidRequestError(message, param)


async def _plan(ctx: ServingContext, req: CountTokensRequest) -> Plan:
    ctx.check_model(req.model)
    if ctx.tasks is not None:
        ctx.tasks.require(("text_generation",), "/v1/messages")
    try:
        return await plan(ctx, chat_request(ctx, req))
    except InvalidRequestError as exc:
        raise _renamed(exc) from None


# -- the routes ---------------------------------------------------------------------------


async def messages(ctx: ServingContext, raw: bytes) -> dict | Chunks:
    resolved = await _plan(ctx, parse(MessagesRequest, raw, ctx.unknown))
    message_id = f"msg_{uuid.uuid4().hex}"
    if resolved.stream:
        return _events(ctx, message_id, resolved)
    state = None
    async with aclosing(ctx.engine.generate(message_id, resolved.inputs)) as updates:
        async for update in updates:
            state = update.state
    answer = final_answer(resolved.tools, resolved.thinking, state.text, state.token_ids, state.finish_reason)
    stop_reason, stop_sequence = _stop(answer.finish_reason, state)
    usage = {"input_tokens": len(resolved.inputs[0].token_ids), "output_tokens": len(state.token_ids)}
    return _message(ctx, message_id, _blocks(answer), stop_reason, stop_sequence, usage)


async def count_tokens(ctx: ServingContext, raw: bytes) -> dict:
    """The prompt's tokens as ``/v1/messages`` would send them to the model (template and tools)."""
    resolved = await _plan(ctx, parse(CountTokensRequest, raw, ctx.unknown))
    return {"input_tokens": len(resolved.inputs[0].token_ids)}


def add_messages_routes(app: FastAPI, serve: Callable, wire: object) -> None:
    """``serve`` is the app's ``_serve``; ``wire`` its ``Wire`` for Anthropic (``error_body``,
    named events, no ``[DONE]``)."""
    for path, handler in (("/v1/messages", messages), ("/v1/messages/count_tokens", count_tokens)):
        _add(app, serve, wire, path, handler)


def _add(app: FastAPI, serve: Callable, wire: object, path: str, handler) -> None:
    async def route(request: Request) -> Response:
        return await serve(request, handler, wire)

    app.add_api_route(path, route, methods=["POST"], name=path)


class Failure(Protocol):
    """What ``app.HttpError`` shows of an error."""

    status: int
    message: str
    param: str | None


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(err: Failure) -> dict:
    """An error in Anthropic's shape, which has no ``param``: the message names the field."""
    message = err.message
    if err.param is not None and err.param not in message:
        message += f" (parameter={err.param})"
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(err.status, "api_error"), "message": message}}


# -- the answer ---------------------------------------------------------------------------


def _message(
    ctx: ServingContext,
    message_id: str,
    content: list[dict],
    stop_reason: str | None,
    stop_sequence: str | None,
    usage: dict,
) -> dict:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": ctx.model_name,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def _stop(finish_reason: str | None, state: RequestState) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence of a finished choice."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(state.stop_reason, str):  # a stop string; an int is a stop token (EOS)
        return "stop_sequence", state.stop_reason
    return "end_turn", None


def _blocks(answer: Answer) -> list[dict]:
    blocks = []
    if answer.reasoning:
        blocks.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
    if answer.content:
        blocks.append({"type": "text", "text": answer.content})
    for call in answer.calls:
        fn = call["function"]
        blocks.append(_tool_use(call["id"], fn["name"]) | {"input": tool_input(fn["arguments"])})
    return blocks


def _tool_use(call_id: str, name: str) -> dict:
    # Calls are named call_* by default; Anthropic's are toolu_*. A parser's own ids (Mistral's
    # nine characters, which its template checks when they come back) are kept.
    return {"type": "tool_use", "id": "toolu_" + call_id.removeprefix("call_"), "name": name, "input": {}}


def tool_input(arguments: str) -> dict:
    """A call's arguments as its ``input``, read as Anthropic's SDK reads a streamed input (jiter's
    partial mode: a prefix cut by max_tokens keeps its complete values), so both ways agree.
    Arguments that are no JSON object (a model's malformed call) give ``{}``, not a failed response."""
    try:
        value = pydantic_core.from_json(arguments or "{}", allow_partial=True)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("a tool call's arguments are not a JSON object; its input is {}: %.200r", arguments)
        return {}
    return value


# -- the answer as server-sent events -------------------------------------------------------


async def _events(ctx: ServingContext, message_id: str, resolved: Plan) -> Chunks:
    usage = {"input_tokens": len(resolved.inputs[0].token_ids), "output_tokens": 0}
    yield {"type": "message_start", "message": _message(ctx, message_id, [], None, None, usage)}
    yield {"type": "ping"}
    stream, blocks = AnswerStream(resolved.tools, resolved.thinking), _BlockEvents()
    state, finish_reason = None, None
    async with aclosing(ctx.engine.generate(message_id, resolved.inputs)) as updates:
        async for update in updates:
            state = update.state
            pieces = stream.feed(update.delta.text)
            if update.delta.finish_reason is not None:
                more, finish_reason = stream.finish(update.delta.finish_reason)
                pieces += more
            for event in blocks.add(pieces):
                yield event
    for event in blocks.close():
        yield event
    stop_reason, stop_sequence = _stop(finish_reason, state)
    delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
    yield {"type": "message_delta", "delta": delta, "usage": {"output_tokens": len(state.token_ids)}}
    yield {"type": "message_stop"}


@dataclass
class _BlockEvents:
    """The content block events of a streamed answer: one block open at a time, numbered in order
    (thinking, text, then each call), as the non-streamed message lists them."""

    started: int = 0  # blocks started; the open one is the last
    open: str | None = None  # "thinking", "text" or "call"
    calls: dict[int, int] = field(default_factory=dict)  # a call's index in the answer -> its block

    def add(self, pieces: list[Piece]) -> list[dict]:
        return [event for piece in pieces for event in self._piece(piece)]

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.started - 1}]

    def _piece(self, piece: Piece) -> list[dict]:
        if isinstance(piece, ReasoningPiece):
            start = self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            return start + [self._delta(self.started - 1, {"type": "thinking_delta", "thinking": piece.text})]
        if isinstance(piece, ContentPiece):
            if not piece.text:
                return []
            start = self._start("text", {"type": "text", "text": ""})
            return start + [self._delta(self.started - 1, {"type": "text_delta", "text": piece.text})]
        if isinstance(piece, CallStart):
            self.calls[piece.index] = self.started
            return self._start("call", _tool_use(piece.call_id, piece.name))
        assert isinstance(piece, CallArguments)
        delta = {"type": "input_json_delta", "partial_json": piece.text}
        return [self._delta(self.calls[piece.index], delta)]

    def _start(self, kind: str, block: dict) -> list[dict]:
        """The events that open a block of ``kind``: none while one is open (every call opens its own)."""
        if self.open == kind and kind != "call":
            return []
        events = self.close()
        self.open = kind
        self.started += 1
        return events + [{"type": "content_block_start", "index": self.started - 1, "content_block": block}]

    def _delta(self, index: int, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": index, "delta": delta}
