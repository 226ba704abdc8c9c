"""Stored responses of the Responses API (``store: true``, OpenAI's default), in memory.

A stored response keeps its Response object (``GET /v1/responses/{id}``) and the conversation
it ends: the items it continued, its input items and its output items, so that a request with
``previous_response_id`` prepends them (as vLLM keeps them). The store is bounded: at most
``capacity`` (1024) responses, the least recently used one forgotten first; it lives as long as
the server process and is not shared between servers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from stepserve.errors import NotFoundError

CAPACITY = 1024  # stored responses kept; beyond it the least recently used is forgotten


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the Response object as it was returned
    items: tuple  # the conversation it ends, as input items (responses.InputItem models)


class ResponseStore:
    """An LRU map of response id -> ``StoredResponse``; O(1) reads, writes and evictions."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response (now the most recently used), or a 404 naming ``param``."""
        entry = self._entries.get(response_id)
        if entry is None:
            raise NotFoundError(f"no stored response has the id {response_id!r}", param)
        self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def delete(self, response_id: str) -> None:
        """Forget the response, or a 404 when none has this id."""
        if self._entries.pop(response_id, None) is None:
            raise NotFoundError(f"no stored response has the id {response_id!r}")
