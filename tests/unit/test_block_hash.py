"""vLLM's block hashes (``--prefix-caching-hash-algo``), checked against values computed here from
vLLM's formula: ``hash_fn((parent or NONE_HASH, tuple(token_ids), extra_keys))`` with
``sha256`` = SHA-256 of ``pickle.dumps(x, protocol=HIGHEST_PROTOCOL)``, ``sha256_cbor`` = SHA-256
of canonical CBOR (RFC 8949; the bytes are written out by hand below), ``NONE_HASH`` =
``hash_fn(PYTHONHASHSEED)``, and the published hash = the digest's last 8 bytes, big-endian."""

import hashlib
import pickle
import struct

import pytest

from stepserve.core.block_hash import BlockHasher, cbor_dumps

SEED = "0"
TOKENS = (1, 2, 300, 70000)  # a 1-byte, a 2-byte and a 4-byte CBOR integer among them


def pickled_sha256(obj) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def test_sha256_chain_is_vllms():
    hasher = BlockHasher("sha256", SEED)
    none_hash = pickled_sha256(SEED)
    first = pickled_sha256((none_hash, TOKENS, None))
    second = pickled_sha256((first, (5, 6, 7, 8), None))
    assert hasher.none_hash == none_hash
    assert hasher(None, TOKENS, None) == first
    assert hasher(first, (5, 6, 7, 8), None) == second


def test_sha256_cbor_against_hand_written_cbor():
    hasher = BlockHasher("sha256_cbor", SEED)
    none_hash = hashlib.sha256(b"\x61" + b"0").digest()  # text string of length 1: "0"
    # [bytes(32), [1, 2, 300, 70000], null]: array(3); bstr(32); array(4) of 0x01, 0x02,
    # uint16 0x012c, uint32 0x00011170; simple value null.
    block = b"\x83" + b"\x58\x20" + none_hash + b"\x84\x01\x02\x19\x01\x2c\x1a\x00\x01\x11\x70" + b"\xf6"
    assert hasher.none_hash == none_hash
    assert hasher(None, TOKENS, None) == hashlib.sha256(block).digest()
    # A LoRA adapter's name in the extra keys: ["ad"] is array(1) of text(2).
    with_lora = block[:-1] + b"\x81\x62ad"
    assert hasher(None, TOKENS, ("ad",)) == hashlib.sha256(with_lora).digest()


def test_cbor_matches_cbor2_canonical():
    cbor2 = pytest.importorskip("cbor2")
    for obj in [
        (b"\x00" * 32, tuple(range(0, 70000, 997)), None),
        (b"x", (23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1), ("lora-a", -1, -25, -(2**40))),
        ("seed", [], ()),
    ]:
        assert cbor_dumps(obj) == cbor2.dumps(obj, canonical=True)


def test_published_hash_is_the_last_8_bytes_big_endian():
    digest = bytes(range(32))
    assert BlockHasher.external(digest) == struct.unpack(">Q", digest[-8:])[0]
    assert BlockHasher.external(digest) == int.from_bytes(digest, "big") & (2**64 - 1)


def test_no_seed_means_a_random_none_hash():
    assert BlockHasher("sha256").none_hash != BlockHasher("sha256").none_hash
    assert BlockHasher("sha256_cbor", "42").none_hash == BlockHasher("sha256_cbor", "42").none_hash


def test_builtin_and_unknown_algorithms():
    hasher = BlockHasher()
    assert hasher(None, TOKENS, None) == hash((None, TOKENS, None))
    assert hasher.none_hash is None
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        BlockHasher("xxhash")
