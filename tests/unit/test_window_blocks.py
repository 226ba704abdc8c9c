"""Blocks outside the sliding window of an all-windowed model go back to the pool."""

from stepserve.core.block_manager import NULL_BLOCK, BlockManager


def test_release_before_hands_back_whole_blocks_only():
    bm = BlockManager(num_blocks=12, block_size=4)
    assert bm.allocate("a", 20)  # 5 blocks
    table = list(bm.block_ids("a"))
    bm.release_before("a", 9)  # positions 0..8 unseen: blocks 0 and 1 (0..7); block 2 holds 8
    assert bm.block_ids("a")[:2] == [NULL_BLOCK, NULL_BLOCK]
    assert bm.block_ids("a")[2:] == table[2:]
    assert bm.num_free_blocks == 11 - 5 + 2
    bm.release_before("a", 9)  # idempotent
    bm.release_before("a", 3)  # never un-releases
    assert bm.num_free_blocks == 8
    assert bm.allocate("a", 24)  # growing keeps the logical positions
    assert len(bm.block_ids("a")) == 6
    bm.free("a")  # released entries are not freed twice
    assert bm.num_free_blocks == 11


def test_released_blocks_stay_in_the_prefix_cache_until_evicted():
    bm = BlockManager(num_blocks=12, block_size=4)
    tokens = list(range(17))
    assert bm.allocate("a", 17)
    bm.cache_full_blocks("a", tokens, 16)
    first = bm.block_ids("a")[0]
    bm.release_before("a", 8)
    bm.cache_full_blocks("a", tokens + [99, 98, 97], 20)  # later blocks register; released ones stay put
    assert bm.find_cached_prefix(tokens)[:1] == [first]


def test_a_shared_prefix_block_stays_with_its_other_owner():
    bm = BlockManager(num_blocks=12, block_size=4)
    tokens = list(range(9))
    assert bm.allocate("a", 9)
    bm.cache_full_blocks("a", tokens, 8)
    prefix = bm.find_cached_prefix(tokens)
    assert bm.allocate("b", 9, prefix)
    free = bm.num_free_blocks
    bm.release_before("a", 8)  # "b" still holds both shared blocks
    assert bm.num_free_blocks == free
    bm.release_before("b", 8)
    assert bm.num_free_blocks == free + 2
