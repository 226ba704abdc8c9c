"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and prefix caching.

Prefix caching: every full block gets a hash chained from its parent's hash, its tokens and
its extra keys (a LoRA adapter's name), by the algorithm of ``core/block_hash.py``. A hit is
verified against the block's stored tokens, parent hash and salt, so a hash collision (or an
adapter reloaded under the same name) can never hand a request another prompt's KV. Free
blocks sit in an LRU (an ordered dict: O(1) removal on a hit, O(1) eviction at the front); a
free block keeps its hash until evicted.
Block 0 is the null block: never allocated, it backs padding and slots past a request's end.

Sliding window: for a model whose every layer is windowed, ``release_before`` hands back the
blocks no future query can see; their table entries become the null block, so positions keep
their block index and the attention kernels (which never read before the window) are unchanged.

KV events (docs/kv-events.md): with ``record_events`` the manager notes each chain of blocks it
caches (``BlockStored``), each cached block it evicts (``BlockRemoved``) and a cleared cache
(``AllBlocksCleared``); the core takes them once per step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from stepserve.core.block_hash import BlockHasher
from stepserve.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

NULL_BLOCK = 0


@dataclass(frozen=True)
class CacheSalt:
    """What keys a request's blocks beside their tokens: its LoRA adapter (two adapters never share KV)."""

    lora_id: int  # unique per adapter while the server runs: a hit must match it
    lora_name: str  # in the blocks' hashes, as vLLM puts it in their extra keys

    @property
    def extra_keys(self) -> tuple[str, ...]:
        return (self.lora_name,)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: Hashable | None = None  # set while the block is registered in the prefix cache
    parent_hash: Hashable | None = None  # hash of the block before it in its prompt (None: the first)
    tokens: tuple[int, ...] = ()  # the tokens whose KV it holds, to verify hits
    salt: CacheSalt | None = None  # the adapter it was computed with, to verify hits


@dataclass(frozen=True)
class PrefixStats:
    queries: int  # prompt tokens looked up in the prefix cache
    hits: int  # of those, tokens found


