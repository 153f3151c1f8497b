"""The paged KV cache's bookkeeping: which physical block holds which tokens of which request.

Only ids and counts live here; the KV tensors themselves are allocated by the model runner as
`num_blocks` blocks of `block_size` token slots per layer, and indexed with the block ids this
manager hands out.

Block table of one request (block_size = 4), and the prefix-cache hash chain:

    all_token_ids   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 t10 t11 | t12 t13
    logical block        0      |      1      |       2       |    3      (partial: no hash)
    block_ids          [ 7      ,      2      ,       9       ,    4 ]   physical ids
    block hash          h0 = H(root, t0..t3)
                                   h1 = H(h0, t4..t7)
                                                  h2 = H(h1, t8..t11)

A full block's hash covers its own tokens *and*, through its parent, every token before it,
so equal hashes mean equal prefixes: a new request whose first blocks hash to h0, h1 can use
physical blocks 7 and 2 as they are. H is SHA-256 over the parent digest and the token ids
(fixed-width little-endian), so it is the same in every process, unlike Python's salted
`hash()`, and a collision would need a SHA-256 collision.

Every usable block is in exactly one of three states:

    owned      ref_count > 0   in some request's block table (shared blocks count once per
                               holder)
    cached     ref_count == 0  holds a registered hash; reusable by a prefix hit until it is
                               evicted, least recently freed first
    free       ref_count == 0  no hash; handed out before any cached block is evicted

Block 0 is the null block: never handed out, never hashed. The runner may point padding
entries of block tables and slot mappings at it (CUDA graphs run at padded batch sizes), so
the writes of padded positions land somewhere harmless.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kiln.runtime.request import Request
from kiln.runtime.token_history import token_ids_between

NULL_BLOCK_ID = 0
# Parent digest of a request's first block.
_ROOT_HASH = b""


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of a full block's token ids chained with the hash of the block before it."""
    digest = hashlib.sha256(parent_hash)
    # Fixed width and byte order: the same tokens give the same bytes on every machine.
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass
class KVBlock:
    """One physical block of `block_size` token slots."""

    block_id: int
    # Number of requests whose block table holds this block.
    ref_count: int = 0
    # Chained hash of the block's tokens once it is full and registered for prefix reuse;
    # None while it is partial, unregistered, or after eviction.
    block_hash: bytes | None = None


