"""The swap-AB skinny FP8 GEMM (kiln/kernels/skinny_fp8.py) against `fp8_linear_reference`
(the CPU interpreter here, small shapes; the same tests run on a GPU).

Tolerance. Most tests build activations the quantiser maps to E4M3 exactly: each row is E4M3
values times 2^e and holds ±448·2^e, so the dynamic scale amax/448 is exactly 2^e (static:
the scale is 2^e), and kernel and reference quantise to identical x_q. What is left:
  * products of two E4M3 values (4 significant bits each) are exact in fp32, but their sums
    are rounded in a different order (tiles, tl.dot's internal order, split-K partials):
    each side is within (K-1)·2^-24 of Σ|products| (scaled), so the two within
    (2K + 8)·2^-24·Σ|x_q|·|w_q|·x_scale·w_scale (the 8: the scalings and the bias add);
  * the final rounding to x's dtype: the interpreter truncates fp32 → bf16 where torch rounds
    to nearest, so they may differ by one unit in the last place: 2^-7 of the value for bf16;
    we allow two ulps (rtol 2^-6), as a value near a rounding boundary can also move by the
    accumulation term above.
On the GPU the tensor cores add up to 128 products (PROMOTION_INTERVAL) in an accumulator
with fewer mantissa bits (about 14, DeepSeek-V3 §3.3.2) before the fp32 add: a further
2^-9·Σ|products| is allowed there (an allowance for a few such roundings, not a bound).
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.quant_linear import FP8_DTYPE, fp8_linear_reference
from kiln.kernels import skinny_fp8
from kiln.kernels.skinny_fp8 import (
    SkinnyFp8Config,
    default_skinny_fp8_config,
    skinny_fp8_linear,
    split_k_counters,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# Small tiles so the interpreter's grids stay small; num_stages only matters on the GPU.
SMALL = SkinnyFp8Config(block_n=64, block_k=128, tokens=16, num_stages=2)
# (N, K, bias): N = 80 leaves a partial 64-row block; K = 384 is 3 tiles (not a power of 2),
# K = 512 is 4 tiles, which split_k = 3 divides unevenly (1, 1, 2).
SHAPES = [(80, 512, True), (128, 384, False)]
SPLITS = [(1, "reduce"), (3, "reduce"), (2, "atomic"), (3, "serial")]


def _weights(n: int, k: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) * 0.05
    scale = w.abs().amax(dim=1) / 448.0  # per output row, as kiln/quant/quantize.py
    q = (w / scale[:, None]).clamp(-448, 448).to(FP8_DTYPE)
    bias = torch.randn(n, generator=generator) * 0.1
    return q.to(device), scale.to(device), bias.to(device)


def _exact_activations(m: int, k: int, static: bool, dtype, device: str, seed: int = 1):
    """x whose per-token (or static 2^-3) quantisation is exact; row 1 is zeros when M > 2
    (its scale clamps, its x_q is 0)."""
    generator = torch.Generator().manual_seed(seed)
    q = (torch.randn(m, k, generator=generator) * 48).clamp(-448, 448).to(FP8_DTYPE).float()
    if static:
        exponent = torch.full((m, 1), -3.0)
    else:
        q[:, 0] = 448.0 * torch.sign(torch.randn(m, generator=generator))  # the row's amax
        exponent = torch.randint(-6, 2, (m, 1), generator=generator).float()
    x = q * torch.exp2(exponent)
    if m > 2:
        x[1] = 0
    input_scale = torch.tensor([2.0**-3], device=device) if static else None
    return x.to(dtype).to(device), input_scale


def _assert_matches(out, x, weight, scale, input_scale, bias):
    expected = fp8_linear_reference(x, weight, scale, input_scale, bias)
    x_scale = (x.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12) \
        if input_scale is None else input_scale.float()
    x_q = (x.float() / x_scale).to(FP8_DTYPE).float()  # exact for these inputs
    magnitude = (x_q.abs() @ weight.float().abs().T) * x_scale * scale[None, :]
    k = x.shape[1]
    allowed = magnitude * (2 * k + 8) * 2.0**-24 + expected.float().abs() * 2.0**-6
    if out.is_cuda:
        allowed += magnitude * 2.0**-9
    difference = (out.float() - expected.float()).abs()
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert (difference <= allowed).all(), (difference - allowed).max().item()


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("split_k,mode", SPLITS)
@pytest.mark.parametrize("n,k,has_bias", SHAPES)
def test_matches_reference(m, static, split_k, mode, n, k, has_bias, device, poison_outputs):
    weight, scale, bias = _weights(n, k, device)
    bias = bias.to(torch.bfloat16) if has_bias else None
    x, input_scale = _exact_activations(m, k, static, torch.bfloat16, device)
    config = SkinnyFp8Config(64, 128, 16, split_k, num_stages=2, split_k_mode=mode)
    out = skinny_fp8_linear(x, weight, scale, input_scale, bias, config=config)
    _assert_matches(out, x, weight, scale, input_scale, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes(dtype, device, poison_outputs):
    weight, scale, bias = _weights(80, 256, device, seed=2)
    x, _ = _exact_activations(4, 256, False, dtype, device, seed=3)
    out = skinny_fp8_linear(x, weight, scale, bias=bias.to(dtype), config=SMALL)
    _assert_matches(out, x, weight, scale, None, bias.to(dtype))


@pytest.mark.parametrize("m", [3, 8, 16])
def test_eight_token_tiles(m, device, poison_outputs):
    """tokens = 8 for M ≤ 8; a larger M is raised to the 16-token tile, not truncated."""
    weight, scale, bias = _weights(64, 256, device, seed=4)
    x, _ = _exact_activations(m, 256, False, torch.bfloat16, device, seed=5)
    config = SkinnyFp8Config(64, 128, tokens=8, split_k=2)
    out = skinny_fp8_linear(x, weight, scale, bias=bias, config=config)
    _assert_matches(out, x, weight, scale, None, bias)


def test_default_config(device, poison_outputs):
    weight, scale, _ = _weights(192, 1024, device, seed=6)
    x, _ = _exact_activations(2, 1024, False, torch.bfloat16, device, seed=7)
    out = skinny_fp8_linear(x, weight, scale)
    _assert_matches(out, x, weight, scale, None, None)


def test_random_activations_match_reference(device, poison_outputs):
    """Ordinary bf16 activations: on an E4M3 rounding tie the interpreter's quantiser may
    round an activation one step (2^-3 relative) away from torch's, so allow 2^-5 of the
    output's scale, as tests/kernels/test_quant_kernels.py does."""
    weight, scale, bias = _weights(80, 512, device, seed=8)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    x = x.to(device)
    config = SkinnyFp8Config(64, 128, 16, split_k=2)
    out = skinny_fp8_linear(x, weight, scale, bias=bias.to(torch.bfloat16), config=config)
    expected = fp8_linear_reference(x, weight, scale, None, bias.to(torch.bfloat16))
    difference = (out.float() - expected.float()).abs().max().item()
    assert difference <= 2**-5 * expected.float().abs().max().item(), difference


