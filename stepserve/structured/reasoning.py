"""Reasoning parsers: a reasoning model's answer split into its thinking and what follows.

Reasoning models write their thinking between markers before the answer (Qwen3 and the
DeepSeek-R1 distills: ``<think> ... </think>``). ``ReasoningSplitter`` cuts the text, fed a
piece at a time or whole, into reasoning and content, so that streamed and whole answers agree
by construction. The parsers, as vLLM's ``--reasoning-parser`` names them:

- ``qwen3``: the thinking is the part between ``<think>`` and ``</think>``; an answer that does
  not open with ``<think>`` (``enable_thinking: false``) is all content;
- ``deepseek_r1``: the same, except that an answer without ``<think>`` is thinking until
  ``</think>`` (R1's template opens the thinking in the prompt), and all thinking if the
  marker never comes.

What the prompt says comes first (``prompt_state``): when its last marker is ``<think>`` the
answer starts as thinking; when it is ``</think>`` (Qwen3's template with ``enable_thinking:
false`` writes an empty thinking block) the answer is content unless it opens ``<think>`` again.
Blank lines after ``</think>`` are not content.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    start: str = START  # the marker that opens the thinking
    end: str = END  # the marker that closes it
    thinks_without_start: bool = False  # an answer without the start marker is thinking (deepseek_r1)


PARSERS = {
    "qwen3": ReasoningParser("qwen3"),
    "deepseek_r1": ReasoningParser("deepseek_r1", thinks_without_start=True),
}


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """One answer's text, fed in pieces, cut into (reasoning, content) pieces."""

    def __init__(self, parser: ReasoningParser, prompt_state: str = "none") -> None:
        self.parser = parser
        self.state = "reasoning" if prompt_state == "inside" else "opening"  # opening, reasoning, after_end, content
        self._thinks_without_start = parser.thinks_without_start and prompt_state == "none"
        self._buffer = ""

    @property
    def reasoning_ended(self) -> bool:
        return self.state in ("after_end", "content")

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and the content that ``text`` completes (text that may still turn out to
        be a marker is held back)."""
        self._buffer += text
        reasoning, content = "", ""
        while True:
            if self.state == "opening":
                stripped = self._buffer.lstrip()
                if stripped.startswith(self.parser.start):
                    self._buffer = stripped[len(self.parser.start) :]
                    self.state = "reasoning"
                elif not stripped or self.parser.start.startswith(stripped):
                    return reasoning, content  # not yet known
                else:
                    self.state = "reasoning" if self._thinks_without_start else "content"
                continue
            if self.state == "reasoning":
                at = self._buffer.find(self.parser.end)
                if at < 0:
                    keep = _held_back(self._buffer, self.parser.end)
                    reasoning += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return reasoning, content
                reasoning += self._buffer[:at]
                self._buffer = self._buffer[at + len(self.parser.end) :]
                self.state = "after_end"
                continue
            if self.state == "after_end":
                self._buffer = self._buffer.lstrip("\n")
                if not self._buffer:
                    return reasoning, content
                self.state = "content"
                continue
            content += self._buffer
            self._buffer = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is left once the answer is complete."""
        rest, self._buffer = self._buffer, ""
        if self.state == "reasoning" or (self.state == "opening" and self._thinks_without_start):
            return rest, ""
        return "", rest if self.state != "after_end" else ""


def prompt_state(prompt_ids, start_id: int, end_id: int) -> str:
    """``inside`` when the prompt's last marker opens the thinking, ``closed`` when it closes
    it, ``none`` without either."""
    for token in reversed(prompt_ids):
        if token == start_id:
            return "inside"
        if token == end_id:
            return "closed"
    return "none"


def marker_ids(tokenizer, parser: ReasoningParser) -> tuple[int, int]:
    """The start and end markers' token ids; ``ValueError`` unless each is one token of the
    vocabulary (as vLLM's parsers require: the engine recognises the end of the thinking by it)."""
    ids = []
    for marker in (parser.start, parser.end):
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"--reasoning-parser {parser.name} needs {marker} as one token of the tokenizer "
                f"(it is {len(encoded)} tokens here): is this a {parser.name} model?"
            )
        ids.append(encoded[0])
    return ids[0], ids[1]


def split(parser: ReasoningParser, text: str, prompt_state: str = "none") -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer; None for a part that is empty."""
    splitter = ReasoningSplitter(parser, prompt_state)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    return (reasoning + more_reasoning) or None, (content + more_content) or None
