"""OpenAI tool calling on chat, the output side: a ``ToolMode`` (resolved with the request in
``plan.py``: none, auto with a parser, required, or a named function) decides how a choice's
text becomes ``tool_calls``, whole (``message``) or streamed (``ToolDeltas``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from stepserve.sampling import GrammarSpec
from stepserve.structured.tool_parsers import ToolParser, make_parser
from stepserve.structured.tools import (
    RequiredCallsScanner,
    ScanEvent,
    ToolCall,
    parse_required_calls,
)


@dataclass(frozen=True)
class ToolMode:
    """How this request treats tools."""

    choice: str  # none, auto, required or named
    name: str | None = None  # the forced function, when named
    parser: str | None = None  # the auto parser (--tool-call-parser)
    spec: GrammarSpec | None = None  # the output grammar of required and named


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