class KVCacheManager:
    """Hands out KV blocks to requests, shares full blocks between equal prefixes, and evicts
    cached blocks in LRU order when fresh ones run out.

    The manager writes `request.block_ids`; everything else about the request (its tokens and
    `num_computed_tokens`) it only reads. Callers must `free` a request whenever it stops
    running (finish, abort, preemption): that is also when its per-request hashes are dropped.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block {NULL_BLOCK_ID} is the reserved null block), "
                f"got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # ref_count 0, no hash: used first.
        self._free_block_ids: deque[int] = deque(range(NULL_BLOCK_ID + 1, num_blocks))
        # ref_count 0 with a hash, oldest first: evicted from the front.
        self._evictable_block_ids: OrderedDict[int, None] = OrderedDict()
        # Registered hash -> the one physical block holding those tokens.
        self._cached_block_ids: dict[bytes, int] = {}
        # Per live request: chained hashes of its full blocks computed so far (a prefix of
        # its token blocks), and how many of its blocks cache_full_blocks has handled.
        self._block_hashes: dict[str, list[bytes]] = {}
        self._num_registered_blocks: dict[str, int] = {}

    # ---- accounting -------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        """All blocks but the null block."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now: free ones plus evictable cached ones."""
        return len(self._free_block_ids) + len(self._evictable_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered hash, whether some request owns them or not."""
        return len(self._cached_block_ids)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no request owns (counted in num_free_blocks too)."""
        return len(self._evictable_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks owned by requests, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold the KV of `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached full blocks at the start of the request's tokens, and
        the number of tokens they hold.

        Never covers every token: the last token must go through the model to give the
        logits the next token is sampled from. The blocks are not claimed yet; pass them to
        `allocate_slots` before anything else allocates, or they may be evicted.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._full_block_hashes(request, max_blocks)
        block_ids: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self._cached_block_ids.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed KV for prefix reuse.

        Call after a step has advanced `request.num_computed_tokens`: only KV that the model
        has written is shared. A block whose tokens another block already holds (two requests
        computed the same prefix in the same steps) stays unregistered and is freed normally.
        """
        if not self.enable_prefix_caching:
            return
        num_full_blocks = request.num_computed_tokens // self.block_size
        start = self._num_registered_blocks.get(request.request_id, 0)
        if num_full_blocks <= start:
            return
        hashes = self._full_block_hashes(request, num_full_blocks)
        for index in range(start, num_full_blocks):
            block = self._blocks[request.block_ids[index]]
            if block.block_hash is None and hashes[index] not in self._cached_block_ids:
                block.block_hash = hashes[index]
                self._cached_block_ids[hashes[index]] = block.block_id
        self._num_registered_blocks[request.request_id] = num_full_blocks

    def _full_block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The chained hashes of the request's first `num_blocks` blocks (all full),
        extending the per-request memo so each block is hashed once per residency."""
        hashes = self._block_hashes.setdefault(request.request_id, [])
        parent = hashes[-1] if hashes else _ROOT_HASH
        for index in range(len(hashes), num_blocks):
            start = index * self.block_size
            block_tokens = token_ids_between(
                request.prompt_token_ids, request.output_token_ids, start, start + self.block_size
            )
            parent = hash_block_tokens(parent, block_tokens)
            hashes.append(parent)
        return hashes

    # ---- allocation -------------------------------------------------------------------

    def num_free_blocks_taken(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> int:
        """How much `allocate_slots` with these arguments would lower num_free_blocks."""
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        num_held = len(request.block_ids) + len(computed_blocks)
        num_needed = max(0, self.num_blocks_for(num_tokens) - num_held)
        return num_needed + sum(1 for b in computed_blocks if b in self._evictable_block_ids)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[int] = (),
    ) -> bool:
        """Grow the request's block table to hold `num_new_tokens` more tokens, all or
        nothing.

        `computed_blocks` are prefix-cache hits from `get_computed_blocks`, adopted as the
        first blocks of a request that holds none yet; the tokens to hold are then
        request.num_computed_tokens + len(computed_blocks) * block_size + num_new_tokens.
        Returns False, changing nothing, when the free and evictable blocks do not suffice.
        """
        if not computed_blocks and (
            request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size
        ):
            return True  # the blocks held already fit them: most decode steps of a request
        if computed_blocks and (request.block_ids or request.num_computed_tokens):
            raise ValueError(
                f"request {request.request_id!r}: computed_blocks can only start an empty "
                f"block table, but it holds {len(request.block_ids)} blocks and "
                f"{request.num_computed_tokens} computed tokens"
            )
        # Hits that nobody owns sit in the evictable pool; claiming them shrinks it too.
        if self.num_free_blocks_taken(request, num_new_tokens, computed_blocks) > self.num_free_blocks:
            return False
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        num_needed = max(
            0, self.num_blocks_for(num_tokens) - len(request.block_ids) - len(computed_blocks)
        )

        # Claim the hits before taking fresh blocks, so the eviction below cannot take them.
        for block_id in computed_blocks:
            self._claim(block_id)
        request.block_ids.extend(computed_blocks)
        if computed_blocks:
            # Hit blocks are registered already; cache_full_blocks starts after them.
            self._num_registered_blocks[request.request_id] = len(computed_blocks)
        request.block_ids.extend(self._take_fresh_block() for _ in range(num_needed))
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks and per-request hashes; safe to call twice."""
        self._release(request, request.block_ids)
        request.block_ids = []
        self._block_hashes.pop(request.request_id, None)
        self._num_registered_blocks.pop(request.request_id, None)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Release the request's blocks past those that hold its first `num_tokens` tokens
        (the KV of rejected speculative tokens). Only uncomputed, so unhashed, slots are
        dropped: registered blocks hold computed tokens only."""
        num_kept = self.num_blocks_for(num_tokens)
        if num_kept >= len(request.block_ids):
            return
        self._release(request, request.block_ids[num_kept:])
        del request.block_ids[num_kept:]

    def _release(self, request: Request, block_ids: list[int]) -> None:
        # Tail blocks first: they are the least likely to be shared by another prompt, so
        # they should be the first cached blocks to be evicted.
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(
                    f"request {request.request_id!r} frees block {block_id} whose ref count is "
                    f"already {block.ref_count}"
                )
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free_block_ids.append(block_id)
                else:
                    self._evictable_block_ids[block_id] = None

    def _claim(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            # A prefix hit on a block nobody holds: it stops being evictable.
            del self._evictable_block_ids[block_id]
        block.ref_count += 1

    def _take_fresh_block(self) -> int:
        if self._free_block_ids:
            block_id = self._free_block_ids.popleft()
        else:
            block_id, _ = self._evictable_block_ids.popitem(last=False)
            evicted = self._blocks[block_id]
            assert evicted.block_hash is not None  # only hashed blocks are evictable
            del self._cached_block_ids[evicted.block_hash]
            evicted.block_hash = None
        self._blocks[block_id].ref_count = 1
        return block_id

    # ---- self-check -------------------------------------------------------------------

    def check_invariants(self, holders: Iterable[Request] | None = None) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent (for tests and debugging).

        Every usable block is exactly one of free, evictable-cached or owned; hashes and
        blocks map one to one; and, given every request holding blocks, each block's ref
        count equals the number of block tables it appears in.
        """
        problems: list[str] = []
        free = set(self._free_block_ids)
        evictable = set(self._evictable_block_ids)
        if len(free) != len(self._free_block_ids):
            problems.append("a block is on the free list twice")
        if free & evictable:
            problems.append(f"blocks both free and evictable: {sorted(free & evictable)}")
        null = self._blocks[NULL_BLOCK_ID]
        if NULL_BLOCK_ID in free | evictable or null.ref_count or null.block_hash:
            problems.append("the null block was handed out or hashed")
        for block in self._blocks[NULL_BLOCK_ID + 1 :]:
            if block.ref_count < 0:
                problems.append(f"block {block.block_id} has ref count {block.ref_count}")
            idle = block.block_id in free or block.block_id in evictable
            if idle == (block.ref_count > 0):
                problems.append(
                    f"block {block.block_id} has ref count {block.ref_count} but is "
                    f"{'idle' if idle else 'not idle'}"
                )
            if block.block_id in free and block.block_hash is not None:
                problems.append(f"free block {block.block_id} still has a hash")
            if block.block_id in evictable and block.block_hash is None:
                problems.append(f"evictable block {block.block_id} has no hash")
            if block.block_hash is not None and (
                self._cached_block_ids.get(block.block_hash) != block.block_id
            ):
                problems.append(f"block {block.block_id}'s hash is not registered to it")
        if len(self._cached_block_ids) != sum(b.block_hash is not None for b in self._blocks):
            problems.append("the hash map and the blocks' hashes disagree")
        if holders is not None:
            counts = [0] * self.num_blocks
            for request in holders:
                for block_id in request.block_ids:
                    counts[block_id] += 1
            for block in self._blocks:
                if counts[block.block_id] != block.ref_count:
                    problems.append(
                        f"block {block.block_id} is in {counts[block.block_id]} block tables "
                        f"but has ref count {block.ref_count}"
                    )
        if problems:
            raise RuntimeError("KV cache bookkeeping is inconsistent: " + "; ".join(problems))