@pytest.mark.parametrize("m", [1, 5])
def test_prequantized_input_is_the_same_call(m, device, poison_outputs):
    """x that its producer already quantised (x_scale given: kernels/fused_quant.py) gives
    the bits of the call that quantises x itself."""
    from kiln.kernels.quant_linear import quantize_fp8_per_token

    weight, scale, bias = _weights(80, 512, device, seed=10)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    x = x.to(device)
    config = SkinnyFp8Config(64, 128, 16, split_k=2)
    expected = skinny_fp8_linear(x, weight, scale, bias=bias.to(torch.bfloat16), config=config)
    x_q, x_scale = quantize_fp8_per_token(x, None)
    out = skinny_fp8_linear(x_q, weight, scale, bias=bias.to(torch.bfloat16), x_scale=x_scale,
                            out_dtype=torch.bfloat16, config=config)
    assert torch.equal(out, expected)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("split_k", [2, 3, 4])
def test_serial_split_k_is_bit_identical_to_reduce(split_k, m, has_bias, device,
                                                   poison_outputs):
    """"serial" sums the same partials in the same order (0..S-1, then the bias) inside the
    GEMM, so its y has the bits of "reduce"'s; and every column block's counter is back to 0.
    K = 512 is 4 tiles: split 3 gives programs of 1, 1 and 2 tiles; N = 80 is two blocks,
    one partial. (The reference check also catches an unwritten, NaN-poisoned y.)"""
    weight, scale, bias = _weights(80, 512, device, seed=12)
    bias = bias.to(torch.bfloat16) if has_bias else None
    x, _ = _exact_activations(m, 512, False, torch.bfloat16, device, seed=13)
    reduce = SkinnyFp8Config(64, 128, 16, split_k, num_stages=2)
    serial = SkinnyFp8Config(64, 128, 16, split_k, num_stages=2, split_k_mode="serial")
    expected = skinny_fp8_linear(x, weight, scale, bias=bias, config=reduce)
    out = skinny_fp8_linear(x, weight, scale, bias=bias, config=serial)
    _assert_matches(out, x, weight, scale, None, bias)
    assert torch.equal(_bits(out), _bits(expected))
    assert not split_k_counters(x.device, 2).any()


