"""One resolution of a request (docs/architecture.md, invariant 1): a completions or chat request
(and KServe's v1/v2, which stand for a completions request) becomes one frozen ``Plan`` in one
pass of this module: the prompts' token ids with their resolved ``SamplingParams``, the output
constraint, the tool mode and the response's shape. Every bad value is a 400 naming its field
here, before the engine sees a token; the routes only parse their protocol in and render the
engine's output back.

Checking a new grammar may take up to its time bound (seconds): ``plan`` runs the resolution in a
worker thread when the request carries a constraint or tools, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from dataclasses import dataclass

from stepserve.core.outputs import LoraRef
from stepserve.engine.async_engine import PromptInput
from stepserve.errors import InvalidRequestError
from stepserve.sampling import GrammarSpec, SamplingParams
from stepserve.server.context import ServingContext
from stepserve.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, _SamplingFields
from stepserve.server.schemas import _StructuredFields
from stepserve.server.answer import Thinking
from stepserve.server.tool_calls import ToolMode
from stepserve.structured.reasoning import prompt_state
from stepserve.structured.tool_parsers import keeps_special_tokens
from stepserve.structured.tools import required_calls_grammar

ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default on /v1/completions
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NO_TOOLS = ToolMode("none")


@dataclass(frozen=True)
class PlannedPrompt:
    """One prompt of a request, ready for the engine."""

    text: str  # the prompt as text (what echo returns)
    input: PromptInput  # its token ids and resolved SamplingParams (n completions are made of it)


@dataclass(frozen=True)
class Plan:
    """A request resolved: what the engine runs and how the response is rendered."""

    prompts: tuple[PlannedPrompt, ...]  # in the request's order; choice p * n + i is completion i of prompt p
    tools: ToolMode  # how tool calls are read from the output (chat); NO_TOOLS elsewhere
    stream: bool  # answer as server-sent events
    include_usage: bool  # a stream's last chunk carries usage
    logprobs: int | None  # alternatives per generated token in the response; None: no logprobs
    prompt_logprobs: bool  # the response carries vLLM's prompt_logprobs
    echo: bool = False  # completions: the prompt before each choice's text
    thinking: Thinking | None = None  # chat: how the answer holds reasoning (--reasoning-parser); None: it does not

    @property
    def inputs(self) -> list[PromptInput]:
        return [p.input for p in self.prompts]

    @property
    def n(self) -> int:
        """Completions per prompt (the output constraint is in each prompt's params too)."""
        return self.prompts[0].input.params.n


async def plan(ctx: ServingContext, req: CompletionRequest | ChatCompletionRequest) -> Plan:
    """The request's plan, resolved off the event loop when a grammar must be checked."""
    resolve = plan_chat if isinstance(req, ChatCompletionRequest) else plan_completion
    if not requested_constraints(req) and not getattr(req, "tools", None):
        return resolve(ctx, req)
    return await asyncio.to_thread(resolve, ctx, req)


# -- /v1/completions ----------------------------------------------------------------------


def plan_completion(ctx: ServingContext, req: CompletionRequest) -> Plan:
    if req.suffix is not None:
        raise InvalidRequestError("suffix is not supported: this server does not fill in the middle", "suffix")
    lora = ctx.adapter(req.model)
    constraint = output_constraint(ctx, req)
    spec = constraint[1] if constraint else None
    params = sampling_params(ctx, req, req.max_tokens, req.logprobs, spec)
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get their logprobs too
        params = params.replace(prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0))
    items = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else list(req.prompt)
    if not items:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    prompts = []
    for item in items:
        ids = encode(ctx, item, "prompt") if isinstance(item, str) else tuple(item)
        ctx.check_token_ids(ids, "prompt")
        text = item if isinstance(item, str) else ctx.tokenizer.decode(ids)
        prompts.append(PlannedPrompt(text, prompt_input(ctx, ids, params, COMPLETIONS_DEFAULT_MAX_TOKENS, lora)))
    return Plan(
        tuple(prompts),
        NO_TOOLS,
        req.stream,
        _include_usage(req),
        req.logprobs,
        req.prompt_logprobs is not None,
        req.echo,
    )


def _is_ids(prompt) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _include_usage(req: _SamplingFields) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


# -- /v1/chat/completions -----------------------------------------------------------------


