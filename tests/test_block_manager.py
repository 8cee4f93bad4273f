"""Block manager: allocation, freeing, ref counts, prefix-cache hits and eviction order."""

from nanoseek.inference.block_manager import BlockManager
from nanoseek.inference.sampling import SamplingParams
from nanoseek.inference.sequence import Request, Sequence


def make_seq(ids, seq_id=0):
    return Sequence(seq_id, Request(f"r{seq_id}", None, list(ids), SamplingParams()), 0, generator=None)


def test_allocate_covers_tokens_plus_lookahead_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    assert bm.allocate(seq, lookahead=3)  # 13 slots -> 4 blocks
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    assert seq.num_computed == 0
    bm.free_blocks(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8


def test_allocate_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(9))  # needs 3 blocks
    assert not bm.allocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(list(range(10)), 0)
    assert bm.allocate(a)  # registers blocks [0:4] and [4:8]
    b = make_seq(list(range(8)) + [50, 51, 52], 1)
    assert bm.allocate(b)
    assert b.num_computed == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[x].ref_count for x in a.block_table[:2]] == [2, 2]
    assert b.block_table[2] != a.block_table[2]
    bm.free_blocks(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]


def test_last_token_is_never_a_hit():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(range(8), 0)
    assert bm.allocate(a)
    b = make_seq(range(8), 1)  # identical prompt: the second block must still be computed
    assert bm.allocate(b)
    assert b.num_computed == 4


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(9), 0)
    assert bm.allocate(a)
    bm.free_blocks(a)
    b = make_seq(list(range(8)) + [99], 1)
    assert bm.allocate(b) and b.num_computed == 8  # both full blocks found in the free list
    bm.free_blocks(b)
    # fill the whole pool with other content: the cached blocks get evicted
    c = make_seq([7] * 16, 2)
    assert bm.allocate(c)
    bm.free_blocks(c)
    d = make_seq(list(range(8)) + [99], 3)
    assert bm.allocate(d) and d.num_computed == 0


def test_eviction_prefers_unhashed_then_deepest_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(range(9), 0)  # blocks: 2 full (hashed) + 1 partial
    assert bm.allocate(a)
    full = a.block_table[:2]
    bm.free_blocks(a)
    c = make_seq([7] * 7, 1)  # needs 2 blocks: the unhashed partial one, then the deepest cached one
    assert bm.allocate(c)
    assert full[0] not in c.block_table and full[1] in c.block_table


def test_a_freed_unhashed_block_is_recycled_before_older_cached_ones():
    """A block freed without a hash goes to the front of the free list, ahead of cached blocks
    freed earlier: otherwise each short request evicts a cached prefix instead."""
    bm = BlockManager(num_blocks=2, block_size=4)
    x = make_seq(range(5), 0)  # one full (cached) block and a partial one
    assert bm.allocate(x)
    cached = x.block_table[0]
    bm.free_blocks(x)
    for i, token in enumerate((7, 8)):  # two short requests, one partial block each
        short = make_seq([token] * 3, i + 1)
        assert bm.allocate(short)
        assert short.block_table != [cached]
        bm.free_blocks(short)
    again = make_seq(range(5), 3)
    assert bm.allocate(again) and again.num_computed == 4  # x's cached block survived both


def test_hash_collision_is_ruled_out_by_content():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3], 0)
    assert bm.allocate(a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9)  # pretend the stored block holds other tokens under the same hash
    b = make_seq([1, 2, 5], 1)
    assert bm.allocate(b) and b.num_computed == 0


def test_can_append_and_append_grow_the_table():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(range(4))
    assert bm.allocate(seq)
    seq.token_ids.append(4)
    assert bm.can_append(seq) and len(seq.block_table) == 1
    bm.append(seq)
    assert len(seq.block_table) == 2
    assert bm.can_append(seq, lookahead=7) and not bm.can_append(seq, lookahead=8)


def test_generated_blocks_register_and_reset_forgets():
    bm = BlockManager(num_blocks=6, block_size=4)
    seq = make_seq(range(3))
    assert bm.allocate(seq, lookahead=5)
    seq.token_ids += [3, 4, 5]
    bm.register_full_blocks(seq, 6)  # the first block is now full and computed
    assert seq.num_hashed_blocks == 1
    other = make_seq([0, 1, 2, 3, 8], 1)
    assert bm.allocate(other) and other.num_computed == 4
    bm.free_blocks(other)
    bm.reset_prefix_cache()
    again = make_seq([0, 1, 2, 3, 8], 2)
    assert bm.allocate(again) and again.num_computed == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = make_seq(range(9), 0), make_seq(range(9), 1)
    assert bm.allocate(a) and bm.allocate(b)
    assert b.num_computed == 0 and not set(a.block_table) & set(b.block_table)


def test_prefix_keys_are_sha256_chained_over_the_whole_prefix():
    """Cache keys name other requests' latents: a cryptographic digest (Python's hash() can be
    collided on purpose), chained so that equal blocks after different prefixes differ."""
    import hashlib
    from array import array

    from nanoseek.inference.block_manager import chain_hash

    first = chain_hash(None, (1, 2))
    assert first == hashlib.sha256(array("q", (1, 2)).tobytes()).digest()
    assert chain_hash(first, (3, 4)) == hashlib.sha256(first + array("q", (3, 4)).tobytes()).digest()
    assert chain_hash(first, (3, 4)) != chain_hash(chain_hash(None, (1, 5)), (3, 4))
