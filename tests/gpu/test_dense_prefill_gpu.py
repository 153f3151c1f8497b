"""The dense prefill route on the GPU (cuDNN through torch): ops.paged_attention sends long
prompt chunks to it, and its output equals the paged Triton kernel's at Llama-3-8B's head
shape, for fresh prompts, chunks after a cached prefix, several key pieces and several
sequences."""

from __future__ import annotations

import itertools

import pytest
import torch

from kiln.kernels import attention, dense_prefill, ops
from kiln.layers.attention import AttentionMetadata

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16


def make_metadata(q_lens, contexts):
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    blocks = [-(-n // BLOCK) for n in seq_lens]
    kv = torch.randn(2, 1 + sum(blocks), BLOCK, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 1
    for row, count in enumerate(blocks):
        table[row, :count] = torch.randperm(count, device="cuda", dtype=torch.int32) + start
        start += count
    starts = [0, *itertools.accumulate(q_lens)]
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=table, slot_mapping=torch.zeros(0, dtype=torch.int64, device="cuda"),
        query_start_loc_host=starts, seq_lens_host=seq_lens, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens))
    query = torch.randn(starts[-1], HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    return query, kv, metadata


@pytest.mark.parametrize("q_lens, contexts, piece", [
    ([2048], [0], 32768), ([1100], [3000], 32768), ([1100], [3000], 1024),
    ([3000], [0], 1024), ([1024, 1500], [700, 0], 32768),
])
def test_dense_route_equals_the_paged_kernel(q_lens, contexts, piece, monkeypatch):
    monkeypatch.setattr(dense_prefill, "KEY_PIECE", piece)
    torch.manual_seed(0)
    query, kv, metadata = make_metadata(q_lens, contexts)
    assert dense_prefill.use_dense_prefill(query, kv, q_lens, None)
    calls = []
    real = dense_prefill.dense_prefill_attention
    monkeypatch.setattr(dense_prefill, "dense_prefill_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = ops.paged_attention(query, kv, metadata, DIM**-0.5)
    assert calls, "a step of long chunks takes the dense route"
    paged = attention.paged_prefill_attention(query, kv, metadata.block_tables,
                                              metadata.query_start_loc, metadata.seq_lens,
                                              DIM**-0.5)
    error = (out.float() - paged.float()).abs().max().item()
    assert error < 2e-2, error
    assert out.isfinite().all()


@pytest.mark.parametrize("native_gqa", [False, True])
def test_grouped_and_repeated_heads_give_the_paged_output(native_gqa):
    """The route with the cache's 8 KV heads passed as they are (cuDNN's native GQA, when the
    probe finds it) and with them repeated to 32, each against the paged kernel."""
    torch.manual_seed(1)
    query, kv, metadata = make_metadata([1100], [3000])
    if native_gqa and not dense_prefill.cudnn_native_gqa(0, torch.bfloat16, DIM):
        # This torch/cuDNN refuses grouped heads: the probe said so, and the route repeats.
        native_gqa = None
    out = dense_prefill.dense_prefill_attention(
        query, kv, metadata.block_tables, metadata.query_start_loc_host,
        metadata.seq_lens_host, DIM**-0.5, native_gqa=native_gqa)
    paged = attention.paged_prefill_attention(query, kv, metadata.block_tables,
                                              metadata.query_start_loc, metadata.seq_lens,
                                              DIM**-0.5)
    error = (out.float() - paged.float()).abs().max().item()
    assert error < 2e-2, error


def test_short_chunks_sliding_windows_and_fp8_keep_the_paged_kernel():
    query, kv, _ = make_metadata([2048], [0])
    assert not dense_prefill.use_dense_prefill(query, kv, [2048, 1000], None)
    assert not dense_prefill.use_dense_prefill(query, kv, [2048], 4096)
    assert not dense_prefill.use_dense_prefill(query, kv.to(torch.float8_e4m3fn), [2048], None)
