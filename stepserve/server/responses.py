"""OpenAI's Responses API: ``POST /v1/responses``, and ``GET``/``DELETE /v1/responses/{id}`` for
stored responses (also under ``/openai/v1``).

A request becomes the chat completions request it stands for (its input items as messages,
``instructions`` first), so ``plan_chat`` resolves it in the one pass every chat request takes
(docs/architecture.md, invariant 1); its errors are renamed to the Responses spelling
(``max_output_tokens``, ``text.format``, ``input``). The answer is read by ``answer.py`` as for
chat and written down by ``responses_output.py``; ``store`` keeps it in ``responses_store.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, Discriminator, Field, FiniteFloat, StrictBool, Tag, TypeAdapter, field_validator

from stepserve.engine.output_processor import RequestState
from stepserve.errors import InvalidRequestError, StepserveError
from stepserve.server.answer import AnswerStream, final_answer, reasoning_tokens
from stepserve.server.context import ServingContext
from stepserve.server.plan import Plan, plan
from stepserve.server.responses_output import Counts, ResponseEvents, new_id, output_items, response_body
from stepserve.server.responses_store import ResponseStore, StoredResponse
from stepserve.server.schemas import ChatCompletionRequest, Int64, _Body, _SEED_BOUND, parse_body

Chunks = AsyncIterator[dict]

# -- the request --------------------------------------------------------------------------


class InputText(_Body):
    type: Literal["input_text"]
    text: str


class OutputText(_Body):
    """A part of an earlier answer, replayed as input (its annotations and logprobs are ignored)."""

    type: Literal["output_text"]
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list | None = None


def _as_parts(content: object) -> object:
    return [{"type": "input_text", "text": content}] if isinstance(content, str) else content


def _as_items(value: object) -> object:
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


# A string is read as one text part (or one user message), so that a bad list is reported as
# itself rather than as "not a string".
TextParts = Annotated[list[Annotated[InputText | OutputText, Field(discriminator="type")]], BeforeValidator(_as_parts)]


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextParts
    id: str | None = None  # set on a replayed output message
    status: str | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Annotated[list[InputText], BeforeValidator(_as_parts)]
    id: str | None = None
    status: str | None = None


class ReasoningText(_Body):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Body):
    """Thinking from an earlier answer: dropped from the prompt, as chat templates drop old thinking."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_kind(item: object) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return kind if isinstance(kind, str) else ""


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_kind,
        custom_error_type="input_item",
        custom_error_message="an item is a message, function_call, function_call_output or reasoning item",
    ),
]
_ITEMS = TypeAdapter(list[InputItem])


class FunctionTool(_Body):
    type: str
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: StrictBool | None = None  # arguments are enforced (and closed) when the call is forced, either way

    @field_validator("type")
    @classmethod
    def _function_only(cls, kind: str) -> str:
        if kind != "function":
            raise ValueError(f"tools of type {kind!r} are not served here: only function tools (type=function)")
        return kind


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # the schema's name (only reported back)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # needed by type=json_schema
    strict: StrictBool | None = None  # enforced either way; true also closes objects


class TextConfig(_Body):
    format: TextFormat | None = None


class ReasoningConfig(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None  # -> reasoning_effort
    summary: str | None = None  # no summaries are produced: null only

    @field_validator("summary")
    @classmethod
    def _no_summary(cls, summary: str | None) -> None:
        if summary is not None:
            raise ValueError("no reasoning summaries are produced here: send null (the thinking is in the output)")
        return None


class ResponsesRequest(_Body):
    model: str | None = None
    input: Annotated[list[InputItem], BeforeValidator(_as_items)]  # a string is one user message
    instructions: str | None = None  # a system message before the input (not carried to a next response)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = None
    max_output_tokens: Int64 | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    stream: StrictBool = False
    metadata: dict[str, str] | None = None  # echoed back
    user: str | None = None
    store: StrictBool = True  # keep the response for retrieval and previous_response_id
    previous_response_id: str | None = None  # continue that stored response's conversation
    reasoning: ReasoningConfig | None = None
    truncation: str | None = None  # "disabled" only: "auto" would drop input silently
    include: list[str] | None = None  # nothing extra can be included: empty only
    # OpenAI's advisory fields: accepted, and they change nothing in the output
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # vLLM's sampling extensions, passed on as on chat
    seed: int | None = Field(default=None, ge=-_SEED_BOUND, le=_SEED_BOUND)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    top_k: Int64 = 0
    min_p: FiniteFloat = 0.0
    repetition_penalty: FiniteFloat = 1.0
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    ignore_eos: StrictBool = False
    min_tokens: Int64 = 0

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, truncation: str | None) -> str | None:
        if truncation not in (None, "disabled"):
            raise ValueError(f"truncation={truncation!r} is not served: input is never dropped, send 'disabled'")
        return truncation

    @field_validator("include")
    @classmethod
    def _nothing_to_include(cls, include: list[str] | None) -> list[str] | None:
        if include:
            raise ValueError(f"{include[0]!r} cannot be included: this server adds nothing to its output items")
        return include


