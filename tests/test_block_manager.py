"""BlockManager on toy sizes (block size 4): exact block ids, reference counts, hashes and eviction order."""

import numpy as np
import xxhash

from nanovllm_jax.engine import block_manager as bm_module
from nanovllm_jax.engine.block_manager import BlockManager, compute_hash
from nanovllm_jax.engine.sequence import Sequence
from nanovllm_jax.sampling_params import SamplingParams

BS = 4


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence(token_ids, SamplingParams(), BS)


def compute(bm: BlockManager, seq: Sequence):
    """What a step computing every uncached token of `seq` does to it (without sampling)."""
    seq.num_scheduled_tokens = seq.num_tokens - seq.num_cached_tokens
    bm.hash_blocks(seq)
    seq.num_cached_tokens += seq.num_scheduled_tokens
    seq.num_scheduled_tokens = 0


def refs(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def test_allocate_and_free_ids_and_ref_counts():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(10)))  # 3 blocks, the last with 2 tokens
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert a.block_table == [0, 1, 2] and a.num_cached_tokens == 0
    assert refs(bm) == [1, 1, 1, 0, 0, 0]
    assert list(bm.free_block_ids) == [3, 4, 5] and bm.used_block_ids == {0, 1, 2}
    b = make_seq(list(range(100, 109)))
    assert bm.can_allocate(b)  # 3 blocks, exactly the 3 free ones
    bm.allocate(b)
    assert b.block_table == [3, 4, 5] and bm.num_free_blocks == 0
    assert not bm.can_allocate(make_seq([7]))
    bm.deallocate(a)  # tail first
    assert a.block_table == [] and a.num_cached_tokens == 0
    assert list(bm.free_block_ids) == [2, 1, 0] and refs(bm) == [0, 0, 0, 1, 1, 1]
    c = make_seq([1, 2, 3, 4, 5])
    bm.allocate(c)  # no hashes registered (nothing computed): no hits, least recently freed first
    assert c.block_table == [2, 1] and list(bm.free_block_ids) == [0]


def test_hash_chain_registered_only_for_computed_full_blocks():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(10)))
    bm.allocate(a)
    assert bm.hash_to_block_id == {} and [b.hash for b in bm.blocks] == [-1] * 4
    compute(bm, a)
    h0 = xxhash.xxh64(np.arange(0, 4, dtype=np.int32).tobytes()).intdigest()
    h1 = xxhash.xxh64(h0.to_bytes(8, "little") + np.arange(4, 8, dtype=np.int32).tobytes()).intdigest()
    assert (compute_hash([0, 1, 2, 3]), compute_hash([4, 5, 6, 7], h0)) == (h0, h1)
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    assert [b.hash for b in bm.blocks] == [h0, h1, -1, -1]  # the partial last block is not hashed
    assert bm.blocks[1].token_ids == [4, 5, 6, 7]
    # The same block content after a different prefix hashes differently.
    assert compute_hash([4, 5, 6, 7], compute_hash([9, 9, 9, 9])) != h1


def test_hits_on_identical_prefixes():
    bm = BlockManager(10, BS)
    a = make_seq(list(range(10)))
    bm.allocate(a)
    compute(bm, a)
    b = make_seq(list(range(8)) + [50, 51, 52])  # shares blocks 0 and 1 with a
    bm.allocate(b)
    assert b.block_table == [0, 1, 3] and b.num_cached_tokens == 8 and b.num_cached_blocks == 2
    assert refs(bm)[:4] == [2, 2, 1, 1]
    c = make_seq([0, 1, 2, 3, 4, 5, 6, 99, 8])  # block 1 differs: only block 0 hits
    bm.allocate(c)
    assert c.block_table == [0, 4, 5] and c.num_cached_tokens == 4
    d = make_seq([9, 1, 2, 3, 4, 5, 6, 7, 8])  # block 0 differs: nothing hits after it either
    bm.allocate(d)
    assert d.block_table == [6, 7, 8] and d.num_cached_tokens == 0
    assert refs(bm) == [3, 2, 1, 1, 1, 1, 1, 1, 1, 0]
    bm.deallocate(a)
    assert refs(bm)[:3] == [2, 1, 0] and list(bm.free_block_ids) == [9, 2]


def test_hit_requires_equal_token_ids(monkeypatch):
    # A hash that depends only on the block's position: every block i collides with every other block i.
    def position_hash(token_ids, prefix=-1):
        return 0 if prefix == -1 else prefix + 1

    monkeypatch.setattr(bm_module, "compute_hash", position_hash)
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute(bm, a)
    assert bm.hash_to_block_id == {0: 0, 1: 1}
    b = make_seq([1, 2, 3, 4, 50, 60, 70, 80, 9])  # block 0 equal, block 1 collides with different tokens
    bm.allocate(b)
    assert b.block_table == [0, 3, 4] and b.num_cached_tokens == 4
    c = make_seq([10, 20, 30, 40, 5, 6, 7, 8, 9])  # block 0 collides: no hit at all
    bm.allocate(c)
    assert c.block_table == [5, 6, 7] and c.num_cached_tokens == 0


