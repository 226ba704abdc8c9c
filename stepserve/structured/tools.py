"""Tool calls forced by constrained decoding (``tool_choice`` ``required`` or a named function).

A named function's output is its arguments object alone (the function is known). ``required``
constrains the output to a JSON array of calls in one fixed shape,
``[{"name": "f", "arguments": {...}}, ...]``, so that a stream can be cut into OpenAI's deltas
(name first, then argument fragments) while it is generated: ``RequiredCallsScanner``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from stepserve.structured.compiler import JSON_OPTIONS
from stepserve.structured.json_schema import prepare_schema

CALL_PREFIX = '{"name": "'
ARGS_PREFIX = '", "arguments": '


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str  # the function called
    arguments: str  # a JSON object, as text
    call_id: str | None = None  # the id the model gave the call (Mistral's [CALL_ID]); None: make one


def _lark_literal(text: str) -> str:
    return json.dumps(text)


def required_calls_grammar(tools: dict[str, dict], parallel: bool) -> str:
    """Lark for ``tool_choice=required``: one call (or, with ``parallel``, one or more) to any of
    ``tools`` (name -> parameters schema), each call's arguments constrained by its schema, closed
    (an unstated ``additionalProperties`` is false) as a tool's schema is; ``ValueError`` for a
    pattern that cannot be honoured."""
    rules, names = [], []
    for i, (name, schema) in enumerate(tools.items()):
        schema = prepare_schema(schema, closed=True)
        args = json.dumps({**schema, "x-guidance": {**schema.get("x-guidance", {}), **JSON_OPTIONS}})
        rules.append(f"args_{i}: %json {args}")
        names.append(f"call_{i}")
        rules.append(f'call_{i}: {_lark_literal(CALL_PREFIX + name + ARGS_PREFIX)} args_{i} "}}"')
    calls = 'call ("," call)*' if parallel else "call"
    head = [f'start: "[" {calls} "]"', "call: " + " | ".join(names)]
    return "\n".join(head + rules) + "\n"


def parse_required_calls(text: str) -> list[ToolCall] | None:
    """The calls of a complete ``required`` output, arguments as the model wrote them; None if
    the output is not complete (cut short by max_tokens)."""
    scanner = RequiredCallsScanner()
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for event in scanner.feed(text):
        if event.name is not None:
            names[event.index] = event.name
        args[event.index] = args.get(event.index, "") + event.arguments
    if scanner.state != "done":
        return None
    return [ToolCall(names[i], args.get(i, "")) for i in sorted(names)]


@dataclass
class ScanEvent:
    """A piece of a streamed call: ``name`` on a call's first event (with no arguments), then
    argument text."""

    index: int  # which call of the output
    name: str | None = None  # set once, when the call's name is complete
    arguments: str = ""  # the next fragment of its arguments
    call_id: str | None = None  # with the name: the id the model gave the call, if it gave one


@dataclass
class RequiredCallsScanner:
    """Cuts the text of a ``required`` output, as it streams, into call events. The grammar
    fixes every character outside the arguments, so only the arguments' nesting is tracked."""

    buffer: str = ""
    pos: int = 0
    state: str = "start"  # start, prefix, name, args_prefix, args, after_call, done
    index: int = -1
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    name_start: int = 0
    events: list[ScanEvent] = field(default_factory=list)

    def feed(self, text: str) -> list[ScanEvent]:
        self.buffer += text
        self.events = []
        while self.pos < len(self.buffer) and self._step():
            pass
        return self.events

    def _step(self) -> bool:
        """Advance through the buffer; False when more text is needed."""
        handler = getattr(self, f"_on_{self.state}")
        return handler()

    def _expect(self, literal: str, next_state: str) -> bool:
        if len(self.buffer) - self.pos < len(literal):
            return False
        self.pos += len(literal)
        self.state = next_state
        return True

    def _on_start(self) -> bool:
        return self._expect("[", "prefix")

    def _on_prefix(self) -> bool:
        if not self._expect(CALL_PREFIX, "name"):
            return False
        self.index += 1
        self.name_start = self.pos
        return True

    def _on_name(self) -> bool:
        end = self.buffer.find('"', self.pos)
        if end < 0:
            self.pos = len(self.buffer)
            return False
        self.events.append(ScanEvent(self.index, name=self.buffer[self.name_start : end]))
        self.pos = end
        self.state = "args_prefix"
        return True

    def _on_args_prefix(self) -> bool:
        if self._expect(ARGS_PREFIX, "args"):
            self.depth, self.in_string, self.escape = 0, False, False
            return True
        return False

    def _on_args(self) -> bool:
        start = self.pos
        while self.pos < len(self.buffer):
            ch = self.buffer[self.pos]
            self.pos += 1
            if self._close_args(ch):
                self.state = "after_call"
                break
        if self.pos > start:
            self.events.append(ScanEvent(self.index, arguments=self.buffer[start : self.pos]))
        return self.state != "args"

    def _close_args(self, ch: str) -> bool:
        """Track strings and nesting; True when ``ch`` closes the arguments value."""
        if self.in_string:
            self.escape, self.in_string = (False, True) if self.escape else (ch == "\\", ch != '"')
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False

    def _on_after_call(self) -> bool:
        if len(self.buffer) - self.pos < 2:
            return False
        sep = self.buffer[self.pos + 1]  # the call's closing brace, then "," or "]"
        self.pos += 2
        self.state = "prefix" if sep == "," else "done"
        return True

    def _on_done(self) -> bool:
        self.pos = len(self.buffer)
        return False
