"""Paged latent-cache bookkeeping: which cache blocks each sequence owns, and the prefix cache.

The cache is a pool of fixed-size blocks (block_size token slots, each slot holding every layer's
latent + rotary key for one token). A sequence's block table lists its blocks in position order,
so token position p lives in slot block_table[p // block_size] * block_size + p % block_size.

Prefix caching (nano-vllm's scheme, SGLang/vLLM's idea): a *full* block is named by a chained
hash of its tokens and of every token before it, so equal hashes mean equal prefixes and hence
equal latents. A new sequence walks its prompt block by block and reuses every block whose hash is
known (ref counts make them shared). Full blocks are registered as soon as their content is fixed:
at admission for the blocks the prefill will fill (so the n samples of one prompt, admitted
together, share the prompt's blocks; the prefill writes them before any reader gathers them, layer
by layer, in the same forward) and after each decode step for blocks completed by generated tokens.

Freed blocks keep their hash and stay findable until reused: the free list is an LRU (blocks
without a hash, and the deepest blocks of a prefix, are recycled first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from nanoseek.inference.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set while the block is in the prefix cache
        self.token_ids: tuple[int, ...] = ()  # its content, checked on a hit as well


def chain_hash(prev: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 of a block's tokens and (through `prev`, the previous block's digest) of all before
    it. A cryptographic hash because the key names other requests' latents: Python's hash() can be
    collided on purpose, so one client could craft a prompt that reads another's cached prefix
    (vLLM moved to SHA-256 for that reason, CVE-2025-25183); a few microseconds per block."""
    digest = hashlib.sha256(prev or b"")
    digest.update(array("q", token_ids).tobytes())  # 8 bytes per id: no two token lists share bytes
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.hash_to_block: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ allocation

    def allocate(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Give a waiting sequence its block table for len(seq) + lookahead slots, reusing cached
        prefix blocks; sets seq.num_computed to the tokens they cover. Returns False, changing
        nothing, when there are not enough free blocks."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self.match_prefix(seq)
        new = self.blocks_needed(len(seq) + lookahead) - len(hits)
        reclaimed = sum(self.blocks[b].ref_count == 0 for b in hits)  # cached but free: also taken from the pool
        if new + reclaimed > len(self.free):
            return False
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(new)]
        seq.num_computed = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.prefix_hash = self.blocks[hits[-1]].hash if hits else None
        self.register_full_blocks(seq, len(seq))
        return True

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Whether the free blocks cover the slots a step needs: positions up to len(seq)-1+lookahead."""
        return self.blocks_needed(len(seq) + lookahead) - len(seq.block_table) <= len(self.free)

    def append(self, seq: Sequence, lookahead: int = 0) -> None:
        for _ in range(self.blocks_needed(len(seq) + lookahead) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def free_blocks(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finish, abort or preemption). Hashed blocks stay findable."""
        for b in reversed(seq.block_table):  # deepest first, so they are the first recycled
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
                if block.hash is None:  # nothing to reuse: recycle it before any cached block
                    self.free.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed_blocks = 0
        seq.prefix_hash = None

    def _take_free_block(self) -> int:
        b, _ = self.free.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None:  # evict it from the prefix cache
            if self.hash_to_block.get(block.hash) == b:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return b

    # ---------------------------------------------------------- prefix cache

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the cached full blocks that start seq. At least one token is always left
        to compute (the forward must produce the last position's logits)."""
        if not self.enable_prefix_caching:
            return []
        hits, h, bs = [], None, self.block_size
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, tokens)
            b = self.hash_to_block.get(h)
            if b is None or self.blocks[b].token_ids != tokens:
                break
            hits.append(b)
        return hits

    def register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Add the sequence's full blocks among its first num_tokens tokens to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, num_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            seq.prefix_hash = chain_hash(seq.prefix_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            if seq.prefix_hash not in self.hash_to_block and block.hash is None:
                block.hash, block.token_ids = seq.prefix_hash, tokens
                self.hash_to_block[block.hash] = block.block_id
            seq.num_hashed_blocks = i + 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a weight update the stored latents are stale)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()