def test_freed_blocks_hittable_until_reused_in_eviction_order():
    bm = BlockManager(8, BS)
    a_tokens = list(range(13))  # 4 blocks, blocks 0-2 full
    a = make_seq(a_tokens)
    bm.allocate(a)
    compute(bm, a)
    bm.deallocate(a)
    assert list(bm.free_block_ids) == [4, 5, 6, 7, 3, 2, 1, 0]
    assert sorted(bm.hash_to_block_id.values()) == [0, 1, 2]
    w = make_seq(list(range(100, 117)))  # 5 blocks
    bm.allocate(w)
    assert w.block_table == [4, 5, 6, 7, 3] and list(bm.free_block_ids) == [2, 1, 0]
    v = make_seq([200, 201, 202, 203])
    bm.allocate(v)
    assert v.block_table == [2]  # evicts a's block 2: its hash is gone, its old content unreachable
    assert sorted(bm.hash_to_block_id.values()) == [0, 1] and bm.blocks[2].hash == -1
    bm.deallocate(w)
    assert list(bm.free_block_ids) == [1, 0, 3, 7, 6, 5, 4]
    a2 = make_seq(a_tokens)
    assert bm.can_allocate(a2)
    bm.allocate(a2)  # hits on free blocks 0 and 1 take them out of the free list; block 2 recomputed
    assert a2.block_table == [0, 1, 3, 7] and a2.num_cached_tokens == 8
    assert list(bm.free_block_ids) == [6, 5, 4] and refs(bm) == [1, 1, 1, 1, 0, 0, 0, 1]


def test_hits_on_free_blocks_count_against_free_space():
    bm = BlockManager(3, BS)
    a = make_seq(list(range(9)))  # 3 blocks
    bm.allocate(a)
    compute(bm, a)
    bm.deallocate(a)
    b = make_seq(list(range(8)) + [7, 7, 7, 7, 7])  # hits blocks 0, 1 (both free) + 2 new blocks
    assert not bm.can_allocate(b)
    assert bm.can_allocate(make_seq(list(range(9))))


def test_exact_multiple_fully_cached_prompt_recomputes_last_block():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(8)))
    bm.allocate(a)
    compute(bm, a)
    assert sorted(bm.hash_to_block_id.values()) == [0, 1]  # the full last block is registered too
    b = make_seq(list(range(8)))
    bm.allocate(b)  # the last block is never looked up: block 1 is not shared, 4 tokens to compute
    assert b.block_table == [0, 2] and b.num_cached_tokens == 4
    assert refs(bm)[:3] == [2, 1, 1]
    compute(bm, b)
    assert bm.blocks[2].hash == bm.blocks[1].hash and bm.hash_to_block_id[bm.blocks[2].hash] == 2
    c = make_seq(list(range(12)))  # a longer prompt hits both full blocks
    bm.allocate(c)
    assert c.block_table == [0, 2, 3] and c.num_cached_tokens == 8
    one = make_seq(list(range(4)))  # a single full block: nothing is looked up
    bm.allocate(one)
    assert one.block_table == [4] and one.num_cached_tokens == 0


def test_decode_append_and_hash_on_full_block():
    bm = BlockManager(3, BS)
    a = make_seq([1, 2, 3, 4])
    bm.allocate(a)
    compute(bm, a)
    h0 = bm.blocks[0].hash
    for token, table in [(5, [0, 1]), (6, [0, 1]), (7, [0, 1]), (8, [0, 1]), (9, [0, 1, 2])]:
        a.append_token(token)  # the sampled token: its KV comes with the next decode step
        assert bm.can_append(a)
        bm.may_append(a)
        assert a.block_table == table
        a.num_scheduled_tokens = 1
        bm.hash_blocks(a)
        a.num_cached_tokens += 1
        a.num_scheduled_tokens = 0
    assert a.num_cached_tokens == 9 and a.num_tokens == 9
    assert bm.hash_to_block_id == {h0: 0, compute_hash([5, 6, 7, 8], h0): 1}
    a.append_token(10)
    assert bm.can_append(a)  # still room in block 2
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert not bm.can_allocate(b)
    for t in range(11, 14):
        a.append_token(t)
    assert a.num_tokens == 13 and not bm.can_append(a)  # token 13 needs a 4th block, none free
