"""Parsers of the model's own tool-call format, for ``tool_choice=auto`` (``--tool-call-parser``).

Each parser turns a finished output into (content, calls) and, when streaming, turns text
deltas into content deltas and complete calls: content streams as it comes, a call is sent
once its text is complete (its name and whole arguments in one delta).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from stepserve.structured.tools import ToolCall

PARSERS = ("hermes", "llama3_json")


def _call(obj: object, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


@dataclass(frozen=True)
class Parsed:
    content: str | None  # text outside the calls; None when there is none
    calls: list[ToolCall]  # the calls, in order


@dataclass
class StreamPiece:
    content: str = ""  # text to send as content
    calls: list[ToolCall] = field(default_factory=list)  # calls completed by this delta


class HermesParser:
    """Qwen/Hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or more."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False

    def parse(self, text: str) -> Parsed:
        calls = [c for body in self._BLOCK.findall(text) if (c := self._load(body)) is not None]
        if not calls:
            return Parsed(text, [])
        content = text.split(self.START, 1)[0].strip()
        return Parsed(content or None, calls)

    @staticmethod
    def _load(body: str) -> ToolCall | None:
        try:
            return _call(json.loads(body.strip()), "arguments")
        except json.JSONDecodeError:
            return None

    def feed(self, text: str) -> StreamPiece:
        self._buffer += text
        piece = StreamPiece()
        while True:
            marker = self.END if self._inside else self.START
            at = self._buffer.find(marker)
            if at < 0:
                break
            before, self._buffer = self._buffer[:at], self._buffer[at + len(marker) :]
            if self._inside:
                call = self._load(before)
                piece.calls += [call] if call else []
                piece.content += "" if call else self.START + before + self.END
            else:
                piece.content += before
            self._inside = not self._inside
        if not self._inside:  # hold back what may be the start of a marker
            keep = _partial_suffix(self._buffer, self.START)
            piece.content += self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep :]
        return piece

    def finish(self) -> StreamPiece:
        rest, self._buffer = self._buffer, ""
        if self._inside:
            call = self._load(rest)
            return StreamPiece(calls=[call]) if call else StreamPiece(content=self.START + rest)
        return StreamPiece(content=rest)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class Llama3JsonParser:
    """Llama 3.x JSON calls: ``{"name": ..., "parameters": {...}}`` (several joined by ``;``),
    optionally after ``<|python_tag|>``; an output that does not start with one is content."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None until the first visible character decides

    def parse(self, text: str) -> Parsed:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return Parsed(text, [])
        calls, pos, decoder = [], 0, json.JSONDecoder()
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return Parsed(text, [])
            call = _call(obj, "parameters")
            if call is None:
                return Parsed(text, [])
            calls.append(call)
            while pos < len(body) and body[pos] in "; \n\t":
                pos += 1
        return Parsed(None, calls)

    def feed(self, text: str) -> StreamPiece:
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if not head or self.TAG.startswith(head):
                return StreamPiece()
            self._mode = "calls" if head.startswith(("{", self.TAG)) else "content"
        if self._mode == "content":
            out, self._buffer = self._buffer, ""
            return StreamPiece(content=out)
        return StreamPiece()

    def finish(self) -> StreamPiece:
        rest, self._buffer = self._buffer, ""
        if self._mode == "content" or not rest:
            return StreamPiece(content=rest)
        parsed = self.parse(rest)
        return StreamPiece(content=parsed.content or "", calls=parsed.calls)


def make_parser(name: str):
    """A fresh parser (they keep stream state: one per choice)."""
    return {"hermes": HermesParser, "llama3_json": Llama3JsonParser}[name]()