def plan_chat(ctx: ServingContext, req: ChatCompletionRequest) -> Plan:
    """The conversation rendered and resolved; errors name the chat spelling of parameters."""
    if not req.messages:
        raise InvalidRequestError("messages must contain at least one message", "messages")
    lora = ctx.adapter(req.model)
    messages = [_message_dict(i, m) for i, m in enumerate(req.messages)]
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
    alias = req.max_completion_tokens is not None
    names = {
        "prompt": "messages",
        "logprobs": "top_logprobs",
        "max_tokens": "max_completion_tokens" if alias else "max_tokens",
    }
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    try:
        constraint = output_constraint(ctx, req)
        mode = tool_mode(ctx, req, constraint[0] if constraint else None)
        spec = mode.spec or (constraint[1] if constraint else None)
        params = sampling_params(ctx, req, req.max_completion_tokens if alias else req.max_tokens, logprobs, spec)
        if mode.choice == "auto" and keeps_special_tokens(mode.parser):  # its call marker is one (as vLLM)
            params = params.replace(skip_special_tokens=False)
        ids = encode_chat(ctx, messages, req.add_generation_prompt, req.chat_template_kwargs, _template_tools(req))
        thinking = _thinking(ctx, ids)
        if thinking is not None and params.structured is not None and thinking.prompt_state != "closed":
            # the constraint holds the answer, after the thinking (as vLLM's reasoning-aware structured output)
            params = params.replace(structured=dataclasses.replace(params.structured, after=thinking.end_token_id))
        prompt = PlannedPrompt("", prompt_input(ctx, ids, params, None, lora))
    except InvalidRequestError as exc:
        raise _renamed(exc, names) from None
    return Plan(
        (prompt,), mode, req.stream, _include_usage(req), logprobs, req.prompt_logprobs is not None, thinking=thinking
    )


def _thinking(ctx: ServingContext, prompt_ids: tuple[int, ...]) -> Thinking | None:
    """How this answer holds reasoning under --reasoning-parser (None without one)."""
    if ctx.thinking_markers is None:
        return None
    start_id, end_id = ctx.thinking_markers
    return Thinking(ctx.config.reasoning_parser, prompt_state(prompt_ids, start_id, end_id), end_id)


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
        out["tool_calls"] = _template_tool_calls(message.tool_calls)
    return out


def _renamed(exc: InvalidRequestError, names: dict[str, str]) -> InvalidRequestError:
    """The same error, naming the parameter as this route's client spelled it."""
    param = names.get(exc.param, exc.param)
    message = exc.message.replace(f"(parameter={exc.param})", f"(parameter={param})")
    return InvalidRequestError(message, param)


# -- the prompt ---------------------------------------------------------------------------


def encode(ctx: ServingContext, text: str, param: str = "prompt") -> tuple[int, ...]:
    try:
        return tuple(ctx.tokenizer.encode(text))
    except Exception as exc:  # text the tokenizer refuses (a character it cannot take): the client's to fix
        raise InvalidRequestError(f"the tokenizer could not encode {param}: {exc} (parameter={param})", param) from None


def encode_chat(
    ctx: ServingContext,
    messages: list[dict],
    add_generation_prompt: bool,
    template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
) -> tuple[int, ...]:
    from stepserve.checkpoint.tokenizer import apply_chat_template, check_template_kwargs

    check_template_kwargs(template_kwargs)
    try:
        return tuple(apply_chat_template(ctx.tokenizer, messages, add_generation_prompt, template_kwargs, tools))
    except Exception as exc:  # the template rejected the conversation: the client's to fix
        raise InvalidRequestError(f"the chat template could not render these messages: {exc}", "messages") from None


def prompt_input(
    ctx: ServingContext,
    ids: tuple[int, ...],
    params: SamplingParams,
    omitted_default: int | None,
    lora: LoraRef | None = None,
) -> PromptInput:
    """Resolve ``max_tokens`` for this prompt (invariant 1) and pair them, with its adapter."""
    resolved = params.resolve(
        len(ids),
        ctx.max_model_len,
        omitted_default=omitted_default,
        default_max_tokens=ctx.sampling_defaults.cap(ctx.config.default_max_tokens),
        max_tokens_limit=ctx.config.max_tokens_limit,
    )
    return PromptInput(ids, resolved, lora)


# -- sampling parameters ------------------------------------------------------------------


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


# -- the output constraint ----------------------------------------------------------------


