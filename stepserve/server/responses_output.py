"""The Responses API's output: a finished answer as a Response object, and a streamed one as
the typed events (``response.created`` ... ``response.completed``) that the openai client's
``responses.stream`` reassembles into the same Response.

Output items, in order: a ``reasoning`` item when the answer has thinking, a ``message`` item
when it has text (or when it would otherwise have no item at all), one ``function_call`` item per
call. An answer cut by its token limit is ``incomplete`` (reason ``max_output_tokens``), and so
are its items.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from stepserve.server.answer import Answer, CallArguments, CallStart, ContentPiece, Piece, ReasoningPiece


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- the items ----------------------------------------------------------------------------


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict:
    content = [output_text(text)]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def item_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def output_items(answer: Answer) -> list[dict]:
    """A finished answer's output items."""
    status = item_status(answer.finish_reason)
    items = []
    if answer.reasoning is not None:  # cut short only if nothing came after it (as streamed)
        thought = "completed" if answer.content or answer.calls else status
        items.append(reasoning_item(new_id("rs"), answer.reasoning, thought))
    if answer.content or not (answer.calls or items):
        items.append(message_item(new_id("msg"), answer.content or "", status))
    for call in answer.calls:
        fn = call["function"]
        items.append(call_item(new_id("fc"), call["id"], fn["name"], fn["arguments"], status))
    return items


# -- the Response object ------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """A finished answer's token counts."""

    input_tokens: int  # the prompt
    cached_tokens: int  # of them, read from the prefix cache
    output_tokens: int  # generated
    reasoning_tokens: int  # of them, thinking


def usage(counts: Counts) -> dict:
    return {
        "input_tokens": counts.input_tokens,
        "input_tokens_details": {"cached_tokens": counts.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": counts.output_tokens,
        "output_tokens_details": {"reasoning_tokens": counts.reasoning_tokens},
        "total_tokens": counts.input_tokens + counts.output_tokens,
    }


def response_body(shell: dict, output: list[dict], finish_reason: str | None, counts: Counts) -> dict:
    """The finished Response: ``shell`` (id, model, the echoed settings) with its output."""
    incomplete = finish_reason == "length"
    return shell | {
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output,
        "usage": usage(counts),
    }


# -- the stream ---------------------------------------------------------------------------


@dataclass
class ResponseEvents:
    """One streamed response's events, numbered. Items open as their first piece arrives and are
    finished in output order at the end, except the reasoning item, which is finished when the
    answer after it starts (thinking never resumes)."""

    shell: dict  # the Response without its output (see ``response_body``)
    output: list[dict] = field(default_factory=list)  # items by output index, as built so far
    texts: list[str] = field(default_factory=list)  # each item's text or arguments so far
    done: set[int] = field(default_factory=set)  # output indices already finished
    sequence: int = 0
    _reasoning: int | None = None  # output index of the reasoning item
    _message: int | None = None  # of the message item
    _calls: dict[int, int] = field(default_factory=dict)  # call index -> output index

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def start(self) -> list[dict]:
        response = self.shell | {"status": "in_progress", "output": [], "usage": None}
        return [self.event(f"response.{kind}", response=response) for kind in ("created", "in_progress")]

    def piece(self, piece: Piece) -> list[dict]:
        if isinstance(piece, ReasoningPiece):
            return self._reasoning_text(piece.text)
        events = self._finish_reasoning()
        if isinstance(piece, ContentPiece):
            return events + (self._message_text(piece.text) if piece.text else [])
        if isinstance(piece, CallStart):
            self._calls[piece.index] = len(self.output)
            return events + self._open(call_item(new_id("fc"), piece.call_id, piece.name, "", "in_progress"))
        assert isinstance(piece, CallArguments)
        index = self._calls[piece.index]
        self.texts[index] += piece.text
        item_id = self.output[index]["id"]
        return events + [
            self.event("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=piece.text)
        ]

    def finish(self, finish_reason: str | None, counts: Counts) -> tuple[list[dict], dict]:
        """The closing events and the finished Response (the last event's)."""
        events = []
        if not self.output:  # nothing was said: an empty message, as the whole answer has
            events += self._message_text("")
        status = item_status(finish_reason)
        for index in range(len(self.output)):
            events += self._finish_item(index, status)
        body = response_body(self.shell, self.output, finish_reason, counts)
        return events + [self.event(f"response.{body['status']}", response=body)], body

    def failed(self, message: str) -> dict:
        error = {"code": "server_error", "message": message}
        return self.event("response.failed", response=self.shell | {"status": "failed", "error": error})

    def _open(self, item: dict) -> list[dict]:
        self.output.append(item)
        self.texts.append("")
        index = len(self.output) - 1
        events = [self.event("response.output_item.added", output_index=index, item=item)]
        part = _part(item, "")
        if part is not None:
            events.append(self._part_event("added", index, part))
        return events

    def _part_event(self, when: str, index: int, part: dict) -> dict:
        where = {"item_id": self.output[index]["id"], "output_index": index, "content_index": 0}
        return self.event(f"response.content_part.{when}", **where, part=part)

    def _reasoning_text(self, text: str) -> list[dict]:
        events = []
        if self._reasoning is None:
            self._reasoning = len(self.output)
            item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [], "status": "in_progress"}
            events = self._open(item)
        return events + self._text_delta(self._reasoning, "response.reasoning_text.delta", text)

    def _message_text(self, text: str) -> list[dict]:
        events = []
        if self._message is None:
            self._message = len(self.output)
            item = {"type": "message", "id": new_id("msg"), "role": "assistant", "status": "in_progress", "content": []}
            events = self._open(item)
        return events + (self._text_delta(self._message, "response.output_text.delta", text) if text else [])

    def _text_delta(self, index: int, kind: str, text: str) -> list[dict]:
        self.texts[index] += text
        extra = {"logprobs": []} if kind == "response.output_text.delta" else {}
        item_id = self.output[index]["id"]
        return [self.event(kind, item_id=item_id, output_index=index, content_index=0, delta=text, **extra)]

    def _finish_reasoning(self) -> list[dict]:
        return [] if self._reasoning is None else self._finish_item(self._reasoning, "completed")

    def _finish_item(self, index: int, status: str) -> list[dict]:
        """The item's done events, once; its final form replaces the open one in ``output``."""
        if index in self.done:
            return []
        self.done.add(index)
        item, text = self.output[index], self.texts[index]
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            final = call_item(item["id"], item["call_id"], item["name"], text, status)
            events = [self.event("response.function_call_arguments.done", **where, name=item["name"], arguments=text)]
        else:
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            final = (reasoning_item if kind == "reasoning_text" else message_item)(item["id"], text, status)
            extra = {"logprobs": []} if kind == "output_text" else {}
            events = [
                self.event(f"response.{kind}.done", **where, content_index=0, text=text, **extra),
                self._part_event("done", index, _part(final, text)),
            ]
        self.output[index] = final
        return events + [self.event("response.output_item.done", output_index=index, item=final)]


def _part(item: dict, text: str) -> dict | None:
    """An item's one content part holding ``text``; None for a call, which has none."""
    if item["type"] == "reasoning":
        return {"type": "reasoning_text", "text": text}
    if item["type"] == "message":
        return output_text(text)
    return None
