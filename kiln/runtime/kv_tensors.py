"""Allocation of the per-layer paged KV tensors (layout: see kiln/kernels/attention.py).

The tensors are allocated uninitialised: a GPU's 50+ GB of KV cache is never memset at start.
That is safe because attention reads only positions below a sequence's length, and every such
position was written (this step or an earlier one) before it is read; masked loads never see
the rest. The one exception is the reserved null block 0: padding rows of a CUDA-graph batch
attend over its first slot, so it is zeroed to keep their (discarded) outputs finite.
"""

from __future__ import annotations

import torch

from kiln.models.config import ModelConfig

NULL_BLOCK = 0


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    caches = []
    for _ in range(config.num_layers):
        cache = torch.empty(shape, dtype=dtype, device=device)  # (2, blocks, bs, Hkv, D)
        cache[:, NULL_BLOCK].zero_()
        caches.append(cache)
    return caches


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element
