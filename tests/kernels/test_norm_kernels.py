"""RMSNorm kernel (plain, fused residual add, per-head) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import norm
from tests.kernels.kernel_helpers import tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 300, 1024])  # a power of 2, a masked tail, a wide row
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(dtype, hidden, with_residual, device, poison_outputs):
    torch.manual_seed(0)
    x = (torch.randn(7, hidden) * 3).to(dtype).to(device)
    weight = (torch.randn(hidden) * 0.1 + 1).to(dtype).to(device)
    residual = torch.randn(7, hidden).to(dtype).to(device) if with_residual else None
    out, new_residual = norm.rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = norm.rms_norm_reference(x, weight, 1e-5, residual)
    assert out.dtype == expected.dtype
    if with_residual:
        # The sum is rounded once (1 ulp). The norm is then checked on the kernel's own sum: a
        # 1-ulp difference in its input would otherwise add to the norm's own rounding.
        torch.testing.assert_close(new_residual, expected_residual, **tolerance(dtype))
        expected, _ = norm.rms_norm_reference(new_residual, weight, 1e-5)
    else:
        assert new_residual is None
    # Normalise, round to x's dtype, multiply by the weight, round again: up to 2 ulps.
    torch.testing.assert_close(out, expected, **tolerance(dtype, ulps=2))


def test_rms_norm_per_head_on_a_strided_view(device, poison_outputs):
    # Qwen3's q norm: (T, heads, D) sliced out of the fused qkv projection, rows not contiguous.
    torch.manual_seed(0)
    qkv = torch.randn(5, (4 + 2 + 2) * 32, dtype=torch.bfloat16, device=device)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    weight = torch.randn(32, dtype=torch.bfloat16, device=device)
    out, _ = norm.rms_norm(q, weight, 1e-6)
    expected, _ = norm.rms_norm_reference(q, weight, 1e-6)
    assert out.shape == (5, 4, 32)
    torch.testing.assert_close(out, expected, **tolerance(torch.bfloat16, ulps=2))


def test_rms_norm_promotes_like_the_reference(device, poison_outputs):
    # A float32 weight with bf16 activations gives a float32 result, as `weight * normed` does.
    x = torch.randn(3, 64, dtype=torch.bfloat16, device=device)
    weight = torch.randn(64, device=device)
    out, _ = norm.rms_norm(x, weight, 1e-6)
    expected, _ = norm.rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **tolerance(torch.bfloat16))


def test_rms_norm_rejects_a_mismatched_residual(device):
    x = torch.randn(3, 64, device=device)
    with pytest.raises(ValueError, match="residual"):
        norm.rms_norm(x, torch.ones(64, device=device), 1e-6, torch.randn(3, 32, device=device))
