"""Attention over the paged KV cache: the cache write and the attention itself.

KV cache layout of one layer (one tensor, allocated by the model runner):

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)
               │  │           │
               │  │           └ token slot inside the block
               │  └ physical block id (a request's block table lists its blocks in order)
               └ 0 = keys, 1 = values

    slot = block_id * block_size + offset   (slot_mapping gives one per new token)

The torch reference below loops over sequences; it is the oracle for the fast kernels.
"""

from __future__ import annotations

import torch


def write_kv_cache_reference(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding token, not written
) -> None:
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])  # (2, slots, Hkv, D)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat[0, slots] = key[valid].to(kv_cache.dtype)
    flat[1, slots] = value[valid].to(kv_cache.dtype)


def paged_attention_reference(
    query: torch.Tensor,  # (T, Hq, D) all scheduled tokens of all sequences, concatenated
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), already holding this step's KV
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    query_start_loc: list[int],  # S+1 offsets into the T axis
    seq_lens: list[int],  # S: tokens with KV (cached + this step's) per sequence
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Causal attention of each sequence's new tokens over its whole cached context.

    A sequence's queries are its last `q_len` positions; query i (absolute position
    `seq_len - q_len + i`) sees keys at positions p with p <= its own and, with a sliding
    window W, p > own - W (the Hugging Face convention: W keys including itself).
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for seq, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[seq], query_start_loc[seq + 1]
        q_len = end - start
        if q_len == 0:
            continue
        num_seq_blocks = -(-seq_len // block_size)
        blocks = block_tables[seq, :num_seq_blocks].long()
        kv = kv_cache[:, blocks].reshape(2, num_seq_blocks * block_size, num_kv_heads, head_dim)
        k = kv[0, :seq_len].float().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = kv[1, :seq_len].float().repeat_interleave(group, dim=1)  # (L, Hq, D)
        q = query[start:end].float()  # (q_len, Hq, D)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # (Hq, q_len, L)
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)  # (q_len, 1)
        k_pos = torch.arange(seq_len).unsqueeze(0)  # (1, L)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
