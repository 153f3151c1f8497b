"""Rotary embedding kernel, plain and fused with the KV-cache write, against the references."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import rope
from kiln.layers.rotary import RotaryEmbedding
from tests.kernels.kernel_helpers import make_paged_batch, tolerance


def _cos_sin(rotary_dim: int, device: str) -> torch.Tensor:
    return RotaryEmbedding(rotary_dim, 4096, 10000.0).cos_sin_cache.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
def test_rope_matches_reference_on_qkv_views(dtype, rotary_dim, device, poison_outputs):
    # q and k as the Llama layer has them: strided slices of the fused qkv projection.
    torch.manual_seed(0)
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 4, 2, 64
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(device)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 1, 7, 100, 4095, 3], device=device)
    cos_sin = _cos_sin(rotary_dim, device)
    q_out, k_out = rope.rope(positions, query, key, cos_sin)
    q_expected, k_expected = rope.rope_reference(positions, query, key, cos_sin)
    # Same fp32 formula on both sides; only the final rounding can differ.
    torch.testing.assert_close(q_out, q_expected, **tolerance(dtype))
    torch.testing.assert_close(k_out, k_expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_write_kv_cache_matches_reference(dtype, device, poison_outputs):
    # A prefix-reuse row, a fresh prompt, a decode row and two CUDA-graph padding rows (slot -1).
    batch = make_paged_batch([3, 5, 1], [4, 0, 9], 8, 2, 64, 8, dtype, device, num_padding_rows=2)
    cos_sin = _cos_sin(64, device)
    written = torch.full_like(batch.kv_cache, float("nan"))
    expected_cache = written.clone()
    q_out = rope.rope_and_write_kv_cache(batch.positions, batch.query, batch.key, batch.value,
                                         cos_sin, written, batch.slot_mapping)
    q_expected = rope.rope_and_write_kv_cache_reference(
        batch.positions, batch.query, batch.key, batch.value, cos_sin, expected_cache,
        batch.slot_mapping)
    torch.testing.assert_close(q_out, q_expected, **tolerance(dtype))
    assert torch.equal(written.isnan(), expected_cache.isnan()), "wrote exactly the mapped slots"
    torch.testing.assert_close(written.nan_to_num(), expected_cache.nan_to_num(),
                               **tolerance(dtype))