# Fields a chat request takes under the same name, passed on only when given (so that the
# model's sampling defaults apply to the rest, as on chat).
_PASSED = (
    "temperature", "top_p", "seed", "stop", "stop_token_ids", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "ignore_eos", "min_tokens", "parallel_tool_calls", "user", "model",
)  # fmt: skip
# The chat spelling of a parameter -> the Responses one, for errors raised by plan_chat.
_NAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "chat_template_kwargs": "reasoning",
}


# -- Responses request -> chat request ----------------------------------------------------


def chat_request(req: ResponsesRequest, items: list) -> ChatCompletionRequest:
    """The chat completions request this one stands for; ``items`` is the whole conversation."""
    body: dict = {name: getattr(req, name) for name in _PASSED if name in req.model_fields_set}
    system = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    conversation = system + messages(items)
    if not conversation:
        raise InvalidRequestError("input has no message to answer (reasoning items are left out)", "input")
    body |= {"messages": conversation, "max_tokens": req.max_output_tokens, "stream": req.stream}
    if req.tools:
        body["tools"] = [{"type": "function", "function": _function(t)} for t in req.tools]
    if isinstance(req.tool_choice, ToolChoiceFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if req.text is not None and req.text.format is not None:
        body["response_format"] = _response_format(req.text.format)
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["chat_template_kwargs"] = {"reasoning_effort": req.reasoning.effort}  # as vLLM passes it
    return ChatCompletionRequest.model_validate(body)


def _function(tool: FunctionTool) -> dict:
    return tool.model_dump(exclude_none=True, exclude={"type"})


def _response_format(fmt: TextFormat) -> dict:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    if fmt.schema_ is None:
        raise InvalidRequestError("text.format.schema is required with type=json_schema", "text.format")
    schema = {"name": fmt.name or "response", "description": fmt.description, "schema": fmt.schema_}
    return {"type": "json_schema", "json_schema": schema | {"strict": fmt.strict}}


def messages(items: list) -> list[dict]:
    """Chat messages of input items: consecutive calls join one assistant message (the one they
    follow, if it is the assistant's), outputs are tool messages, old thinking is dropped."""
    out: list[dict] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text_parts(item.content)})
        elif isinstance(item, FunctionCallItem):
            fn = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": fn}
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            out[-1]["tool_calls"] = out[-1].get("tool_calls", []) + [call]
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text_parts(item.output)})
    return out


def _text_parts(content: list) -> list[dict]:
    return [{"type": "text", "text": part.text} for part in content]


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    """plan_chat's error in the Responses spelling: ``tools[0].function.parameters`` is
    ``tools[0].parameters`` here, ``max_tokens`` is ``max_output_tokens``, and so on."""
    param = _NAMES.get(exc.param, exc.param)
    message = exc.message.replace(f"(parameter={exc.param})", f"(parameter={param})")
    message = re.sub(r"\b(tools\[\d+\])\.function\.", r"\1.", message)
    message = re.sub(r"\bmax_tokens\b", "max_output_tokens", message).replace("response_format", "text.format")
    if param is not None:
        param = re.sub(r"^(tools\[\d+\])\.function\.", r"\1.", param)
    return InvalidRequestError(message, param)


# -- POST /v1/responses -------------------------------------------------------------------


async def create(ctx: ServingContext, store: ResponseStore, raw: bytes) -> dict | Chunks:
    req = parse_body(ResponsesRequest, raw, ctx.unknown)
    ctx.check_model(req.model)
    if ctx.tasks is not None:
        ctx.tasks.require(("text_generation",), "/v1/responses")
    items = _conversation(store, req)
    try:
        resolved = await plan(ctx, chat_request(req, items))
    except InvalidRequestError as exc:
        raise _renamed(exc) from None
    response_id = new_id("resp")
    shell = _shell(ctx, req, resolved, response_id)
    if req.stream:
        return _stream(ctx, store, req, resolved, shell, items)
    state = await _run(ctx, response_id, resolved)
    answer = final_answer(resolved.tools, resolved.thinking, state.text, state.token_ids, state.finish_reason)
    counts = _counts(resolved, state, answer.reasoning_tokens)
    body = response_body(shell, output_items(answer), state.finish_reason, counts)
    _remember(store, req, body, items)
    return body


