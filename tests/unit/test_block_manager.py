"""Block manager: reference counts, prefix caching verified against tokens, LRU eviction. No torch."""

from stepserve.core.block_manager import NULL_BLOCK, BlockManager, PrefixStats


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


def test_two_blocks_are_enough_and_fewer_is_a_clear_error():
    bm = BlockManager(num_blocks=2, block_size=4)  # the null block and one usable block
    assert bm.num_usable_blocks == 1 and bm.allocate("a", 4) and not bm.allocate("b", 1)
    try:
        BlockManager(num_blocks=1, block_size=4)
    except ValueError as exc:
        assert "num_blocks=1" in str(exc) and "at least 2" in str(exc)
    else:
        raise AssertionError("num_blocks=1 accepted")


def test_prefix_stats_add_up_every_lookup_from_zero():
    bm = BlockManager(num_blocks=4, block_size=2)
    assert bm.prefix_stats == PrefixStats(queries=0, hits=0)
    bm.record_prefix_lookup(10, 4)
    bm.record_prefix_lookup(7, 2)
    assert bm.prefix_stats == PrefixStats(queries=17, hits=6)


def test_blocks_registered_pass_after_pass_chain_to_their_parents():
    """Decode registers one more full block per pass; each must chain from the previous one, so
    the whole prompt hits later."""
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(30, 43))  # 13 tokens: 3 full blocks
    assert bm.allocate("a", 13)
    for computed in (4, 5, 8, 12, 13):
        bm.cache_full_blocks("a", tokens, computed)
    assert bm.find_cached_prefix(tokens) == bm.block_ids("a")[:3]


def test_an_evicted_block_leaves_the_cache_and_its_tokens_can_register_again():
    bm = BlockManager(num_blocks=3, block_size=2)  # 2 usable
    tokens = [1, 2, 3]
    assert bm.allocate("a", 2)
    bm.cache_full_blocks("a", tokens, 2)
    bm.free("a")
    assert bm.allocate("b", 4)  # takes both blocks: a's cached block is evicted
    assert bm.find_cached_prefix(tokens) == []
    bm.free("b")
    assert bm.allocate("c", 2)
    bm.cache_full_blocks("c", tokens, 2)  # the same tokens again: registered anew
    assert bm.find_cached_prefix(tokens) == bm.block_ids("c")[:1]


def test_the_first_of_two_identical_blocks_stays_the_cached_one():
    """Two requests with one prompt computed side by side: the prefix cache keeps the first
    one's block; a hit shares it and takes no free block."""
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [5, 6, 7]
    for rid in ("a", "b"):
        assert bm.allocate(rid, 3)
        bm.cache_full_blocks(rid, tokens, 2)
    bm.free("b")
    free = bm.num_free_blocks
    hit = bm.find_cached_prefix(tokens)
    assert hit == bm.block_ids("a")[:1]
    assert bm.allocate("c", 3, hit) and bm.num_free_blocks == free - 1  # only c's second block


def test_a_released_entry_is_never_registered_as_the_null_block():
    bm = BlockManager(num_blocks=12, block_size=4)
    tokens = list(range(13))
    assert bm.allocate("a", 13)
    bm.release_before("a", 8)  # blocks 0 and 1 handed back before they were registered
    bm.cache_full_blocks("a", tokens, 12)
    assert bm.find_cached_prefix(tokens) == []  # block 2's chain needs blocks 0 and 1
    assert NULL_BLOCK not in bm._cached.values()


def test_freeing_an_unknown_request_is_a_no_op():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.free("never-allocated")  # an aborted request that was still waiting
    assert bm.num_free_blocks == 3


def test_a_request_allocated_again_after_free_starts_afresh():
    """Preemption frees a request and allocates it again under the same id: its hashes and
    released entries start from nothing."""
    bm = BlockManager(num_blocks=12, block_size=4)
    assert bm.allocate("a", 16)
    bm.cache_full_blocks("a", list(range(16)), 16)
    bm.release_before("a", 8)
    bm.free("a")
    other = list(range(100, 116))
    assert bm.allocate("a", 16)
    bm.cache_full_blocks("a", other, 16)
    assert bm.find_cached_prefix(other + [0]) == bm.block_ids("a")
    free = bm.num_free_blocks
    bm.release_before("a", 8)
    assert bm.num_free_blocks == free + 2 and bm.block_ids("a")[:2] == [NULL_BLOCK, NULL_BLOCK]


def test_nothing_lies_before_position_zero_or_below():
    bm = BlockManager(num_blocks=8, block_size=1)
    assert bm.allocate("a", 4)
    table = list(bm.block_ids("a"))
    for position in (-3, 0):  # the scheduler passes computed - window + 1, negative early on
        bm.release_before("a", position)
        assert bm.block_ids("a") == table
    bm.release_before("a", 1)
    assert bm.block_ids("a") == [NULL_BLOCK, *table[1:]]
