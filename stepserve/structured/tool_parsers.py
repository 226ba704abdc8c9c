"""Parsers of the model's own tool-call format, for ``tool_choice=auto`` (``--tool-call-parser``).

A parser reads the output text as it streams and emits, in order, content text and call events
(``ScanEvent``: a call's name first, then fragments of its arguments as the model writes them),
which is how OpenAI streams tool calls. A whole output is parsed by the same machine fed all at
once, so a streamed answer reassembles to exactly the calls of the non-streamed one, whatever the
chunking. The rules every format shares:

- a call's ``arguments`` are the model's own text of the arguments value (a value given as a
  JSON string is decoded): nothing is re-serialized, so fragments can be sent as they come;
- a call counts from the moment its name is complete; until then, text that stops looking like
  a call (broken JSON, no name) is content, verbatim, marker included;
- whitespace between content and a call is dropped; an output without calls is its own content,
  unchanged.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from dataclasses import dataclass

from stepserve.structured.tools import ScanEvent, ToolCall

PARSERS = ("hermes", "llama3_json", "mistral")
ARGUMENT_KEYS = ("arguments", "parameters")  # what the formats call a call's arguments
_WHITESPACE = " \t\r\n"

Item = str | ScanEvent  # what a parser emits: content text, or a piece of a call


@dataclass(frozen=True)
class Parsed:
    content: str | None  # text outside the calls; None when there are calls and no other text
    calls: list[ToolCall]  # the calls, in order


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (held back: it may be one)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _decode_string(raw: str) -> str | None:
    """A JSON string's value from the text between its quotes; None when it is malformed."""
    try:
        return json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return None


# -- JSON scanning, a character at a time -------------------------------------------------


class JsonValue:
    """Follows one JSON value as its characters arrive: strings (with escapes) and nesting.
    ``push`` says whether a character belongs to the value; a bare literal (number, true, ...)
    ends before the character that follows it, which is then not the value's."""

    def __init__(self) -> None:
        self.kind: str | None = None  # container, string or literal, from the first character
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escape = False

    def push(self, ch: str) -> bool:
        if self.kind is None:
            self.kind = "container" if ch in "{[" else "string" if ch == '"' else "literal"
            self._depth, self._in_string = int(ch in "{["), ch == '"'
            return True
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                self.done = self.kind == "string"
            return True
        if self.kind == "literal":
            self.done = ch in ",}]" + _WHITESPACE
            return not self.done
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self.done = self._depth == 0
        return True


# The structural states of a call object: the characters each accepts, and the state each
# leads to (strings and values have their own states).
_EXPECTED = {"open": "{", "key_or_end": '"}', "next_key": '"', "colon": ":", "after": ",}"}
_NEXT = {"open": "key_or_end", "key_or_end": "key", "next_key": "key", "colon": "value", "after": "next_key"}


