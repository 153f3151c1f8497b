"""Fused SiLU-and-mul kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import activation
from tests.kernels.kernel_helpers import tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("intermediate", [1, 300, 1500])  # one lane, a masked tail, two blocks
def test_silu_and_mul_matches_reference(dtype, intermediate, device, poison_outputs):
    torch.manual_seed(0)
    x = (torch.randn(5, 2 * intermediate) * 4).to(dtype).to(device)
    out = activation.silu_and_mul(x)
    # silu rounded to the dtype, then the product rounded again: up to 2 ulps.
    expected = activation.silu_and_mul_reference(x)
    torch.testing.assert_close(out, expected, **tolerance(dtype, ulps=2))


def test_silu_and_mul_keeps_leading_axes(device, poison_outputs):
    x = torch.randn(2, 3, 64, device=device)
    out = activation.silu_and_mul(x)
    assert out.shape == (2, 3, 32)
    expected = activation.silu_and_mul_reference(x)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
