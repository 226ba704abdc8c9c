"""Incremental detokenization with stop strings.

Text is decoded a token at a time against a short window of earlier tokens, so multi-byte
characters split across tokens come out whole and word-leading spaces are right. Text that may
be the beginning of a stop string is held back until it is clear; a matched stop string and
everything after it is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence

_PROMPT_CONTEXT = 5  # prompt tokens decoded with the first output token, for spacing


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # everything decoded so far, cut at a stop string once matched
        self._emitted = 0  # characters of ``text`` already returned
        self.matched_stop: str | None = None
        self.stop_index: int | None = None  # tokens of the matching ``add`` call through the stop string's end

    def add(self, token_ids: Sequence[int], *, finished: bool = False, skip_last: bool = False) -> str:
        """Decode new tokens and return the text now safe to emit.

        ``skip_last`` leaves out the final token (a stop token id, not part of the text).
        ``finished`` flushes everything held back.
        """
        ids = list(token_ids[:-1]) if skip_last and token_ids else list(token_ids)
        for i, token in enumerate(ids):
            if self.matched_stop is None:
                self.text += self._decode_one(token)
                self._check_stop()
                if self.matched_stop is not None:
                    self.stop_index = i + 1
        if finished and self.matched_stop is None:
            self.text += self._flush()
        end = len(self.text) if (finished or self.matched_stop) else len(self.text) - self._held()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_one(self, token: int) -> str:
        self._ids.append(token)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""  # an incomplete character: wait for the next token

    def _flush(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _check_stop(self) -> None:
        if not self.stop:
            return
        start = max(0, self._emitted - max(len(s) for s in self.stop))
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            index, stop = min(hits)
            self.text = self.text[:index]
            self.matched_stop = stop

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held
