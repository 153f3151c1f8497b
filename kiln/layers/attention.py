"""The attention layer and the metadata it needs to find each sequence's KV in the cache.

The runner builds one `AttentionMetadata` per forward pass and the model passes it down
explicitly (no module-global context), so the same model runs any mix of prefill chunks and
decode tokens in one flat ragged batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.kernels import ops


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged KV cache."""

    # (num_seqs + 1,) int32: sequence s owns flat tokens [query_start_loc[s], query_start_loc[s+1]).
    query_start_loc: torch.Tensor
    # (num_seqs,) int32: tokens with KV after this step (cached context + this step's tokens).
    seq_lens: torch.Tensor
    # (num_seqs, max_blocks_per_seq) int32: physical KV block ids, in order.
    block_tables: torch.Tensor
    # (num_tokens,) int64: cache slot (block_id * block_size + offset) for each new token.
    slot_mapping: torch.Tensor
    # Host copies of query_start_loc and seq_lens for code that loops over sequences.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    # Longest query (1: a decode-only batch) and longest sequence in this batch. Inside a
    # captured CUDA graph these describe the capture batch, not later replays.
    max_query_len: int = 0
    max_seq_len: int = 0
    # A mixed step (decode tokens and prefill chunks) ordered decode-first by the runner:
    # sequences [0, num_decode_seqs) have one new token each, and
    # prefill_query_start_loc = query_start_loc[num_decode_seqs:] - num_decode_seqs lets the
    # rest run through the prefill kernel on their own. 0 / None: not split.
    num_decode_seqs: int = 0
    prefill_query_start_loc: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


class Attention(nn.Module):
    """Writes this step's K and V into the cache, then attends over each sequence's context."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        # The KV cache's quantisation scales (float32 scalars; 1.0 until calibrated): an FP8
        # cache stores k / k_scale and v / v_scale; the engine's manifest holds them
        # (kiln/runtime/kv_tensors.py apply_kv_scales) and the cache kernels read them.
        # Non-persistent and made on the CPU, like the RoPE tables: they survive
        # construction on the meta device, and engines without them load unchanged.
        for name in ("k_scale", "v_scale"):
            one = torch.ones((), dtype=torch.float32, device="cpu")
            self.register_buffer(name, one, persistent=False)
        # The keys' calibrated per-channel mean (after RoPE), which an FP8 cache subtracts
        # before quantising: softmax is unchanged when every key a query sees moves by the
        # same vector (q·(k - m) = q·k - q·m), and keys with a large constant channel then
        # spend E4M3's 3 mantissa bits on what varies. Zeros until calibrated.
        zeros = torch.zeros(num_kv_heads, head_dim, dtype=torch.float32, device="cpu")
        self.register_buffer("k_offset", zeros, persistent=False)

    def forward(
        self,
        query: torch.Tensor,  # (T, Hq * D)
        key: torch.Tensor,  # (T, Hkv * D)
        value: torch.Tensor,  # (T, Hkv * D)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
        metadata: AttentionMetadata,
        positions: torch.Tensor | None = None,  # (T,) int64, with rotary_emb
        rotary_emb: nn.Module | None = None,  # RotaryEmbedding: rotate q and k first
    ) -> torch.Tensor:  # (T, Hq * D)
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if rotary_emb is not None:
            # One kernel rotates q and k and writes k and v into the cache: at batch 1 a
            # decode step is ~350 small kernels, and each one saved is a few µs.
            query = ops.rope_and_write_kv_cache(
                positions, query, key, value, rotary_emb.cos_sin_cache, kv_cache,
                metadata.slot_mapping, self.k_scale, self.v_scale, self.k_offset,
            )
        else:
            ops.write_kv_cache(key, value, kv_cache, metadata.slot_mapping, self.k_scale,
                               self.v_scale, self.k_offset)
        out = ops.paged_attention(query, kv_cache, metadata, self.scale, self.sliding_window,
                                  self.k_scale, self.v_scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
