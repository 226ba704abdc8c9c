"""KV-cache events (docs/kv-events.md): what the block manager records as it caches, evicts and
clears blocks; one batch per engine step; and the wire bytes against vLLM's own msgspec structs."""

from typing import Any

import msgpack
import pytest

from stepserve.config import CacheConfig, ConfigError, KVEventsConfig, SchedulerConfig
from stepserve.core.block_hash import BlockHasher
from stepserve.core.block_manager import BlockManager, CacheSalt
from stepserve.core.engine_core import EngineCore
from stepserve.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from stepserve.core.outputs import EngineCoreRequest, ModelRunnerOutput
from stepserve.core.scheduler import Scheduler
from stepserve.engine.kv_events import default_topic, encode_batch
from stepserve.sampling import SamplingParams

BS = 2


def manager(num_blocks=6, algo="sha256_cbor"):
    return BlockManager(num_blocks, BS, hasher=BlockHasher(algo, "0"), record_events=True)


def ext(hasher, *blocks, extra=None):
    """Published hashes of a chain of blocks, computed block by block."""
    out, parent = [], None
    for tokens in blocks:
        parent = hasher(parent, tuple(tokens), extra)
        out.append(BlockHasher.external(parent))
    return tuple(out)


def test_stored_per_new_chain_with_parent_and_tokens():
    bm = manager()
    h = ext(bm.hasher, (1, 2), (3, 4), (5, 6))
    assert bm.allocate("a", 5)
    bm.cache_full_blocks("a", [1, 2, 3, 4, 5], 4)
    assert bm.take_events() == [BlockStored(h[:2], None, (1, 2, 3, 4), BS)]
    assert bm.take_events() == []  # taken once
    bm.cache_full_blocks("a", [1, 2, 3, 4, 5], 5)  # no new full block: nothing
    assert bm.allocate("a", 6)
    bm.cache_full_blocks("a", [1, 2, 3, 4, 5, 6], 6)
    assert bm.take_events() == [BlockStored(h[2:], h[1], (5, 6), BS)]


def test_prefix_hit_and_duplicates_are_not_announced_again():
    bm = manager(num_blocks=10)
    prompt = [1, 2, 3, 4, 5]
    for rid in ("a", "b"):  # b computes the same blocks before a's are cached: duplicates
        assert bm.allocate(rid, 5)
    bm.cache_full_blocks("a", prompt, 4)
    bm.cache_full_blocks("b", prompt, 4)
    assert len(bm.take_events()) == 1  # b's copies are not in the cache: not announced
    hit = bm.find_cached_prefix(prompt + [9])
    assert len(hit) == 2 and bm.allocate("c", 7, hit)
    bm.cache_full_blocks("c", prompt + [9, 9], 6)
    h = ext(bm.hasher, (1, 2), (3, 4), (5, 9))
    assert bm.take_events() == [BlockStored(h[2:], h[1], (5, 9), BS)]


def test_removed_when_a_cached_block_is_evicted_and_cleared_on_reset():
    bm = manager(num_blocks=4)  # 3 usable blocks
    h = ext(bm.hasher, (1, 2), (3, 4))
    assert bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.take_events()
    assert not bm.reset_prefix_cache()  # refused while a holds blocks
    bm.free("a")  # a's tail goes first in the LRU, then its head; the never-used block before both
    assert bm.allocate("b", 4)
    assert bm.take_events() == [BlockRemoved((h[1],))]
    assert bm.allocate("c", 2)
    assert bm.take_events() == [BlockRemoved((h[0],))]
    bm.free("b")
    bm.free("c")
    assert bm.reset_prefix_cache()
    assert bm.take_events() == [AllBlocksCleared()]
    assert bm.find_cached_prefix([1, 2, 3]) == []


def test_lora_blocks_carry_the_adapter_and_hash_its_name():
    bm = manager()
    salt = CacheSalt(7, "ad")
    assert bm.allocate("a", 3)
    bm.cache_full_blocks("a", [1, 2, 3], 2, salt)
    h = ext(bm.hasher, (1, 2), extra=("ad",))
    assert bm.take_events() == [BlockStored(h, None, (1, 2), BS, 7, "ad")]
    assert bm.find_cached_prefix([1, 2, 3]) == []  # the base model never reads an adapter's KV
    assert bm.find_cached_prefix([1, 2, 3], CacheSalt(8, "ad")) == []  # nor an adapter reloaded under its name
    assert len(bm.find_cached_prefix([1, 2, 3], salt)) == 1


def test_nothing_recorded_without_record_events():
    bm = BlockManager(6, BS)
    assert bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert bm.take_events() == []