def test_serial_split_k_twice_and_across_shapes(device, poison_outputs):
    """The counters one launch leaves are what the next needs: consecutive calls (new
    inputs, then a wider N on the same counters, then the first shape again) are all right."""
    config = SkinnyFp8Config(64, 128, 16, split_k=2, num_stages=2, split_k_mode="serial")
    narrow, wide = _weights(80, 256, device, seed=14), _weights(320, 256, device, seed=15)
    for (weight, scale, bias), seed in ((narrow, 16), (narrow, 17), (wide, 18), (narrow, 19)):
        x, _ = _exact_activations(3, 256, False, torch.bfloat16, device, seed=seed)
        out = skinny_fp8_linear(x, weight, scale, bias=bias, config=config)
        _assert_matches(out, x, weight, scale, None, bias)
        assert not split_k_counters(x.device, 5).any()


def test_split_k_counters_grow_zeroed_and_keep_the_old_buffer(device, monkeypatch):
    """Growing replaces the buffer with a larger zeroed one; the old one stays referenced (a
    CUDA graph captured earlier may still address it)."""
    monkeypatch.setattr(skinny_fp8, "_SPLIT_K_COUNTERS", {})
    monkeypatch.setattr(skinny_fp8, "_RETIRED_SPLIT_K_COUNTERS", [])
    first = split_k_counters(torch.device(device), 1)
    assert first.numel() >= skinny_fp8.MIN_SPLIT_K_COUNTERS and first.dtype == torch.int32
    assert split_k_counters(torch.device(device), 100) is first
    grown = split_k_counters(torch.device(device), first.numel() + 1)
    assert grown.numel() > first.numel() and not grown.any()
    assert skinny_fp8._RETIRED_SPLIT_K_COUNTERS == [first]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real widths, CUDA graphs")
@pytest.mark.parametrize("split_k", [2, 8])
def test_serial_split_k_in_a_cuda_graph_has_the_bits_of_reduce(split_k):
    """On the GPU the split programs of a column block really race to its counter (64 blocks
    × split_k programs, 20 launches per graph replay, each reusing the counters the last one
    reset): a memory-ordering bug shows as a y that differs from "reduce"'s, or a counter
    left non-zero."""
    weight, scale, bias = _weights(4096, 4096, "cuda", seed=20)
    bias = bias.to(torch.bfloat16)
    x, _ = _exact_activations(4, 4096, False, torch.bfloat16, "cuda", seed=21)
    reduce = SkinnyFp8Config(64, 256, 8, split_k)
    serial = SkinnyFp8Config(64, 256, 8, split_k, split_k_mode="serial")
    expected = skinny_fp8_linear(x, weight, scale, bias=bias, config=reduce)
    warm_up = skinny_fp8_linear(x, weight, scale, bias=bias, config=serial)  # compiles
    assert torch.equal(_bits(warm_up), _bits(expected))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [skinny_fp8_linear(x, weight, scale, bias=bias, config=serial)
                for _ in range(20)]
    for _ in range(5):
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(_bits(out), _bits(expected)) for out in outs)
        assert not split_k_counters(x.device, 64).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture")
