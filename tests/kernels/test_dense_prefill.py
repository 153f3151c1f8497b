"""The dense prefill route's gathering, key pieces and log-sum-exp merge, on the CPU with the
float64 stand-in for cuDNN's call: equal to the paged reference for fresh prompts, chunks
after a cached prefix, prefixes and chunks longer than one key piece, and several
sequences, with the KV heads repeated or left grouped (cuDNN's native GQA). The cuDNN call
itself is checked in tests/gpu/test_prefill_graphs_gpu.py and test_dense_prefill_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import dense_prefill
from kiln.kernels.attention import paged_attention_reference

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def make_case(q_lens: list[int], contexts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    blocks = [-(-n // BLOCK) for n in seq_lens]
    kv_cache = torch.randn(2, 1 + sum(blocks), BLOCK, KV_HEADS, DIM, generator=generator)
    table = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32)
    start = 1
    for row, count in enumerate(blocks):  # shuffled blocks: the gather must follow the table
        table[row, :count] = torch.randperm(count, generator=generator).to(torch.int32) + start
        start += count
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], HEADS, DIM, generator=generator)
    return query, kv_cache, table, starts, seq_lens


@pytest.mark.parametrize("q_lens, contexts, piece", [
    ([12], [0], 64),  # a fresh prompt: the causal square alone
    ([9], [14], 64),  # a chunk after a cached prefix (not block-aligned)
    ([9], [14], 4),  # prefix and chunk in several key pieces
    ([13], [0], 5),  # a fresh prompt longer than a piece: rows in pieces
    ([7, 10, 5], [3, 0, 21], 6),  # several sequences
])
@pytest.mark.parametrize("native_gqa", [False, True])  # KV heads repeated, or as cached
def test_dense_route_equals_the_paged_reference(q_lens, contexts, piece, native_gqa, monkeypatch):
    monkeypatch.setattr(dense_prefill, "KEY_PIECE", piece)
    query, kv_cache, table, starts, seq_lens = make_case(q_lens, contexts)
    expected = paged_attention_reference(query, kv_cache, table, starts, seq_lens, 0.3)
    out = dense_prefill.dense_prefill_attention(
        query, kv_cache, table, starts, seq_lens, 0.3,
        attend=dense_prefill.attend_with_lse_reference, native_gqa=native_gqa)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gather_repeats_heads_only_when_asked():
    query, kv_cache, table, starts, seq_lens = make_case([9], [14])
    keys, values = dense_prefill.gather_keys_values(kv_cache, table[0], 3, 20, KV_HEADS)
    repeated, _ = dense_prefill.gather_keys_values(kv_cache, table[0], 3, 20, HEADS)
    assert keys.shape == (1, KV_HEADS, 17, DIM) and repeated.shape == (1, HEADS, 17, DIM)
    torch.testing.assert_close(repeated, keys.repeat_interleave(HEADS // KV_HEADS, dim=1),
                               rtol=0, atol=0)


def test_merge_of_one_part_is_that_part():
    out, lse = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    assert dense_prefill.merge([(out, lse)]) is out


def test_the_route_applies_only_to_long_chunks_on_cuda():
    query = torch.randn(2048, HEADS, DIM, dtype=torch.bfloat16)
    cache = torch.zeros(2, 2, BLOCK, KV_HEADS, DIM, dtype=torch.bfloat16)
    assert not dense_prefill.use_dense_prefill(query, cache, [2048], None)  # the CPU: never