class CallObject:
    """One call written as a JSON object, ``{"name": "f", "arguments": {...}}`` (keys in any
    order; ``parameters`` for ``arguments``; other keys skipped), scanned as it streams.

    ``events`` collects the call's name event (once the name string is complete) and argument
    fragments (held until the name is known). ``failed`` is set when the text is not such an
    object; the character that showed it is not consumed.
    """

    def __init__(self, index: int) -> None:
        self.index = index  # which call of the output this is
        self.name: str | None = None
        self.events: list[ScanEvent] = []
        self.done = False
        self.failed = False
        self._state = "open"
        self._raw = ""  # the key or string being read, between its quotes
        self._escape = False
        self._key = ""
        self._value: JsonValue | None = None
        self._seen_arguments = False
        self._held = ""  # argument text that came before the name
        self._fragment = ""  # argument text of this feed, not yet an event
        self._string = ""  # arguments written as a JSON string: sent whole, decoded, at its end

    def feed(self, text: str) -> int:
        """Consume characters until the object ends or fails; how many were consumed."""
        for i, ch in enumerate(text):
            if not self._push(ch):
                self._flush()
                return i
            if self.done or self.failed:  # (an object without a name fails at its end brace)
                self._flush()
                return i + 1
        self._flush()
        return len(text)

    def _push(self, ch: str) -> bool:
        state = self._state
        if state in ("key", "name"):
            return self._string_char(ch)
        if state in ("arguments", "skip"):
            return self._value_char(ch)
        if ch in _WHITESPACE:
            return True
        if state == "value":
            return self._value_start(ch)
        if ch not in _EXPECTED[state]:
            return self._fail()
        if ch == "}":
            return self._end()
        self._state = _NEXT[state]
        if self._state == "key":
            self._raw, self._escape = "", False
        return True

    def _string_char(self, ch: str) -> bool:
        if self._escape or ch != '"':
            self._escape = not self._escape and ch == "\\"
            self._raw += ch
            return True
        value = _decode_string(self._raw)
        if value is None:
            return self._fail()
        if self._state == "key":
            self._key, self._state = value, "colon"
            return True
        self._flush()  # argument text so far is held: it goes out after the name
        self.name, self._state = value, "after"
        self.events.append(ScanEvent(self.index, name=value))
        self._fragment, self._held = self._held, ""
        return True

    def _value_start(self, ch: str) -> bool:
        if self._key == "name" and self.name is None:
            if ch != '"':
                return self._fail()
            self._state, self._raw, self._escape = "name", "", False
            return True
        emit = self._key in ARGUMENT_KEYS and not self._seen_arguments
        self._seen_arguments |= emit
        self._state, self._value = ("arguments" if emit else "skip"), JsonValue()
        return self._value_char(ch)

    def _value_char(self, ch: str) -> bool:
        value = self._value
        if not value.push(ch):  # a bare literal ended before ch
            self._state = "after"
            return self._push(ch)
        if self._state == "arguments" and value.kind == "string":  # arguments as a JSON string
            self._string += ch
            if value.done:
                decoded = _decode_string(self._string[1:-1])
                self._fragment += self._string if decoded is None else decoded
        elif self._state == "arguments":
            self._fragment += ch
        if value.done:
            self._state = "after"
        return True

    def _flush(self) -> None:
        """Turn this feed's argument text into an event (held while the name is unknown)."""
        if not self._fragment:
            return
        if self.name is None:
            self._held += self._fragment
        else:
            self.events.append(ScanEvent(self.index, arguments=self._fragment))
        self._fragment = ""

    def _end(self) -> bool:
        if self.name is None:
            return self._fail(consumed=True)
        if not self._seen_arguments:
            self._fragment += "{}"
        self.done = True
        return True

    def _fail(self, consumed: bool = False) -> bool:
        self.failed = True
        return consumed


# -- the parsers --------------------------------------------------------------------------


