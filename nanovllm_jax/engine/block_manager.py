"""Paged KV-cache bookkeeping with prefix caching: block ids, reference counts and block hashes.

A full block is identified by a chained xxh64 hash (the previous block's hash, then the block's
token ids as int32 bytes), so a hit on block i implies the whole prefix up to block i matches.
Freed blocks keep their hash and stay hittable until the free list hands them out again; the free
list reuses the least recently freed block first, and `deallocate` frees a sequence's blocks
tail-first so that shared prefixes outlive their suffixes.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import xxhash

from nanovllm_jax.engine.sequence import Sequence


def compute_hash(token_ids: list[int], prefix: int = -1) -> int:
    h = xxhash.xxh64()
    if prefix != -1:
        h.update(prefix.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype="<i4").tobytes())
    return h.intdigest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1  # -1: not registered (not full, or its KV not computed yet)
    token_ids: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # An ordered set: O(1) pop of the least recently freed block and O(1) removal on a hit.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _allocate_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # evicted: its old content is gone
        block.ref_count, block.hash, block.token_ids = 1, -1, []
        self.used_block_ids.add(block_id)
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`, never including its last block."""
        # NOTE: the last block is never looked up, so every (re)admitted sequence computes at least
        # one token and gets logits, even when its whole token list is a cached multiple of a block.
        # Only full blocks whose KV is computed are in `hash_to_block_id` (see `hash_blocks`), so a
        # hit never reads a block that is still pending computation, not even one allocated in the
        # same step or a chunk of a sequence being prefilled over several steps.
        block_ids, h = [], -1
        for i in range(seq.num_blocks - 1):
            token_ids = seq.block(i)
            h = compute_hash(token_ids, h)
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                break  # a hash hit counts only with equal token ids (guards against collisions)
            block_ids.append(block_id)
        return block_ids

    def can_allocate(self, seq: Sequence) -> bool:
        cached = self._cached_prefix(seq)
        # A hit on a free block still takes that block out of the free list.
        num_shared = sum(block_id in self.used_block_ids for block_id in cached)
        return self.num_free_blocks >= seq.num_blocks - num_shared

    def allocate(self, seq: Sequence):
        """Give `seq` its block table for all its tokens; the cached prefix is shared, not computed."""
        assert not seq.block_table
        cached = self._cached_prefix(seq)
        for block_id in cached:  # take every hit before allocating, so none of them gets evicted
            block = self.blocks[block_id]
            if block_id in self.used_block_ids:
                block.ref_count += 1
            else:
                del self.free_block_ids[block_id]
                self.used_block_ids.add(block_id)
                block.ref_count = 1
            seq.block_table.append(block_id)
        for _ in range(len(cached), seq.num_blocks):
            seq.block_table.append(self._allocate_block())
        seq.num_cached_tokens = len(cached) * self.block_size
        seq.admission += 1  # a new block table: the device's copy of the old one is stale

    def deallocate(self, seq: Sequence):
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.used_block_ids.remove(block_id)
                self.free_block_ids[block_id] = None
        seq.num_cached_tokens = 0
        seq.block_table = []

    def blocks_to_cover(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs for the KV of its first `num_tokens` tokens."""
        return max(-(-num_tokens // self.block_size) - len(seq.block_table), 0)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step of `seq` (the KV of its last token) can get its block."""
        return self.num_free_blocks >= self.blocks_to_cover(seq, seq.num_tokens)

    def cover(self, seq: Sequence, num_tokens: int):
        """Before decode steps: extend the block table over the KV of the first `num_tokens` tokens."""
        # NOTE: a sequence only ever writes KV into its own blocks: shared blocks are full prefix
        # blocks, and decode steps write past the last token, whose block is never shared.
        for _ in range(self.blocks_to_cover(seq, num_tokens)):
            seq.block_table.append(self._allocate_block())

    def may_append(self, seq: Sequence):
        self.cover(seq, seq.num_tokens)

    def hash_blocks(self, seq: Sequence):
        """After a step, before `num_cached_tokens` advances: register the blocks it made full."""
        start = seq.num_cached_tokens // self.block_size
        end = (seq.num_cached_tokens + seq.num_scheduled_tokens) // self.block_size
        h = self.blocks[seq.block_table[start - 1]].hash if start > 0 else -1
        assert start == 0 or h != -1, "a computed full block must be registered"
        for i in range(start, end):
            block = self.blocks[seq.block_table[i]]
            token_ids = seq.block(i)
            h = compute_hash(token_ids, h)
            block.hash, block.token_ids = h, token_ids
            self.hash_to_block_id[h] = block.block_id
