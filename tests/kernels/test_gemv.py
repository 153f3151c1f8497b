"""Skinny GEMM (decode GEMV) kernels against their torch references.

Small shapes that still take every path: N = 37 leaves a masked tail in the last program,
K = 256 with BLOCK_K = 64 runs the prefetch loop four times, K = 128 with the default config
runs it zero times (one tile), K = 192 forces BLOCK_K down to 64. M = 1 takes the
multiply-and-sum path, M = 3 and 16 the padded tl.dot path.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import gemv
from tests.kernels.kernel_helpers import tolerance

DTYPES = [torch.bfloat16, torch.float16]
N_ODD = 37
SMALL = gemv.GemvConfig(block_n=16, block_k=64)  # 3 programs × 4 tiles at N=37, K=256


def gemv_tolerance(dtype: torch.dtype) -> dict:
    """Kernel and reference both sum in fp32 and round once, so the output differs by one ulp
    (the interpreter truncates where torch rounds: rtol = 1 ulp, see `tolerance`) plus the
    fp32 summation-order difference before rounding. For K = 256 products of N(0,1) inputs and
    N(0, 1/K) weights, Σ|x·w| ≈ 10, so reordering moves a sum by at most K·2^-24·10 ≈ 1.5e-4
    (typically ~1e-6): that is atol, and it only matters for outputs near zero."""
    return {**tolerance(dtype), "atol": 2e-4}


def _inputs(m: int, n: int, k: int, dtype, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype).to(device)
    weight = (torch.randn(n, k, generator=generator) * k**-0.5).to(dtype).to(device)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_reference(dtype, m, with_bias, device, poison_outputs):
    x, weight = _inputs(m, N_ODD, 256, dtype, device, seed=m)
    bias = torch.randn(N_ODD).to(dtype).to(device) if with_bias else None
    out = gemv.skinny_linear(x, weight, bias, config=SMALL)
    assert out.shape == (m, N_ODD) and out.dtype == dtype
    expected = gemv.skinny_linear_reference(x, weight, bias)
    torch.testing.assert_close(out, expected, **gemv_tolerance(dtype))


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k", [128, 192])
def test_skinny_linear_default_config(m, k, device, poison_outputs):
    x, weight = _inputs(m, 64, k, torch.bfloat16, device)
    out = gemv.skinny_linear(x, weight)
    torch.testing.assert_close(out, gemv.skinny_linear_reference(x, weight),
                               **gemv_tolerance(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_skinny_gate_up_silu_matches_reference(dtype, m, device, poison_outputs):
    x, weight = _inputs(m, 2 * N_ODD, 256, dtype, device, seed=10 + m)
    config = gemv.GemvConfig(block_n=8 if m == 1 else 16, block_k=64)
    out = gemv.skinny_gate_up_silu(x, weight, config=config)
    assert out.shape == (m, N_ODD)
    # silu(gate) * up in fp32, rounded once, on both sides: the same bound as the linear.
    expected = gemv.skinny_gate_up_silu_reference(x, weight)
    torch.testing.assert_close(out, expected, **gemv_tolerance(dtype))


def test_pdl_flag_is_a_no_op_off_the_gpu(device):
    """Under the interpreter (and before sm_90) pdl launches an ordinary kernel: same bits."""
    x, weight = _inputs(1, N_ODD, 256, torch.bfloat16, device)
    plain = gemv.skinny_linear(x, weight, config=SMALL)
    assert torch.equal(gemv.skinny_linear(x, weight, pdl=True, config=SMALL), plain)
    prefetching = gemv.GemvConfig(block_n=16, block_k=64, l2_prefetch_tiles=2)
    assert torch.equal(gemv.skinny_linear(x, weight, pdl=True, config=prefetching), plain)


def test_no_rows(device):
    x, weight = _inputs(1, N_ODD, 128, torch.bfloat16, device)
    assert gemv.skinny_linear(x[:0], weight).shape == (0, N_ODD)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, w: (x.expand(17, -1).contiguous(), w), "at most 16"),
        (lambda x, w: (x[:, :100], w[:, :100]), "multiple of 64"),
        (lambda x, w: (x.float(), w.float()), "bfloat16 or float16"),
        (lambda x, w: (x, w.half()), "bfloat16 or float16"),
        (lambda x, w: (x, w.T.contiguous().T), "contiguous"),
        (lambda x, w: (x[:, :64], w), "K=64 but weight has K=128"),
    ],
)
def test_unsupported_inputs_fall_back(make, message, device):
    x, weight = _inputs(1, 128, 128, torch.bfloat16, device)
    x, weight = make(x, weight)
    assert not gemv.gemv_supported(x, weight)
    with pytest.raises(ValueError, match=message):
        gemv.skinny_linear(x, weight)


def test_bad_bias_and_odd_gate_up_are_refused(device):
    x, weight = _inputs(1, N_ODD, 128, torch.bfloat16, device)
    assert gemv.gemv_supported(x, weight)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \(37,\)"):
        gemv.skinny_linear(x, weight, torch.zeros(36, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="even number of rows"):
        gemv.skinny_gate_up_silu(x, weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_core_rows_do_not_depend_on_the_row_count(dtype, device):
    """Batch-invariant mode's contract (ops.linear under KILN_BATCH_INVARIANT=1): with one
    config, a row's output is the same bits alone (M = 1, tensor_cores) and among 2..16 rows,
    and it is the reference's within the usual tolerance."""
    x, weight = _inputs(16, N_ODD, 256, dtype, device)
    alone = torch.cat([gemv.skinny_linear(x[i : i + 1], weight, config=SMALL, tensor_cores=True)
                       for i in range(16)])
    for m in (2, 5, 16):
        together = gemv.skinny_linear(x[:m], weight, config=SMALL, tensor_cores=True)
        assert torch.equal(together, alone[:m]), m
    torch.testing.assert_close(alone, gemv.skinny_linear_reference(x, weight),
                               **gemv_tolerance(dtype))