class EchoWorker:
    def execute(self, sched):
        return ModelRunnerOutput(tuple((7,) if s.sample else () for s in sched.requests))


class Sink:
    def __init__(self):
        self.batches = []

    def publish(self, events):
        self.batches.append(events)


def test_core_publishes_one_batch_per_step():
    bm = manager(num_blocks=16)
    sink = Sink()
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=4), bm, 64, frozenset())
    core = EngineCore(scheduler, EchoWorker(), kv_events=sink)
    core.add_request(EngineCoreRequest("a", (1, 2, 3, 4, 5, 6), SamplingParams(max_tokens=2, ignore_eos=True)))
    while core.has_unfinished:
        core.step()
    h = ext(bm.hasher, (1, 2), (3, 4), (5, 6))
    assert (
        sink.batches
        == [  # a prompt chunk of 4, then its last 2 tokens; the decode step caches nothing
            [BlockStored(h[:2], None, (1, 2, 3, 4), BS)],
            [BlockStored(h[2:], h[1], (5, 6), BS)],
        ]
    )


def test_config_parses_vllms_json():
    cache = CacheConfig(kv_events_config='{"enable_kv_cache_events": true, "topic": "kv@1.2.3.4@m"}')
    assert cache.kv_events == KVEventsConfig(enable_kv_cache_events=True, topic="kv@1.2.3.4@m")
    assert cache.kv_events.enabled and cache.hash_algo == "sha256"  # vLLM's default hash with events
    assert CacheConfig().hash_algo == "builtin"
    assert not CacheConfig(kv_events_config='{"enable_kv_cache_events": true, "publisher": "null"}').kv_events.enabled
    for bad, words in [
        ("{", "not JSON"),
        ('{"enable_kv_cache_events": true, "port": 1}', "unknown keys port"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher"),
        ('{"enable_kv_cache_events": "yes"}', "true or false"),
    ]:
        with pytest.raises(ConfigError, match=words):
            CacheConfig(kv_events_config=bad)
    with pytest.raises(ConfigError, match="sha256"):
        CacheConfig(kv_events_config='{"enable_kv_cache_events": true}', prefix_caching_hash_algo="builtin")
    with pytest.raises(ConfigError, match="prefix_caching_hash_algo"):
        CacheConfig(prefix_caching_hash_algo="md5")


def test_topic_names_the_pod_and_the_model(monkeypatch):
    monkeypatch.setenv("POD_IP", "10.0.0.7")
    assert default_topic("m") == "kv@10.0.0.7@m"


EVENTS = [
    BlockStored((2**64 - 5, 3), None, (1, 2, 300, 70000), BS),
    BlockStored((7,), 2**63 + 1, (5, 6), BS, 3, "ad"),
    BlockRemoved((2**64 - 5,)),
    AllBlocksCleared(),
]


def test_batch_layout():
    ts, events, rank = msgpack.unpackb(encode_batch(1234.5, EVENTS))
    assert (ts, rank) == (1234.5, 0)
    assert events == [
        ["BlockStored", [2**64 - 5, 3], None, [1, 2, 300, 70000], BS, None, "GPU", None],
        ["BlockStored", [7], 2**63 + 1, [5, 6], BS, 3, "GPU", "ad"],
        ["BlockRemoved", [2**64 - 5], "GPU"],
        ["AllBlocksCleared"],
    ]


def test_batch_bytes_equal_vllms_msgspec_structs():
    """vLLM's struct definitions (vllm/distributed/kv_events.py, once BlockStored carried
    lora_name), encoded by msgspec, against ours: the same bytes."""
    msgspec = pytest.importorskip("msgspec")

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass

    class VBlockStored(KVCacheEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None

    class VBlockRemoved(KVCacheEvent, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None

    class VAllBlocksCleared(KVCacheEvent, tag="AllBlocksCleared"):
        pass

    class KVEventBatch(EventBatch):
        events: list[VBlockStored | VBlockRemoved | VAllBlocksCleared]

    theirs = KVEventBatch(
        1234.5,
        [
            VBlockStored([2**64 - 5, 3], None, [1, 2, 300, 70000], BS, None, "GPU", None),
            VBlockStored([7], 2**63 + 1, [5, 6], BS, 3, "GPU", "ad"),
            VBlockRemoved([2**64 - 5], "GPU"),
            VAllBlocksCleared(),
        ],
        0,  # vLLM's publisher sets its data-parallel rank
    )
    assert encode_batch(1234.5, EVENTS) == msgspec.msgpack.encode(theirs)
    decoded = msgspec.msgpack.decode(encode_batch(1234.5, EVENTS), type=KVEventBatch)
    assert decoded.events[1].lora_name == "ad"
