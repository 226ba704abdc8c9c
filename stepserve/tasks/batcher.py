"""Dynamic batching of encoder requests, pure Python: a batch is cut when it is full (by count
or by padded tokens) or when its oldest request has waited ``wait_s``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class _Item(Protocol):
    request_id: str
    token_ids: tuple[int, ...]


class Batcher:
    def __init__(self, max_count: int, max_padded_tokens: int, wait_s: float) -> None:
        self.max_count = max_count  # sequences per batch at most
        self.max_padded_tokens = max_padded_tokens  # rows x longest row, at most (one long row always fits)
        self.wait_s = wait_s  # how long the oldest request may wait for company
        self._pending: dict[str, _Item] = {}  # arrival order
        self._added: dict[str, float] = {}  # when each arrived here (this process's clock)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: _Item, now: float) -> None:
        self._pending[item.request_id] = item
        self._added[item.request_id] = now

    def remove(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._pending.pop(request_id, None)
            self._added.pop(request_id, None)

    def wait_left(self, now: float) -> float:
        """Seconds until the oldest request's wait runs out (0 when none waits)."""
        if not self._pending:
            return 0.0
        return max(0.0, next(iter(self._added.values())) + self.wait_s - now)

    def cut(self, now: float) -> list:
        """The next batch in arrival order, or [] while it should wait for more."""
        batch, longest = [], 0
        for item in self._pending.values():
            width = max(longest, len(item.token_ids))
            if batch and (len(batch) == self.max_count or width * (len(batch) + 1) > self.max_padded_tokens):
                break
            batch.append(item)
            longest = width
        full = len(batch) < len(self._pending) or len(batch) == self.max_count
        if not batch or not (full or self.wait_left(now) == 0.0):
            return []
        self.remove([item.request_id for item in batch])
        return batch
