"""Block manager: reference counts, prefix caching verified against tokens, LRU eviction. No torch."""

from stepserve.core.block_manager import NULL_BLOCK, BlockManager


def test_allocate_is_all_or_nothing_and_free_returns_blocks():
    bm = BlockManager(num_blocks=5, block_size=4)  # 4 usable: block 0 is the null block
    assert bm.allocate("a", 9)  # 3 blocks
    assert NULL_BLOCK not in bm.block_ids("a")
    assert not bm.allocate("b", 8)  # needs 2, 1 free: nothing changes
    assert bm.num_free_blocks == 1 and "b" not in bm._tables
    assert bm.allocate("a", 12)  # still 3 blocks
    assert bm.allocate("a", 13) and bm.num_free_blocks == 0
    bm.free("a")
    assert bm.num_free_blocks == 4 and bm.usage == 0.0


def test_prefix_hit_shares_blocks_and_caps_at_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 112))  # 3 full blocks
    assert bm.allocate("a", 12)
    bm.cache_full_blocks("a", tokens, 12)
    hit = bm.find_cached_prefix(tokens)
    assert hit == bm.block_ids("a")[:2]  # the last token must be computed: 2 of 3 blocks
    assert bm.find_cached_prefix(tokens + [7]) == bm.block_ids("a")  # now all 3 full blocks
    assert bm.allocate("b", 13, hit)
    assert bm.block_ids("b")[:2] == bm.block_ids("a")[:2]
    bm.free("a")
    bm.free("b")
    assert bm.usage == 0.0


def test_hit_is_verified_against_tokens_and_parent():
    bm = BlockManager(num_blocks=16, block_size=2)
    assert bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert len(bm.find_cached_prefix([1, 2, 3, 4, 5])) == 2
    assert bm.find_cached_prefix([9, 9, 3, 4, 5]) == []  # same second block, other parent
    # Forge a collision: another block registered under the same hash must not be handed out.
    block = bm._blocks[bm.block_ids("a")[0]]
    block.tokens = (7, 7)
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]) == []


def test_lru_evicts_least_recently_freed_and_tail_blocks_first():
    bm = BlockManager(num_blocks=7, block_size=2)  # 6 usable
    for rid, toks in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])):
        assert bm.allocate(rid, 4)
        bm.cache_full_blocks(rid, toks, 4)
    bm.free("a")
    bm.free("b")
    # 2 never-used blocks, then a's tail, a's head, b's tail, b's head
    assert bm.allocate("c", 6)  # takes the 2 unused + a's tail
    assert len(bm.find_cached_prefix([1, 2, 9])) == 1  # a's head survives
    assert len(bm.find_cached_prefix([5, 6, 7, 8, 0])) == 2  # b intact
    assert bm.allocate("d", 4)  # evicts a's head, then b's tail
    assert bm.find_cached_prefix([1, 2, 9]) == []
    assert len(bm.find_cached_prefix([5, 6, 7, 8, 0])) == 1


def test_hit_on_free_cached_block_takes_it_off_the_free_list():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    assert bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.free("a")
    hit = bm.find_cached_prefix([1, 2, 3, 4, 5])
    assert len(hit) == 2
    assert bm.allocate("b", 6, hit)  # 2 reused + 1 new = all 3
    assert bm.num_free_blocks == 0
    assert not bm.allocate("c", 1)
    stats_before = bm.prefix_stats
    bm.record_prefix_lookup(5, 4)
    assert bm.prefix_stats.hits == stats_before.hits + 4
