"""The KV block manager: hash chaining, ref counts, LRU eviction, exact accounting."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import event, given, settings, target
from hypothesis import strategies as st

from kiln.runtime.kv_cache import NULL_BLOCK_ID, KVCacheManager, hash_block_tokens
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.token_history import token_ids_between

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=8))


def compute(manager: KVCacheManager, request: Request, num_new_tokens: int | None = None) -> None:
    """What one scheduled step does to a request: claim hits, allocate, 'run', register."""
    if num_new_tokens is None:
        blocks, num_cached = manager.get_computed_blocks(request)
        num_new_tokens = request.num_tokens - num_cached
        assert manager.allocate_slots(request, num_new_tokens, blocks)
        request.num_computed_tokens = num_cached
    else:
        assert manager.allocate_slots(request, num_new_tokens)
    request.num_computed_tokens += num_new_tokens
    manager.cache_full_blocks(request)
    manager.check_invariants()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=6),
    st.lists(st.integers(0, 9), max_size=6),
    st.data(),
)
def test_token_ids_between_is_a_slice_of_all_token_ids(prompt, output, data):
    request = make_request("r", prompt)
    request.output_token_ids = list(output)
    end = data.draw(st.integers(0, request.num_tokens))
    start = data.draw(st.integers(0, end))
    assert token_ids_between(request.prompt_token_ids, request.output_token_ids, start, end) == request.all_token_ids[start:end]


# ---- hashing ----------------------------------------------------------------------------


def test_block_hash_is_sha256_of_parent_and_fixed_width_tokens():
    # Stable across processes and machines (unlike hash()): the exact bytes are specified.
    expected = hashlib.sha256(b"parent" + struct.pack("<3q", 1, 2, 3)).digest()
    assert hash_block_tokens(b"parent", [1, 2, 3]) == expected


def test_hash_chain_depends_on_the_whole_prefix():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(manager, first)
    assert manager.num_cached_blocks == 2

    # Same second block, different first block: the chain makes the second a miss too.
    other_prefix = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.get_computed_blocks(other_prefix) == ([], 0)

    # Same first block, different second block: only the first is a hit.
    diverging = make_request("c", [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert manager.get_computed_blocks(diverging) == (first.block_ids[:1], 4)

    same = make_request("d", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert manager.get_computed_blocks(same) == (first.block_ids[:2], 8)


def test_prefix_hit_never_covers_the_whole_prompt():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    compute(manager, make_request("a", list(range(8))))
    assert manager.num_cached_blocks == 2
    # Both blocks of this prompt are cached, but its last token must still be computed to
    # give logits, so only the first block is reused.
    again = make_request("b", list(range(8)))
    blocks, num_cached = manager.get_computed_blocks(again)
    assert num_cached == 4 and len(blocks) == 1
    compute(manager, again)
    assert again.num_computed_tokens == 8


def test_partial_blocks_are_not_cached():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(7)))
    compute(manager, request)
    assert manager.num_cached_blocks == 1
    request.output_token_ids.append(99)
    compute(manager, request, 1)  # fills block 1
    assert manager.num_cached_blocks == 2


def test_only_computed_tokens_are_registered():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(12)))
    assert manager.allocate_slots(request, 12)
    request.num_computed_tokens = 5  # a chunk: the KV of block 1 is not written yet
    manager.cache_full_blocks(request)
    assert manager.num_cached_blocks == 1
    request.num_computed_tokens = 12
    manager.cache_full_blocks(request)
    assert manager.num_cached_blocks == 3


def test_same_prefix_computed_twice_registers_one_block():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    a, b = make_request("a", list(range(6))), make_request("b", list(range(6)))
    # Both miss (scheduled in the same step), so both compute block 0 into their own blocks.
    for request in (a, b):
        assert manager.allocate_slots(request, 6)
    for request in (a, b):
        request.num_computed_tokens = 6
        manager.cache_full_blocks(request)
    manager.check_invariants([a, b])
    assert manager.num_cached_blocks == 1
    manager.free(b)  # b's copy of block 0 was never registered: plain free
    assert manager.num_evictable_blocks == 0
    manager.free(a)
    assert manager.num_evictable_blocks == 1
    manager.check_invariants([])


def test_prefix_caching_disabled():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    compute(manager, make_request("a", list(range(9))))
    assert manager.num_cached_blocks == 0
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


# ---- ref counts and accounting ----------------------------------------------------------


def test_shared_blocks_are_ref_counted():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(10)))
    compute(manager, a)
    b = make_request("b", list(range(10)))
    compute(manager, b)
    assert b.block_ids[:2] == a.block_ids[:2]  # two full blocks shared
    assert b.block_ids[2] != a.block_ids[2]  # partial tails never are
    assert [manager.ref_count(i) for i in a.block_ids] == [2, 2, 1]
    manager.check_invariants([a, b])
    assert manager.num_free_blocks == 15 - 4

    manager.free(a)
    assert [manager.ref_count(i) for i in b.block_ids] == [1, 1, 1]
    assert a.block_ids == []
    manager.free(b)
    manager.free(b)  # twice is harmless
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_usable_blocks == 15
    assert manager.num_cached_blocks == manager.num_evictable_blocks == 2


def test_accounting_and_usage():
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    assert manager.num_usable_blocks == 10
    assert (manager.num_free_blocks, manager.usage) == (10, 0.0)
    request = make_request("a", list(range(14)))  # 4 blocks, 3 of them full
    compute(manager, request)
    assert manager.num_free_blocks == 6
    assert manager.usage == pytest.approx(0.4)
    assert (manager.num_cached_blocks, manager.num_evictable_blocks) == (3, 0)
    manager.free(request)
    # Cached blocks are reusable, so they count as free: usage is back to 0.
    assert (manager.num_free_blocks, manager.usage) == (10, 0.0)
    assert (manager.num_cached_blocks, manager.num_evictable_blocks) == (3, 3)


def test_null_block_is_never_handed_out():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(16)))
    assert manager.allocate_slots(request, 16)
    assert NULL_BLOCK_ID not in request.block_ids
    assert sorted(request.block_ids) == [1, 2, 3, 4]


def test_allocation_is_all_or_nothing():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(8)))
    assert manager.allocate_slots(a, 8)
    b = make_request("b", list(range(100, 109)))  # needs 3 blocks, 2 are left
    assert not manager.allocate_slots(b, 9)
    assert b.block_ids == [] and manager.num_free_blocks == 2
    manager.check_invariants([a, b])
    assert manager.allocate_slots(b, 8)
    assert manager.num_free_blocks == 0


def test_allocation_counts_claimed_hits_against_the_free_pool():
    # 4 usable blocks; 2 cached from a finished request. A new request reusing both and
    # needing 2 more fits exactly; one needing 3 more must fail even though
    # num_free_blocks (4) >= 3, because 2 of those 4 are the hits themselves.
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    compute(manager, first)
    manager.free(first)
    too_big = make_request("b", list(range(8)) + [50] * 12)  # 20 tokens = 5 blocks
    blocks, num_cached = manager.get_computed_blocks(too_big)
    assert num_cached == 8
    assert not manager.allocate_slots(too_big, too_big.num_tokens - num_cached, blocks)
    manager.check_invariants([too_big])
    fits = make_request("c", list(range(8)) + [50] * 8)  # 16 tokens = 4 blocks
    blocks, num_cached = manager.get_computed_blocks(fits)
    assert manager.allocate_slots(fits, fits.num_tokens - num_cached, blocks)
    assert fits.block_ids[:2] == blocks
    manager.check_invariants([fits])


def test_hits_only_start_an_empty_block_table():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(8)))
    assert manager.allocate_slots(request, 4)
    with pytest.raises(ValueError, match="empty block table"):
        manager.allocate_slots(request, 4, [3])


# ---- eviction -----------------------------------------------------------------------------


def test_free_blocks_are_used_before_cached_ones_are_evicted():
    manager = KVCacheManager(num_blocks=9, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(8)))
    compute(manager, a)
    manager.free(a)
    b = make_request("b", list(range(100, 124)))  # 6 blocks: exactly the free ones
    assert manager.allocate_slots(b, 24)
    assert manager.num_cached_blocks == 2  # nothing evicted yet
    c = make_request("c", [7])
    assert manager.allocate_slots(c, 1)
    assert manager.num_cached_blocks == 1


def test_eviction_is_least_recently_freed_first_tail_first():
    manager = KVCacheManager(num_blocks=7, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(8)) + [0])  # 2 full blocks cached + a partial one
    compute(manager, a)
    a_full = a.block_ids[:2]
    manager.free(a)
    b = make_request("b", list(range(100, 108)) + [0])
    compute(manager, b)  # 3 blocks, all from the free list: nothing evicted
    b_full = b.block_ids[:2]
    manager.free(b)
    assert (manager.num_evictable_blocks, manager.num_cached_blocks) == (4, 4)
    # The 2 partial tails went back to the free list; they go first.
    drain = make_request("drain", [1] * 8)
    assert manager.allocate_slots(drain, 8)
    assert manager.num_cached_blocks == 4
    # Then eviction in the order freed: a's tail full block, a's head, b's tail, b's head.
    for expected in [a_full[1], a_full[0], b_full[1], b_full[0]]:
        fresh = make_request(f"fresh{expected}", [1])
        assert manager.allocate_slots(fresh, 1)
        assert fresh.block_ids == [expected]
    assert manager.num_cached_blocks == 0
    manager.check_invariants()


def test_a_hit_refreshes_recency():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    a = make_request("a", [1, 1, 1, 1, 0])
    compute(manager, a)
    b = make_request("b", [2, 2, 2, 2, 0])
    compute(manager, b)
    a_block, b_block = a.block_ids[0], b.block_ids[0]
    manager.free(a)
    manager.free(b)
    # Reusing a's block makes it the most recently freed once released again.
    again = make_request("c", [1, 1, 1, 1, 5])
    compute(manager, again)
    assert again.block_ids[0] == a_block
    manager.free(again)
    evict = make_request("d", list(range(300, 316)))  # 4 blocks: all usable ones
    assert manager.allocate_slots(evict, 16)
    assert evict.block_ids[-2:] == [b_block, a_block]
    assert manager.num_cached_blocks == 0


def test_bad_sizes_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="num_blocks must be >= 2.*got 1"):
        KVCacheManager(num_blocks=1, block_size=4)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        KVCacheManager(num_blocks=4, block_size=0)


# ---- property: random allocate / compute / free -------------------------------------------

# Prompts are built from a few shared prefixes so that hits, sharing and eviction all happen.
PREFIXES = [[1] * 4, [1] * 8, [1] * 4 + [2] * 4, [3] * 8]

operations = st.lists(
    st.tuples(
        st.sampled_from(["start", "start", "grow", "free"]),
        st.integers(0, 3),  # request slot
        st.integers(0, len(PREFIXES) - 1),
        st.integers(1, 8),  # suffix length / tokens to grow
    ),
    min_size=5,
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.integers(5, 10))
def test_random_allocate_compute_free_keeps_the_books(ops, num_blocks):
    manager = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK_SIZE)
    live: dict[int, Request] = {}
    num_evictions = 0
    for step, (op, slot, prefix, length) in enumerate(ops):
        request = live.get(slot)
        num_cached_before = manager.num_cached_blocks
        if op == "start" and request is None:
            # A suffix of its own: full suffix blocks are new to the cache, so it fills up.
            request = make_request(str(slot), PREFIXES[prefix] + [100 + step] * (2 * length))
            blocks, num_cached = manager.get_computed_blocks(request)
            assert num_cached < request.num_tokens
            if num_cached:
                event("prefix hit")
            if manager.allocate_slots(request, request.num_tokens - num_cached, blocks):
                request.num_computed_tokens = request.num_tokens
                manager.cache_full_blocks(request)
                live[slot] = request
            else:
                assert request.block_ids == []
        elif op == "grow" and request is not None:
            free_before = manager.num_free_blocks
            request.output_token_ids.extend([200 + step] * length)
            if manager.allocate_slots(request, length):
                request.num_computed_tokens += length
                manager.cache_full_blocks(request)
            else:
                assert manager.num_free_blocks == free_before
                del request.output_token_ids[-length:]
        elif op == "free" and request is not None:
            manager.free(request)
            del live[slot]
        if manager.num_cached_blocks < num_cached_before:
            event("eviction")  # pytest --hypothesis-show-statistics
            num_evictions += 1
        manager.check_invariants(live.values())
        for request in live.values():
            assert len(request.block_ids) * BLOCK_SIZE >= request.num_computed_tokens
        assert 0.0 <= manager.usage <= 1.0
    # Steer generation towards the rarer eviction path.
    target(float(num_evictions), label="evictions")
    for request in live.values():
        manager.free(request)
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_usable_blocks
