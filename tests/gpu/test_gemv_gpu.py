"""Skinny GEMM (decode GEMV) kernels at Llama-3.1-8B shapes, on the GPU: against the fp32
torch references, with and without programmatic dependent launch, and replayed in CUDA graphs.
Importable everywhere; tests/gpu/conftest.py skips it where CUDA is absent.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import gemv
from tests.kernels.kernel_helpers import tolerance

# (N, K): q|k|v, o, gate|up, down, lm_head.
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
HIDDEN, INTERMEDIATE = 4096, 14336


def gpu_tolerance() -> dict:
    """bf16 output: one ulp of the final rounding (rtol 2^-7), plus the fp32 summation-order
    difference before it. With x ~ N(0,1) and weights ~ N(0, 1/K), Σ|x·w| ≈ 0.64·√K ≈ 77 at
    K = 14336; tree-shaped fp32 sums differ by ~log2(K)·2^-24·77 ≈ 6e-5, and tensor-core
    accumulation (M > 1) may truncate instead of round, up to ~K/16·2^-23·|y| ≈ 5e-4 for |y| of
    a few. atol 2e-3 covers that for outputs near zero, a quarter of a bf16 ulp at 1."""
    return {**tolerance(torch.bfloat16), "atol": 2e-3}


@pytest.fixture(autouse=True)
def exact_fp32_reference(monkeypatch):
    # The reference's fp32 matmul must not run in TF32 (10-bit mantissa products).
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def weights():
    """One random bf16 weight per shape, made once (the lm_head alone is 1 GB)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    cache = {}

    def get(n: int, k: int) -> torch.Tensor:
        if (n, k) not in cache:
            cache[(n, k)] = (torch.randn(n, k, device="cuda", generator=generator)
                             * k**-0.5).to(torch.bfloat16)
        return cache[(n, k)]

    return get


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_skinny_linear_real_shapes(shape, m, pdl, weights):
    weight = weights(*shape)
    x = _x(m, shape[1], seed=m)
    assert gemv.gemv_supported(x, weight)
    out = gemv.skinny_linear(x, weight, pdl=pdl)
    torch.testing.assert_close(out, gemv.skinny_linear_reference(x, weight), **gpu_tolerance())


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_skinny_gate_up_silu_real_shape(m, pdl, weights):
    weight = weights(2 * INTERMEDIATE, HIDDEN)
    x = _x(m, HIDDEN, seed=100 + m)
    out = gemv.skinny_gate_up_silu(x, weight, pdl=pdl)
    torch.testing.assert_close(out, gemv.skinny_gate_up_silu_reference(x, weight),
                               **gpu_tolerance())


def test_bias(weights):
    weight = weights(6144, 4096)
    bias = torch.randn(6144, device="cuda").to(torch.bfloat16)
    x = _x(1, 4096, seed=7)
    torch.testing.assert_close(gemv.skinny_linear(x, weight, bias, pdl=True),
                               gemv.skinny_linear_reference(x, weight, bias), **gpu_tolerance())


@pytest.mark.parametrize(
    "config",
    [
        gemv.GemvConfig(block_n=16, block_k=256, l2_prefetch_tiles=2),
        gemv.GemvConfig(block_n=4, block_k=512, num_warps=8, l2_prefetch_tiles=3),
        gemv.GemvConfig(block_n=32, block_k=128, num_warps=4, l2_prefetch_tiles=4),
    ],
    ids=str,
)
@pytest.mark.parametrize("m", [1, 8])
def test_l2_prefetch_configs(config, m, weights):
    """The L2 prefetch only changes timing: results match the reference, including the last
    programs of N = 128256 and the tail of K = 14336, where prefetches stop at the edge."""
    for n, k in [(128256, 4096), (4096, 14336)]:
        weight, x = weights(n, k), _x(m, k, seed=n)
        out = gemv.skinny_linear(x, weight, pdl=True, config=config)
        torch.testing.assert_close(out, gemv.skinny_linear_reference(x, weight),
                                   **gpu_tolerance())
    weight, x = weights(2 * INTERMEDIATE, HIDDEN), _x(m, HIDDEN, seed=3)
    out = gemv.skinny_gate_up_silu(x, weight, pdl=True, config=config)
    torch.testing.assert_close(out, gemv.skinny_gate_up_silu_reference(x, weight),
                               **gpu_tolerance())


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("m", [1, 8])
def test_chain_replays_in_a_cuda_graph(m, pdl, weights):
    """An MLP-like chain captured once and replayed twice with new inputs written into the
    same buffer equals eager runs bit for bit: under PDL every kernel still waits for the one
    before it (the kernels are deterministic, so any race would show as a difference)."""
    w_o, w_gate_up, w_down = (weights(HIDDEN, HIDDEN), weights(2 * INTERMEDIATE, HIDDEN),
                              weights(HIDDEN, INTERMEDIATE))
    x = _x(m, HIDDEN, seed=0)

    def chain():
        h = gemv.skinny_linear(x, w_o, pdl=pdl)
        a = gemv.skinny_gate_up_silu(h, w_gate_up, pdl=pdl)
        return gemv.skinny_linear(a, w_down, pdl=pdl) + x  # a torch kernel between chains

    chain()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for replay in range(2):
        x.copy_(_x(m, HIDDEN, seed=1 + replay))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain()), f"replay {replay} differs from eager"
