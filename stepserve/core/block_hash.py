"""Prefix-cache block hashes: stepserve's own, or vLLM's, which an indexer outside the process
can recompute from the tokens (``--prefix-caching-hash-algo``; docs/kv-events.md).

A block's hash chains its parent's hash, its tokens and its extra keys (a LoRA adapter's name,
as vLLM puts it there). ``builtin`` is Python's ``hash()`` of that triple: fast, but meaningful
in this process only. ``sha256`` and ``sha256_cbor`` are vLLM's: SHA-256 of the triple
``(parent or NONE_HASH, tuple(token_ids), extra_keys)`` serialized by pickle (highest protocol)
or by canonical CBOR; ``NONE_HASH``, the first block's parent, is the same function of the hash
seed (``PYTHONHASHSEED``), or 32 random bytes without one, as in vLLM.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Hashable

HASH_ALGOS = ("builtin", "sha256", "sha256_cbor")
_U64 = (1 << 64) - 1


def _head(major: int, n: int) -> bytes:
    """A CBOR item head: major type and argument in the shortest form (canonical, RFC 8949 4.2.1)."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt, limit in ((24, ">B", 0xFF), (25, ">H", 0xFFFF), (26, ">I", 0xFFFFFFFF), (27, ">Q", _U64)):
        if n <= limit:
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(f"{n} does not fit a CBOR head")


def cbor_dumps(obj) -> bytes:
    """Canonical CBOR of what a block hash holds: ints up to 64 bits, bytes, str, None, tuples
    and lists (as ``cbor2.dumps(obj, canonical=True)`` writes them)."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, bool):
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _head(0, obj) if obj >= 0 else _head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _head(2, len(obj)) + obj
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _head(3, len(data)) + data
    if isinstance(obj, (tuple, list)):
        return _head(4, len(obj)) + b"".join(cbor_dumps(item) for item in obj)
    raise TypeError(f"cannot hash a {type(obj).__name__} into a block hash")


def sha256(obj) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def sha256_cbor(obj) -> bytes:
    return hashlib.sha256(cbor_dumps(obj)).digest()


_DIGESTS: dict[str, Callable[[object], bytes]] = {"sha256": sha256, "sha256_cbor": sha256_cbor}


class BlockHasher:
    """Hashes full blocks under one algorithm; ``seed`` is vLLM's ``PYTHONHASHSEED`` (None: random)."""

    def __init__(self, algo: str = "builtin", seed: str | None = None) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"prefix_caching_hash_algo={algo!r}: choose one of {', '.join(HASH_ALGOS)}")
        self.algo = algo
        self._digest = _DIGESTS.get(algo)
        self.none_hash: bytes | None = None  # the first block's parent (vLLM's NONE_HASH); builtin: None
        if self._digest is not None:
            self.none_hash = self._digest(seed) if seed is not None else os.urandom(32)

    def __call__(self, parent: Hashable | None, tokens: tuple[int, ...], extra_keys: tuple | None) -> Hashable:
        if self._digest is None:
            return hash((parent, tokens, extra_keys))
        return self._digest((parent if parent is not None else self.none_hash, tokens, extra_keys))

    @staticmethod
    def external(block_hash: Hashable) -> int:
        """A hash as vLLM publishes it in KV events: the digest's last 8 bytes as an unsigned
        big-endian integer (its default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``)."""
        if isinstance(block_hash, bytes):
            return int.from_bytes(block_hash[-8:], "big")
        return hash(block_hash) & _U64
