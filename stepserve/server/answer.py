"""One choice's output as every API renders it: thinking, text and tool calls.

The chat completions, Responses and Anthropic Messages routes run the same ``Plan`` and differ
only in how they write its answer down. This module reads the engine's text once for all of
them: the reasoning parser (``--reasoning-parser``) takes the thinking off the front, then the
request's tool mode (``tool_calls.py``) reads calls from the rest. ``final_answer`` does it for a
finished choice; ``AnswerStream`` does it piece by piece while the text streams, as typed
``Piece``s that each route turns into its own events. Both run the same machines, so a streamed
answer reassembles into the whole one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from stepserve.server.tool_calls import ToolMode, call_dict, final_calls, new_call_id
from stepserve.structured.reasoning import PARSERS, ReasoningSplitter
from stepserve.structured.tool_parsers import make_parser
from stepserve.structured.tools import RequiredCallsScanner, ScanEvent


@dataclass(frozen=True)
class Thinking:
    """How a request's answer holds reasoning: which parser reads it, and where the prompt left
    the thinking (``structured.reasoning.prompt_state``)."""

    parser: str  # a name in structured.reasoning.PARSERS
    prompt_state: str = "none"  # inside, closed or none
    end_token_id: int | None = None  # the end-of-thinking token


@dataclass(frozen=True)
class Answer:
    """A finished choice."""

    reasoning: str | None  # the thinking; None without a reasoning parser or when there was none
    content: str | None  # the text after it; None when the answer is only tool calls (or only thinking)
    calls: list[dict]  # OpenAI-shaped calls: {"id", "type": "function", "function": {"name", "arguments"}}
    finish_reason: str | None  # the engine's, or "tool_calls" when the answer calls and stopped
    reasoning_tokens: int = 0  # output tokens up to the end of the thinking


# -- pieces of a streamed answer ----------------------------------------------------------


@dataclass(frozen=True)
class ReasoningPiece:
    text: str


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallStart:
    """A call's first piece: its index in the answer, id and function name (no arguments)."""

    index: int
    call_id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """The next fragment of call ``index``'s arguments (JSON text)."""

    index: int
    text: str


Piece = ReasoningPiece | ContentPiece | CallStart | CallArguments


def reasoning_tokens(thinking: Thinking | None, token_ids: Sequence[int], ended: bool) -> int:
    """Output tokens spent thinking: up to and including the end marker, all of them when the
    thinking never ended."""
    if thinking is None:
        return 0
    if thinking.end_token_id is not None and thinking.end_token_id in token_ids:
        return list(token_ids).index(thinking.end_token_id) + 1
    return 0 if ended else len(token_ids)


def final_answer(
    tools: ToolMode, thinking: Thinking | None, text: str, token_ids: Sequence[int], finish_reason: str | None
) -> Answer:
    """The finished choice: thinking split off, then tool calls read from the rest."""
    reasoning, ended = None, True
    if thinking is not None:
        splitter = ReasoningSplitter(PARSERS[thinking.parser], thinking.prompt_state)
        r1, text1 = splitter.feed(text)
        r2, text2 = splitter.finish()
        reasoning, text, ended = (r1 + r2) or None, text1 + text2, splitter.reasoning_ended
        if not ended and tools.choice in ("named", "required"):  # cut short while thinking: no call yet
            return Answer(reasoning, None, [], finish_reason, reasoning_tokens(thinking, token_ids, ended))
    parser = make_parser(tools.parser) if tools.choice == "auto" else None
    content, calls = final_calls(tools, text, parser)
    if thinking is not None and not content:
        content = None
    rendered = [call_dict(c, parser) for c in calls]
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return Answer(reasoning, content, rendered, finish_reason, reasoning_tokens(thinking, token_ids, ended))


@dataclass
class AnswerStream:
    """One choice's streamed text as ``Piece``s."""

    tools: ToolMode
    thinking: Thinking | None = None
    num_calls: int = 0
    _splitter: ReasoningSplitter | None = field(default=None, init=False)
    _scanner: RequiredCallsScanner | None = field(default=None, init=False)
    _parser: object = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.thinking is not None:
            self._splitter = ReasoningSplitter(PARSERS[self.thinking.parser], self.thinking.prompt_state)
        if self.tools.choice == "required":
            self._scanner = RequiredCallsScanner()
        if self.tools.choice == "auto":
            self._parser = make_parser(self.tools.parser)

    @property
    def reasoning_ended(self) -> bool:
        return self._splitter is None or self._splitter.reasoning_ended

    def feed(self, text: str) -> list[Piece]:
        if self._splitter is None:
            return self._answer(text)
        reasoning, content = self._splitter.feed(text)
        return ([ReasoningPiece(reasoning)] if reasoning else []) + self._answer(content)

    def finish(self, finish_reason: str | None) -> tuple[list[Piece], str | None]:
        """The pieces still held back, and the choice's finish reason."""
        pieces: list[Piece] = []
        if self._splitter is not None:
            reasoning, content = self._splitter.finish()
            pieces += ([ReasoningPiece(reasoning)] if reasoning else []) + self._answer(content)
        if self._parser is not None:
            pieces += self._items(self._parser.finish())
        called = self.num_calls > 0 and finish_reason == "stop"
        return pieces, "tool_calls" if called else finish_reason

    def _answer(self, text: str) -> list[Piece]:
        if self.tools.choice == "named":
            return self._named(text)
        if self._scanner is not None:
            return [self._event(e) for e in self._scanner.feed(text)]
        if self._parser is not None:
            return self._items(self._parser.feed(text))
        return [ContentPiece(text)] if text else []

    def _named(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        if self.num_calls == 0 and (text or self._splitter is None):
            out.append(self._event(ScanEvent(0, self.tools.name)))
        if text:
            out.append(self._event(ScanEvent(0, arguments=text)))
        return out

    def _event(self, event: ScanEvent) -> Piece:
        if event.name is not None:
            self.num_calls = max(self.num_calls, event.index + 1)
            return CallStart(event.index, event.call_id or new_call_id(self._parser), event.name)
        return CallArguments(event.index, event.arguments)

    def _items(self, items: list) -> list[Piece]:
        """Pieces of a parser's content strings and call events."""
        return [ContentPiece(item) if isinstance(item, str) else self._event(item) for item in items]