class BlockManager:
    """Owns the block tables of all requests. Pure Python, no torch."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hasher: BlockHasher | None = None,
        record_events: bool = False,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least 2 blocks (one is the null block)")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hasher = hasher or BlockHasher()
        self._events: list[KVCacheEvent] | None = [] if record_events else None
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[Hashable, int] = {}  # block hash -> block id
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[Hashable]] = {}  # hashes of each request's registered full blocks
        self._released: dict[str, int] = {}  # leading table entries handed back (sliding window)
        self._queries = 0
        self._hits = 0

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV cache, the null block included (vLLM's ``num_gpu_blocks``)."""
        return len(self._blocks)

    @property
    def num_usable_blocks(self) -> int:
        return len(self._blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of usable blocks held by requests (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    @property
    def prefix_stats(self) -> PrefixStats:
        return PrefixStats(self._queries, self._hits)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (the live list: callers must not change it)."""
        return self._tables[request_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int], salt: CacheSalt | None = None) -> list[int]:
        """Block ids of the longest cached prefix, capped so the last token is always computed.
        Only blocks cached under the same ``salt`` (a LoRA adapter) match."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        extra_keys = salt.extra_keys if salt is not None else None
        found: list[int] = []
        parent = None
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self.hasher(parent, tokens, extra_keys)
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self._blocks[block_id]
            if block.tokens != tokens or block.parent_hash != parent or block.salt != salt:
                break
            found.append(block_id)
            parent = h
        return found

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (called once per admission, not per attempt)."""
        self._queries += num_tokens
        self._hits += num_hit_tokens

    def allocate(self, request_id: str, num_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        """Grow the request's table to hold ``num_tokens`` slots; all or nothing.

        ``cached_prefix`` (from ``find_cached_prefix``) starts a new table with shared blocks.
        Returns False, changing nothing, when too few blocks are free.
        """
        table = self._tables.get(request_id, [])
        reused_free = sum(1 for b in cached_prefix if self._blocks[b].ref_count == 0)
        need = self.blocks_needed(num_tokens) - len(table) - len(cached_prefix)
        if need > len(self._free) - reused_free:
            return False
        for block_id in cached_prefix:
            self._take(block_id)
        table = self._tables.setdefault(request_id, table)
        table.extend(cached_prefix)
        if cached_prefix:
            self._hashes[request_id] = [self._blocks[b].hash for b in cached_prefix]
        for _ in range(max(need, 0)):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._blocks[block_id].ref_count = 1
            table.append(block_id)
        return True

    def free(self, request_id: str) -> None:
        """Release the request's blocks; tail blocks go first in the LRU, so prefixes live longest."""
        for block_id in reversed(self._tables.pop(request_id, [])):
            self._release(block_id)
        self._hashes.pop(request_id, None)
        self._released.pop(request_id, None)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Hand back the request's tail blocks beyond the first ``num_tokens`` slots (speculative
        slots whose tokens were rejected). Such blocks hold no full block of computed tokens, so
        none is in the prefix cache."""
        table = self._tables.get(request_id)
        if table is None:
            return
        keep = max(self.blocks_needed(num_tokens), self._released.get(request_id, 0))
        while len(table) > keep:
            self._release(table.pop())

    def release_before(self, request_id: str, position: int) -> None:
        """Hand back the request's blocks that hold only positions before ``position`` (no later
        query sees them: they are outside every layer's window). A released block keeps its
        prefix-cache hash until evicted, like any free block."""
        table = self._tables[request_id]
        done = self._released.get(request_id, 0)
        upto = min(max(position, 0) // self.block_size, len(table))
        for i in range(done, upto):
            self._release(table[i])
            table[i] = NULL_BLOCK
        self._released[request_id] = max(done, upto)

    def _release(self, block_id: int) -> None:
        if block_id == NULL_BLOCK:
            return  # already released (sliding window)
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None

    def cache_full_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed: int, salt: CacheSalt | None = None
    ) -> None:
        """Register the request's newly completed full blocks in the prefix cache (under ``salt``,
        as ``find_cached_prefix`` reads them)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = self._tables[request_id]
        hashes = self._hashes.setdefault(request_id, [])
        extra_keys = salt.extra_keys if salt is not None else None
        stored: list[int] = []  # indexes of the blocks registered now
        for i in range(len(hashes), min(num_computed // bs, len(table))):
            parent = hashes[-1] if hashes else None
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self.hasher(parent, tokens, extra_keys)
            hashes.append(h)
            block = self._blocks[table[i]]
            if table[i] != NULL_BLOCK and block.hash is None and h not in self._cached:
                block.hash, block.parent_hash, block.tokens, block.salt = h, parent, tokens, salt
                self._cached[h] = block.block_id
                stored.append(i)
        if self._events is not None and stored:
            self._record_stored(hashes, stored, token_ids, salt)

    def _record_stored(
        self, hashes: list[Hashable], stored: list[int], token_ids: Sequence[int], salt: CacheSalt | None
    ) -> None:
        """One ``BlockStored`` per run of consecutive blocks registered (a block already cached
        under its hash, by another request, breaks the chain: it is not this block's to announce)."""
        runs: list[list[int]] = []
        for i in stored:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        external, bs = self.hasher.external, self.block_size
        for run in runs:
            first, last = run[0], run[-1]
            self._events.append(
                BlockStored(
                    block_hashes=tuple(external(hashes[i]) for i in run),
                    parent_block_hash=external(hashes[first - 1]) if first else None,
                    token_ids=tuple(token_ids[first * bs : (last + 1) * bs]),
                    block_size=bs,
                    lora_id=salt.lora_id if salt is not None else None,
                    lora_name=salt.lora_name if salt is not None else None,
                )
            )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while requests hold blocks, as in vLLM."""
        if len(self._free) != self.num_usable_blocks:
            return False
        for block in self._blocks:
            block.hash, block.parent_hash, block.tokens, block.salt = None, None, (), None
        self._cached.clear()
        if self._events is not None:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVCacheEvent]:
        """The KV events recorded since the last call, oldest first (empty unless ``record_events``)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
                if self._events is not None:
                    self._events.append(BlockRemoved((self.hasher.external(block.hash),)))
            block.hash, block.parent_hash, block.tokens, block.salt = None, None, (), None
