"""KV-cache events, as vLLM publishes them (``--kv-events-config``; docs/kv-events.md): what the
block manager records when it caches a full block, evicts one or clears the prefix cache. The
core hands each step's events to a ``KVEventSink``; ``engine/kv_events.py`` sends them over ZMQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BlockStored:
    """Full blocks entered the prefix cache: one chain, each block's parent the one before it."""

    block_hashes: tuple[int, ...]  # the blocks' hashes as published (``BlockHasher.external``)
    parent_block_hash: int | None  # the hash of the block before the first one; None: it starts the prompt
    token_ids: tuple[int, ...]  # the blocks' tokens, block_size per block
    block_size: int  # tokens per block
    lora_id: int | None = None  # the adapter the blocks were computed with (its id); None: the base model
    lora_name: str | None = None  # and its name, which is in the blocks' hashes


@dataclass(frozen=True)
class BlockRemoved:
    """Cached blocks left the prefix cache (evicted to hold other tokens)."""

    block_hashes: tuple[int, ...]  # as published in their BlockStored


@dataclass(frozen=True)
class AllBlocksCleared:
    """The prefix cache is empty: forget every block of this engine."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventSink(Protocol):
    """Where the core sends each step's events (a publisher thread, in the engine layer)."""

    def publish(self, events: list[KVCacheEvent]) -> None: ...  # in order; never blocks on the network