class ToolParser:
    """The machinery the formats share: content with whitespace next to calls dropped, calls
    scanned as ``CallObject``s, and the events of each ``feed`` in order."""

    def __init__(self) -> None:
        self.num_calls = 0
        self._buf = ""  # text not yet decided
        self._out: list[Item] = []
        self._held = ""  # whitespace ending the content so far: sent unless a call follows
        self._after_call = False  # drop whitespace that follows a call
        self._call: CallObject | None = None
        self._prefix = ""  # the text since the current call's marker, content if it fails

    def new_call_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def feed(self, text: str) -> list[Item]:
        """Content and call events that ``text`` (the next piece of the output) completes."""
        self._buf += text
        self._run()
        return self._take()

    def finish(self) -> list[Item]:
        """What is left at the end of the output."""
        self._end()
        if self._call is not None and self._call.name is None:
            self._content(self._prefix + self._buf)  # an unfinished marker or call: content
        self._call, self._buf = None, ""
        self._out.append(self._held)
        self._held = ""
        return self._take()

    def parse(self, text: str) -> Parsed:
        """A whole output's content and calls."""
        items = self.feed(text) + self.finish()
        return assemble(items)

    def _run(self) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        """Format-specific end of output (content still held, say)."""

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip(_WHITESPACE)
            if not text:
                return
            self._after_call = False
        text = self._held + text
        body = text.rstrip(_WHITESPACE)
        if body:
            self._out.append(body)
        self._held = text[len(body) :]

    def _commit(self) -> None:
        """A call's name is complete: it is a call, and the whitespace before it goes."""
        self._held = ""
        self.num_calls += 1

    def _content_until(self, marker: str) -> bool:
        """Send the buffer as content up to ``marker``; True when the marker came (consumed),
        False when all was sent but what may be the marker's beginning."""
        at = self._buf.find(marker)
        if at < 0:
            keep = len(self._buf) - _partial_suffix(self._buf, marker)
            self._content(self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        self._content(self._buf[:at])
        self._buf = self._buf[at + len(marker) :]
        return True

    def _begin_call(self, prefix: str) -> None:
        self._call, self._prefix = CallObject(self.num_calls), prefix

    def _scan(self) -> str:
        """Feed the buffer to the current call: 'more' (it needs more text), 'call' (it ended)
        or 'failed' (it was not a call: its text went out as content)."""
        call = self._call
        used = call.feed(self._buf)
        self._prefix, self._buf = self._prefix + self._buf[:used], self._buf[used:]
        if call.events:
            if call.events[0].name is not None:
                self._commit()
            self._out += call.events
            call.events = []
        if call.failed and call.name is None:
            self._call = None
            self._content(self._prefix)
            return "failed"
        if call.failed or call.done:
            self._call = None
            return "call"
        return "more"

    def _take(self) -> list[Item]:
        """The events so far, neighbours of one kind merged (one content string, one fragment)."""
        out: list[Item] = []
        for item in self._out:
            last = out[-1] if out else None
            if isinstance(item, str):
                if item and isinstance(last, str):
                    out[-1] = last + item
                elif item:
                    out.append(item)
            elif isinstance(last, ScanEvent) and item.name is None and last.name is None and last.index == item.index:
                out[-1] = ScanEvent(last.index, last.name, last.arguments + item.arguments, last.call_id)
            else:
                out.append(item)
        self._out = []
        return out


def assemble(items: list[Item]) -> Parsed:
    """The content and calls that a parser's events add up to (as a client reassembles them)."""
    content = "".join(i for i in items if isinstance(i, str))
    names: dict[int, ScanEvent] = {}
    arguments: dict[int, str] = {}
    for item in items:
        if isinstance(item, ScanEvent):
            if item.name is not None:
                names[item.index] = item
            arguments[item.index] = arguments.get(item.index, "") + item.arguments
    calls = [ToolCall(names[i].name, arguments.get(i, ""), names[i].call_id) for i in sorted(names)]
    return Parsed(content if content or not calls else None, calls)


class HermesParser(ToolParser):
    """Qwen/Hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or more,
    with content around them."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._mode = "content"  # content, call, or tail (after a call's object: its end tag)

    def _run(self) -> None:
        while self._buf:
            if self._mode == "content":
                if not self._content_until(self.START):
                    return
                self._begin_call(self.START)
                self._mode = "call"
            elif self._mode == "call":
                result = self._scan()
                if result == "more":
                    return
                self._mode = "tail" if result == "call" else "content"
            else:
                self._buf = self._buf.lstrip(_WHITESPACE)
                if self.END.startswith(self._buf) and len(self._buf) < len(self.END):
                    return  # nothing yet, or a piece of the end tag
                if self._buf.startswith(self.END):
                    self._buf = self._buf[len(self.END) :]
                self._mode, self._after_call = "content", True

    def _end(self) -> None:
        if self._mode == "content":
            self._content(self._buf)
            self._buf = ""
        elif self._mode == "tail":
            self._buf = ""  # whitespace, or an end tag cut short


class Llama3JsonParser(ToolParser):
    """Llama 3.x JSON calls: ``{"name": ..., "parameters": {...}}``, several joined by ``;``,
    optionally after ``<|python_tag|>``. An output that does not start with a call is content;
    text after the calls is content too."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._mode = "start"  # start (until the first visible character), call, between, content

    def _run(self) -> None:
        while self._buf:
            if self._mode == "start":
                if not self._start():
                    return
            elif self._mode == "call":
                result = self._scan()
                if result == "more":
                    return
                self._mode = "between" if result == "call" else "content"
            elif self._mode == "between":
                self._buf = self._buf.lstrip(";" + _WHITESPACE)
                if self._buf.startswith("{"):
                    self._begin_call("")
                    self._mode = "call"
                elif self._buf:
                    self._mode, self._after_call = "content", True
            else:
                self._content(self._buf)
                self._buf = ""

    def _start(self) -> bool:
        """Decide whether the output is calls; False while the text so far cannot tell."""
        head = self._buf.lstrip(_WHITESPACE)
        if self.TAG.startswith(head):
            return False
        body = head.removeprefix(self.TAG).lstrip(_WHITESPACE)
        if not body:
            return False
        if body.startswith("{"):
            prefix = self._buf[: len(self._buf) - len(body)]
            self._buf = body
            self._begin_call(prefix)
            self._mode = "call"
        else:
            self._mode = "content"
        return True

    def _end(self) -> None:
        if self._mode in ("start", "content"):
            self._content(self._buf)
            self._buf = ""
        elif self._mode == "between":
            self._buf = ""


_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")
_ID_CHARS = string.ascii_letters + string.digits


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS]`` and then either a JSON list of ``{"name", "arguments"}``
    objects (tokenizers before v11, Mistral-7B-Instruct-v0.3) or, in v11 and later templates,
    ``name[ARGS]{...}`` (or ``name{...}``), one ``[TOOL_CALLS]`` per call, optionally with
    ``[CALL_ID]id`` after the name. Call ids are nine letters and digits, as Mistral's
    templates require of the ids they are given back.

    ``[TOOL_CALLS]`` is a special token: the server keeps special tokens in the text of a
    request parsed by this parser (``KEEPS_SPECIAL_TOKENS``).
    """

    BOT, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    KEEPS_SPECIAL_TOKENS = True

    def __init__(self) -> None:
        super().__init__()
        # content; after_bot (what follows [TOOL_CALLS] decides the format); list_item, call,
        # list_next (the JSON list); name, call_id, arguments (name[ARGS]{...}); between
        self._mode = "content"
        self._name = ""
        self._id = ""
        self._value: JsonValue | None = None

    def new_call_id(self) -> str:
        return "".join(random.choices(_ID_CHARS, k=9))

    def _run(self) -> None:
        while self._buf:
            handler = getattr(self, f"_on_{self._mode}")
            if not handler():
                return

    def _marker(self, marker: str) -> bool | None:
        """At the buffer's start: True (``marker`` is there: consumed), None (a piece of it:
        wait), False (something else)."""
        if self._buf.startswith(marker):
            self._prefix += marker
            self._buf = self._buf[len(marker) :]
            return True
        return None if marker.startswith(self._buf) else False

    def _on_content(self) -> bool:
        if not self._content_until(self.BOT):
            return False
        self._prefix, self._mode = self.BOT, "after_bot"
        return True

    def _skip_space(self) -> bool:
        """Move leading whitespace into the prefix; False when nothing else is there yet."""
        rest = self._buf.lstrip(_WHITESPACE)
        self._prefix += self._buf[: len(self._buf) - len(rest)]
        self._buf = rest
        return bool(rest)

    def _on_after_bot(self) -> bool:
        if not self._skip_space():
            return False
        if self._buf[0] == "[":  # the JSON list ([ARGS] cannot come before a name)
            self._prefix += "["
            self._buf, self._mode = self._buf[1:], "list_item"
        else:
            self._name, self._id, self._mode = "", "", "name"
        return True

    def _on_list_item(self) -> bool:
        if not self._skip_space():
            return False
        if self._buf[0] == "{":
            self._begin_call(self._prefix)
            self._mode = "call"
        else:
            self._not_a_call()
        return True

    def _on_call(self) -> bool:
        result = self._scan()
        if result == "more":
            return False
        self._mode = "list_next" if result == "call" else "content"
        return True

    def _on_list_next(self) -> bool:
        self._buf = self._buf.lstrip(_WHITESPACE)
        if not self._buf:
            return False
        head = self._buf[0]
        if head in ",]":
            self._buf = self._buf[1:]
        if head == ",":
            self._prefix, self._mode = "", "list_item"
        else:  # the list's end, or text after the calls (content)
            self._mode, self._after_call = "content", True
        return True

    def _on_name(self) -> bool:
        ch = self._buf[0]
        if ch in _NAME_CHARS:
            self._name += ch
            self._prefix += ch
            self._buf = self._buf[1:]
            return True
        if ch == "{" and self._name:
            return self._start_arguments()
        for marker, after in ((self.ARGS, None), (self.CALL_ID, "call_id")):
            found = self._marker(marker) if self._name else False
            if found is None:
                return False
            if found:
                return self._start_arguments() if after is None else self._set_mode(after)
        return self._not_a_call()

    def _on_call_id(self) -> bool:
        ch = self._buf[0]
        if ch.isascii() and ch.isalnum():
            self._id += ch
            self._prefix += ch
            self._buf = self._buf[1:]
            return True
        found = self._marker(self.ARGS) if self._id else False
        if found is None:
            return False
        return self._start_arguments() if found else self._not_a_call()

    def _start_arguments(self) -> bool:
        """The name (and id) are complete: the call is sent, its arguments follow."""
        self._out.append(ScanEvent(self.num_calls, name=self._name, call_id=self._id or None))
        self._commit()
        self._value, self._mode = JsonValue(), "arguments"
        return True

    def _on_arguments(self) -> bool:
        value, index = self._value, self.num_calls - 1
        if value.kind is None:
            self._buf = self._buf.lstrip(_WHITESPACE)
        used = 0
        for ch in self._buf:
            if value.done or not value.push(ch):
                break
            used += 1
        if used:
            self._out.append(ScanEvent(index, arguments=self._buf[:used]))
        self._buf = self._buf[used:]
        if value.done:
            self._mode = "between"
        return value.done

    def _on_between(self) -> bool:
        self._buf = self._buf.lstrip(_WHITESPACE)
        if not self._buf:
            return False
        found = self._marker(self.BOT)
        if found is None:
            return False
        if found:
            self._prefix, self._mode = self.BOT, "after_bot"
        else:
            self._mode, self._after_call = "content", True
        return True

    def _set_mode(self, mode: str) -> bool:
        self._mode = mode
        return True

    def _not_a_call(self) -> bool:
        """What followed ``[TOOL_CALLS]`` is not a call: it is content, from the marker on."""
        self._content(self._prefix)
        self._prefix, self._mode = "", "content"
        return True

    def _end(self) -> None:
        if self._mode in ("after_bot", "list_item", "name", "call_id"):
            self._content(self._prefix + self._buf)
        elif self._mode == "content":
            self._content(self._buf)
        self._buf = ""


_CLASSES = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}


def make_parser(name: str) -> ToolParser:
    """A fresh parser (they keep stream state: one per choice)."""
    return _CLASSES[name]()


def keeps_special_tokens(name: str) -> bool:
    """Whether this format's markers are special tokens, which the text must keep."""
    return getattr(_CLASSES[name], "KEEPS_SPECIAL_TOKENS", False)