def requested_constraints(req: _StructuredFields) -> list[tuple[str, str, object]]:
    """(field as the client spelled it, kind, source) of every constraint the request sets:
    OpenAI's ``response_format``, vLLM's ``structured_outputs`` and ``guided_*``."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json_object", None))
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format.json_schema.schema is required with type=json_schema", "response_format"
            )
        found.append(("response_format", "json", fmt.json_schema.schema_))
    so = req.structured_outputs
    if so is not None:
        for name, kind, value in (
            ("json", "json", so.json_),
            ("regex", "regex", so.regex),
            ("choice", "choice", so.choice),
            ("grammar", "grammar", so.grammar),
        ):
            if value is not None:
                found.append((f"structured_outputs.{name}", kind, value))
        if so.json_object:
            found.append(("structured_outputs.json_object", "json_object", None))
    for name, kind in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, kind, value))
    return found


def _checked_source(param: str, kind: str, source: object) -> object:
    if kind == "choice" and (not source or not all(source)):
        raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param)
    if kind == "json" and isinstance(source, str):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param) from None
    if kind == "json" and not isinstance(source, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param)
    return source


def output_constraint(ctx: ServingContext, req: _StructuredFields) -> tuple[str, GrammarSpec] | None:
    """(field, compiled spec) of the request's constraint; None for free text; 400 on conflict or error."""
    found = requested_constraints(req)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise InvalidRequestError(f"only one output constraint may be given, got {names}", found[1][0])
    param, kind, source = found[0]
    closed = ctx.config.structured_strict_default or (param == "response_format" and _strict_format(req))
    return param, compile_constraint(ctx, param, kind, _checked_source(param, kind, source), closed)


def _strict_format(req: _StructuredFields) -> bool:
    fmt = req.response_format
    return bool(fmt is not None and fmt.json_schema is not None and fmt.json_schema.strict)


def compile_constraint(ctx: ServingContext, param: str, kind: str, source: object, closed: bool = False) -> GrammarSpec:
    """``closed``: a JSON schema's unstated ``additionalProperties`` is false (strict schemas, tools)."""
    if ctx.grammars is None:
        raise InvalidRequestError(f"{param}: structured output is not available on this server", param)
    return ctx.grammars.compile(kind, source, param, closed=closed)


# -- tools --------------------------------------------------------------------------------


def _tool_schemas(ctx: ServingContext, req: ChatCompletionRequest) -> dict[str, dict]:
    """name -> parameters schema of each tool, every one checked (400 naming the bad one)."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(req.tools or ()):
        fn = tool.function
        where = f"tools[{i}].function"
        if not _TOOL_NAME.match(fn.name):
            raise InvalidRequestError(
                f"{where}.name={fn.name!r} must be 1 to 64 letters, digits, '_', '-' or '.'", "tools"
            )
        if fn.name in out:
            raise InvalidRequestError(f"{where}.name={fn.name!r} is defined twice", "tools")
        if fn.parameters is None:
            raise InvalidRequestError(
                f"{where}.parameters is required: a JSON schema of the arguments (use "
                '{"type": "object", "properties": {}} for a function without arguments)',
                "tools",
            )
        if fn.parameters.get("type", "object") != "object":
            raise InvalidRequestError(f"{where}.parameters must describe an object (type=object)", "tools")
        compile_constraint(ctx, f"{where}.parameters", "json", fn.parameters, closed=True)
        out[fn.name] = fn.parameters
    return out


def tool_mode(ctx: ServingContext, req: ChatCompletionRequest, constrained: str | None) -> ToolMode:
    """The request's tool mode; 400 for a choice that cannot be honoured. ``constrained`` names
    the request's output-constraint field, if it has one (it cannot be combined with forced calls)."""
    schemas = _tool_schemas(ctx, req)
    choice = req.tool_choice
    config = ctx.config
    if choice is None:
        choice = "auto" if schemas and config.enable_auto_tool_choice else "none"
    if choice != "none" and not schemas:
        raise InvalidRequestError("tool_choice needs tools", "tool_choice")
    if choice == "none":
        return NO_TOOLS
    if choice == "auto":
        if not config.enable_auto_tool_choice:
            raise InvalidRequestError(
                'tool_choice="auto" needs the server started with --enable-auto-tool-choice and --tool-call-parser',
                "tool_choice",
            )
        return ToolMode("auto", parser=config.tool_call_parser)
    if constrained is not None:
        raise InvalidRequestError(f"{constrained} cannot be combined with a forced tool_choice", constrained)
    if choice == "required":
        grammar = required_calls_grammar(schemas, req.parallel_tool_calls)
        return ToolMode("required", spec=compile_constraint(ctx, "tools", "tool_calls", grammar))
    name = choice.function.name
    if name not in schemas:
        raise InvalidRequestError(
            f"tool_choice names {name!r}, which is not among the tools ({', '.join(schemas)})", "tool_choice"
        )
    where = f"tools[{list(schemas).index(name)}].function.parameters"
    return ToolMode("named", name=name, spec=compile_constraint(ctx, where, "json", schemas[name], closed=True))


def _template_tools(req: ChatCompletionRequest) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def _template_tool_calls(calls: list[dict]) -> list[dict]:
    """History tool calls for the template: arguments as an object, as templates expect."""
    out = []
    for call in calls:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
        out.append({**call, "function": fn})
    return out