def test_split_k_counters_refuse_to_grow_during_capture(monkeypatch):
    monkeypatch.setattr(skinny_fp8, "_SPLIT_K_COUNTERS", {})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be allocated during CUDA-graph capture"):
        with torch.cuda.graph(graph):
            split_k_counters(torch.device("cuda", torch.cuda.current_device()), 1)


def test_bad_prequantized_input_is_refused_naming_the_problem(device):
    weight, scale, _ = _weights(64, 128, device)
    x_q = torch.zeros(2, 128, dtype=FP8_DTYPE, device=device)
    ones = torch.ones(2, 1, device=device)
    with pytest.raises(ValueError, match="with x_scale, x must be 2-D"):
        skinny_fp8_linear(x_q.float(), weight, scale, x_scale=ones, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x_scale must be float32 \(2, 1\)"):
        skinny_fp8_linear(x_q, weight, scale, x_scale=ones[:, 0], out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype must be bfloat16, float16 or float32"):
        skinny_fp8_linear(x_q, weight, scale, x_scale=ones)


def test_default_config_follows_the_sweep_rule():
    # Llama-3.1-8B on the H200 (results/s8-h200-skinny-sweep.json): q|k|v's 96 and
    # gate|up's 448 64-row blocks fill two thirds of the SMs unsplit; o's and down's 64 blocks
    # are split in two; the LM head's 2004 blocks never are.
    assert [default_skinny_fp8_config(1, n, k).split_k for n, k in (
        (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096))] == [
        1, 2, 1, 2, 1]
    assert default_skinny_fp8_config(1, 6144, 4096).block_n == 64
    assert default_skinny_fp8_config(1, 6144, 4096).tokens == 16  # wgmma's N (see above)
    # A tensor-parallel shard of q|k|v (3072 rows: 48 blocks) splits; a short K never
    # splits below 4 tiles per program.
    assert default_skinny_fp8_config(1, 3072, 4096).split_k == 2
    assert default_skinny_fp8_config(1, 64, 512).split_k == 1


def _bad_calls(device):
    weight, scale, _ = _weights(64, 128, device)
    x = torch.zeros(2, 128, dtype=torch.bfloat16, device=device)
    return {
        "x must be 2-D": (x[None], weight, scale),
        "bfloat16, float16 or float32": (x.to(torch.int32), weight, scale),
        "contiguous along K": (torch.zeros(128, 2, dtype=torch.bfloat16, device=device).T,
                               weight, scale),
        "at most 16": (torch.zeros(17, 128, dtype=torch.bfloat16, device=device), weight, scale),
        "weight must be a contiguous 2-D": (x, weight.float(), scale),
        "has K=128 but weight has K=96": (x, weight[:, :96].contiguous(), scale),
        "multiple of 32": (torch.zeros(2, 80, dtype=torch.bfloat16, device=device),
                           weight[:, :80].contiguous(), scale),
        "weight_scale must be float32 \\(64,\\)": (x, weight, scale[:32]),
        "weight_scale must be float32": (x, weight, scale.half()),
        "input_scale must be one float32": (x, weight, scale,
                                            torch.ones(2, device=device)),
        "bias must be a contiguous \\(64,\\)": (x, weight, scale, None,
                                                torch.zeros(32, device=device)),
    }


@pytest.mark.parametrize("message", list(_bad_calls("cpu")))
def test_bad_input_is_refused_naming_the_problem(message, device):
    with pytest.raises(ValueError, match=message):
        skinny_fp8_linear(*_bad_calls(device)[message])


@pytest.mark.parametrize("field,value,message", [
    ("block_n", 32, "block_n must be a power of 2 ≥ 64"),
    ("block_k", 48, "block_k must be a power of 2 ≥ 32"),
    ("tokens", 4, "tokens must be 8 or 16"),
    ("split_k", 0, "must be ≥ 1"),
    ("split_k_mode", "tree", "split_k_mode must be one of"),
])
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SkinnyFp8Config(**{field: value})