def _conversation(store: ResponseStore, req: ResponsesRequest) -> list:
    """The previous response's conversation (a 404 for an unknown id), then this input."""
    if req.previous_response_id is None:
        return list(req.input)
    return list(store.get(req.previous_response_id, "previous_response_id").items) + list(req.input)


async def _run(ctx: ServingContext, request_id: str, resolved: Plan) -> RequestState:
    """The one completion run to its end (n is 1 here)."""
    state = None
    async with aclosing(ctx.engine.generate(request_id, resolved.inputs)) as updates:
        async for update in updates:
            state = update.state
    return state


def _counts(resolved: Plan, state: RequestState, thinking_tokens: int) -> Counts:
    prompt = resolved.inputs[0].token_ids
    return Counts(len(prompt), state.num_cached_tokens, len(state.token_ids), thinking_tokens)


def _remember(store: ResponseStore, req: ResponsesRequest, body: dict, items: list) -> None:
    if req.store:
        store.put(body["id"], StoredResponse(body, tuple(items + _ITEMS.validate_python(body["output"]))))


def _shell(ctx: ServingContext, req: ResponsesRequest, resolved: Plan, response_id: str) -> dict:
    """The Response without its outcome: its id, model and the settings it ran with."""
    params = resolved.inputs[0].params
    mode = resolved.tools
    choice = {"type": "function", "name": mode.name} if mode.choice == "named" else mode.choice
    text_format = {"type": "text"}
    if req.text is not None and req.text.format is not None:
        text_format = req.text.format.model_dump(by_alias=True, exclude_none=True)
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": ctx.model_name,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
        "tool_choice": choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "text": {"format": text_format},
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_output_tokens": req.max_output_tokens,
        "previous_response_id": req.previous_response_id,
        "reasoning": req.reasoning.model_dump() if req.reasoning is not None else None,
        "truncation": "disabled",
        "metadata": req.metadata or {},
        "store": req.store,
        "user": req.user,
        "output": [],
        "usage": None,
    }


async def _stream(
    ctx: ServingContext, store: ResponseStore, req: ResponsesRequest, resolved: Plan, shell: dict, items: list
) -> Chunks:
    """The typed events; a failure mid-stream is ``response.failed``, then the error itself (the
    app frames it, and the openai client raises it)."""
    events = ResponseEvents(shell)
    for event in events.start():
        yield event
    answer = AnswerStream(resolved.tools, resolved.thinking)
    state = finish_reason = None
    try:
        async with aclosing(ctx.engine.generate(shell["id"], resolved.inputs)) as updates:
            async for update in updates:
                state = update.state
                pieces = answer.feed(update.delta.text)
                if update.delta.finish_reason is not None:
                    more, finish_reason = answer.finish(update.delta.finish_reason)
                    pieces += more
                for piece in pieces:
                    for event in events.piece(piece):
                        yield event
    except Exception as exc:
        yield events.failed(str(exc) if isinstance(exc, StepserveError) else f"internal error: {type(exc).__name__}")
        raise
    thinking = reasoning_tokens(resolved.thinking, state.token_ids, answer.reasoning_ended)
    closing, body = events.finish(finish_reason, _counts(resolved, state, thinking))
    _remember(store, req, body, items)
    for event in closing:
        yield event


# -- stored responses ---------------------------------------------------------------------


async def retrieve(store: ResponseStore, response_id: str) -> dict:
    return store.get(response_id).body


async def delete(store: ResponseStore, response_id: str) -> dict:
    store.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


# -- routes -------------------------------------------------------------------------------


def add_responses_routes(app: FastAPI, serve: Callable, wire: object) -> None:
    """``serve`` is the app's ``_serve`` (disconnects, the one error mapping) and ``wire`` the
    Responses framing it takes (named events, no ``[DONE]``). The store is this app's."""
    store = ResponseStore()
    for prefix in ("/v1", "/openai/v1"):
        _add_routes(app, serve, wire, store, prefix + "/responses")


def _add_routes(app: FastAPI, serve: Callable, wire: object, store: ResponseStore, path: str) -> None:
    async def post(request: Request) -> Response:
        return await serve(request, lambda ctx, raw: create(ctx, store, raw), wire)

    async def get(response_id: str, request: Request) -> Response:
        return await serve(request, lambda ctx, raw: retrieve(store, response_id), wire)

    async def remove(response_id: str, request: Request) -> Response:
        return await serve(request, lambda ctx, raw: delete(store, response_id), wire)

    app.add_api_route(path, post, methods=["POST"], name=path)
    app.add_api_route(path + "/{response_id}", get, methods=["GET"], name=path + "/get")
    app.add_api_route(path + "/{response_id}", remove, methods=["DELETE"], name=path + "/delete")
