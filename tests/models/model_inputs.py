"""One sequence through a kiln model without the runtime: the flat inputs and attention
metadata of a step (prefill or decode) of a single request, and KV caches sized for a model's
own (per-rank) KV heads. For layer, quantisation and tensor-parallel tests."""

from __future__ import annotations

import torch

from kiln.layers.attention import Attention, AttentionMetadata


def step_inputs(
    token_ids: list[int], num_computed: int, block_ids: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids (T,), positions (T,), metadata) for `token_ids` after `num_computed`
    cached tokens of one sequence whose KV lives in blocks `block_ids`."""
    num_tokens = len(token_ids)
    seq_len = num_computed + num_tokens
    positions = torch.arange(num_computed, seq_len)  # (T,)
    blocks = torch.tensor(block_ids)
    slot_mapping = blocks[positions // block_size] * block_size + positions % block_size  # (T,)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=blocks.to(torch.int32).unsqueeze(0),  # (1, num_blocks)
        slot_mapping=slot_mapping,
        query_start_loc_host=[0, num_tokens],
        seq_lens_host=[seq_len],
        max_query_len=num_tokens,
        max_seq_len=seq_len,
    )
    return torch.tensor(token_ids), positions, metadata


def kv_caches_for(model: torch.nn.Module, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    """Zeroed (2, num_blocks, block_size, Hkv, D) caches, one per attention layer, with the
    KV heads this model (this rank) holds."""
    caches = []
    for module in model.modules():
        if isinstance(module, Attention):
            shape = (2, num_blocks, block_size, module.num_kv_heads, module.head_dim)
            caches.append(torch.zeros(shape))
    return caches


@torch.no_grad()
def prefill_then_decode(
    model: torch.nn.Module, prompt: list[int], next_token: int, block_size: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of a prompt's prefill (T, V) and of one decode step after it (1, V)."""
    block_ids = list(range(1, 1 + -(-(len(prompt) + 1) // block_size)))[::-1]  # out of order
    kv_caches = kv_caches_for(model, num_blocks=len(block_ids) + 1, block_size=block_size)
    ids, positions, metadata = step_inputs(prompt, 0, block_ids, block_size)
    prefill = model.compute_logits(model(ids, positions, kv_caches, metadata))
    ids, positions, metadata = step_inputs([next_token], len(prompt), block_ids, block_size)
    decode = model.compute_logits(model(ids, positions, kv_caches, metadata))
    return prefill, decode
