"""Tool calling, the output side: a ``ToolMode`` (resolved with the request in ``plan.py``: none,
auto with a parser, required, or a named function) decides how a choice's text becomes calls
(``answer.py`` reads them, whole or streamed, for every API)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from stepserve.sampling import GrammarSpec
from stepserve.structured.tool_parsers import ToolParser
from stepserve.structured.tools import ToolCall, parse_required_calls


@dataclass(frozen=True)
class ToolMode:
    """How this request treats tools."""

    choice: str  # none, auto, required or named
    name: str | None = None  # the forced function, when named
    parser: str | None = None  # the auto parser (--tool-call-parser)
    spec: GrammarSpec | None = None  # the output grammar of required and named


def new_call_id(parser: ToolParser | None) -> str:
    """A call id in the parser's style (Mistral's templates want nine letters and digits)."""
    return parser.new_call_id() if parser is not None else f"call_{uuid.uuid4().hex[:24]}"


def call_dict(call: ToolCall, parser: ToolParser | None = None) -> dict:
    call_id = call.call_id or new_call_id(parser)
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
