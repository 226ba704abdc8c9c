"""OpenAI tool calling on chat: the request's tools and ``tool_choice`` become a mode (and, for
``required`` or a named function, an output grammar); the output becomes ``tool_calls``."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from stepserve.errors import InvalidRequestError
from stepserve.server.constraints import compile_constraint
from stepserve.server.context import ServingContext
from stepserve.server.schemas import ChatCompletionRequest
from stepserve.sampling import GrammarSpec
from stepserve.structured.tool_parsers import ToolParser, make_parser
from stepserve.structured.tools import (
    RequiredCallsScanner,
    ScanEvent,
    ToolCall,
    parse_required_calls,
    required_calls_grammar,
)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ToolMode:
    """How this request treats tools."""

    choice: str  # none, auto, required or named
    name: str | None = None  # the forced function, when named
    parser: str | None = None  # the auto parser (--tool-call-parser)
    spec: GrammarSpec | None = None  # the output grammar of required and named


def _schemas(ctx: ServingContext, req: ChatCompletionRequest) -> dict[str, dict]:
    """name -> parameters schema of each tool, every one checked (400 naming the bad one)."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(req.tools or ()):
        fn = tool.function
        where = f"tools[{i}].function"
        if not _NAME.match(fn.name):
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
        compile_constraint(ctx, f"{where}.parameters", "json", fn.parameters)
        out[fn.name] = fn.parameters
    return out


def tool_mode(ctx: ServingContext, req: ChatCompletionRequest, constrained: str | None) -> ToolMode:
    """The request's tool mode; 400 for a choice that cannot be honoured. ``constrained`` names
    the request's output-constraint field, if it has one (it cannot be combined with forced calls)."""
    schemas = _schemas(ctx, req)
    choice = req.tool_choice
    config = ctx.config
    if choice is None:
        choice = "auto" if schemas and config.enable_auto_tool_choice else "none"
    if choice != "none" and not schemas:
        raise InvalidRequestError("tool_choice needs tools", "tool_choice")
    if choice == "none":
        return ToolMode("none")
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
    return ToolMode(
        "named",
        name=name,
        spec=compile_constraint(ctx, f"tools[{list(schemas).index(name)}].function.parameters", "json", schemas[name]),
    )


def template_tools(req: ChatCompletionRequest) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def template_tool_calls(calls: list[dict]) -> list[dict]:
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


def _new_id(parser: ToolParser | None) -> str:
    """A call id in the parser's style (Mistral's templates want nine letters and digits)."""
    return parser.new_call_id() if parser is not None else f"call_{uuid.uuid4().hex[:24]}"


def call_dict(call: ToolCall, parser: ToolParser | None = None) -> dict:
    call_id = call.call_id or _new_id(parser)
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def final_calls(mode: ToolMode, text: str, parser: ToolParser | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output in this mode (``parser``: auto's, fresh)."""
    if mode.choice == "named":
        return None, [ToolCall(mode.name, text)]
    if mode.choice == "required":
        calls = parse_required_calls(text)
        return (text, []) if calls is None else (None, calls)
    if mode.choice == "auto":
        parsed = parser.parse(text)
        return parsed.content, parsed.calls
    return text, []


def message(mode: ToolMode, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The chat message of a finished choice, and its finish reason (``tool_calls`` when it calls)."""
    parser = make_parser(mode.parser) if mode.choice == "auto" else None
    content, calls = final_calls(mode, text, parser)
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    body = {"role": "assistant", "content": content, "tool_calls": [call_dict(c, parser) for c in calls]}
    return body, "tool_calls" if finish_reason == "stop" else finish_reason


class ToolDeltas:
    """Turns one choice's streamed text into OpenAI chat deltas (content, or tool_calls pieces)."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.num_calls = 0
        self._ids: dict[int, str] = {}
        self._scanner = RequiredCallsScanner() if mode.choice == "required" else None
        self._parser = make_parser(mode.parser) if mode.choice == "auto" else None

    def feed(self, text: str) -> list[dict]:
        if self.mode.choice == "named":
            return self._named(text)
        if self._scanner is not None:
            return [self._event(e) for e in self._scanner.feed(text)]
        if self._parser is not None:
            return self._items(self._parser.feed(text))
        return [{"content": text}] if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        deltas = self._items(self._parser.finish()) if self._parser is not None else []
        called = self.num_calls > 0 and finish_reason == "stop"
        return deltas, "tool_calls" if called else finish_reason

    def _named(self, text: str) -> list[dict]:
        out = []
        if self.num_calls == 0:
            out.append(self._event(ScanEvent(0, self.mode.name)))
        if text:
            out.append(self._event(ScanEvent(0, arguments=text)))
        return out

    def _event(self, event: ScanEvent) -> dict:
        """OpenAI's delta of one call event: a call's first carries its id, type and name (and
        arguments "": name events carry none), the others argument fragments."""
        call: dict = {"index": event.index}
        if event.name is not None:
            self.num_calls = max(self.num_calls, event.index + 1)
            call_id = event.call_id or _new_id(self._parser)
            call |= {"id": call_id, "type": "function", "function": {"name": event.name, "arguments": ""}}
        else:
            call["function"] = {"arguments": event.arguments}
        return {"tool_calls": [call]}

    def _items(self, items: list) -> list[dict]:
        """Deltas of a parser's content strings and call events."""
        return [{"content": item} if isinstance(item, str) else self._event(item) for item in items]
