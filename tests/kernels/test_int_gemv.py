"""The batch-1 int8 / int4 weight-only GEMV that unpacks weights with bit operations
(kernels/int_gemv.py) against its torch reference (CPU interpreter here; the GPU at real
shapes through ops in tests/gpu/test_quant_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import int_gemv as int_gemv_module, ops
from kiln.kernels.int_gemv import (IntGemvConfig, fp8_gemv, fp8_gemv_unsupported_reason,
                                   int_gemv, int_gemv_unsupported_reason)
from kiln.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    fp8_linear_prequantized_reference,
    fp8_linear_reference,
    quantize_fp8_per_token_reference,
    weight_only_linear_reference,
)
from kiln.quant.quantize import pack_int4, quantize_int4, quantize_int8
from tests.kernels.kernel_helpers import max_relative_error, weight_only_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# Small tiles so the interpreter walks several of them, several groups per tile, and a
# partial last block of rows (N = 40 with 16-row programs).
SMALL = IntGemvConfig(block_n=16, tile_words=16, num_warps=4)


def _inputs(n: int, k: int, dtype=torch.bfloat16, seed: int = 0):
    return weight_only_inputs(1, n, k, dtype, seed)


_relative = max_relative_error


@pytest.mark.parametrize("group_size", [-1, 16, 32, 128])  # 16: GGUF Q6_K
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_matches_reference(group_size, dtype, device, poison_outputs):
    x, weight, bias = _inputs(40, 512, dtype)
    q, scale = quantize_int8(weight, 512 if group_size == -1 else group_size)
    out = int_gemv(x.to(device), q.to(device), scale.to(device), bias=bias.to(device),
                   config=SMALL)
    expected = weight_only_linear_reference(x, dequantize_int8(q, scale), bias)
    assert out.dtype == dtype and out.shape == (1, 40)
    assert _relative(out.cpu(), expected) < 2**-7


@pytest.mark.parametrize("group_size,zero_point", [(32, True), (64, False), (128, True),
                                                   (512, True)])
def test_int4_matches_reference(group_size, zero_point, device, poison_outputs):
    x, weight, bias = _inputs(40, 512, seed=1)
    packed, scale, zero = quantize_int4(weight, group_size, zero_point)
    out = int_gemv(x.to(device), packed.to(device), scale.to(device), zero.to(device),
                   bias.to(device), config=SMALL)
    expected = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero), bias)
    assert _relative(out.cpu(), expected) < 2**-7


@pytest.mark.parametrize("split_k", [2, 3, 8])  # 3: not a divisor of 128 words, so 1
@pytest.mark.parametrize("scheme", ["int8", "int8_g32", "int4"])
def test_split_k_matches_reference(scheme, split_k, device, poison_outputs):
    """K in parts, one program each, fp32 partials summed (with the bias) by a second launch:
    the same result as one part, for every scheme; a split that does not divide the row's
    words falls back to the largest one that does."""
    x, weight, bias = _inputs(40, 1024, seed=6)
    if scheme == "int4":
        tensors = quantize_int4(weight, 128)
        expected = weight_only_linear_reference(x, dequantize_int4(*tensors), bias)
    else:
        tensors = quantize_int8(weight, 32 if scheme == "int8_g32" else 1024)
        expected = weight_only_linear_reference(x, dequantize_int8(*tensors), bias)
    args = [tensor.to(device) for tensor in tensors]
    config = IntGemvConfig(block_n=16, tile_words=16, num_warps=4, split_k=split_k)
    out = int_gemv(x.to(device), *args, bias=bias.to(device), config=config)
    whole = int_gemv(x.to(device), *args, bias=bias.to(device), config=SMALL)
    assert out.shape == (1, 40) and _relative(out.cpu(), expected) < 2**-7
    assert _relative(out.cpu(), whole.cpu()) < 2**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: packed on a GPU
def test_every_byte_and_nibble_value_is_unpacked_exactly(dtype, device):
    """Each weight value in each position of a word: x is one-hot per column, so y[n] is
    exactly w[n, column] (no rounding anywhere: powers of 2, integers below 2^23; on the
    GPU's packed bf16 path q − 8 and its product with 1 are exact too)."""
    k = 64
    q8 = torch.arange(-128, 128, dtype=torch.int16).reshape(4, k).to(torch.int8)  # every byte
    q4 = torch.arange(16 * k, dtype=torch.int64).remainder(16).reshape(16, k)
    q4 = q4[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    ones = torch.ones(4, 1, dtype=torch.float16)
    for column in range(k):
        x = torch.zeros(1, k, dtype=dtype)
        x[0, column] = 1.0
        y8 = int_gemv(x.to(device), q8.to(device), ones.to(device), config=SMALL)
        assert torch.equal(y8.cpu()[0].float(), q8[:, column].float())
        y4 = int_gemv(x.to(device), pack_int4(q4).to(device),
                      torch.ones(16, 1, dtype=torch.float16, device=device),
                      torch.full((16, 1), 3.0, dtype=torch.float16, device=device), config=SMALL)
        assert torch.equal(y4.cpu()[0].float(), (q4[:, column] - 3).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: packed (GPU)
def test_fractional_zero_points_are_exact_enough(dtype, device):
    """GGUF Q4_1 and Q4_K imports carry non-integer zero points (−min / scale): the zero
    leaves the inner loop as z · Σx in fp32, which must not lose them (the packed bf16 path
    rounds only its products of q − 8, whatever z is). bf16: x has a mean of 1, so Σx is
    large and a zero rounded to a whole number would miss by far more than the output's
    rounding (checked below)."""
    x, weight, _ = _inputs(16, 256, torch.float32, seed=3)
    x = (x + 1.0 if dtype == torch.bfloat16 else x).to(dtype)
    packed, scale, zero = quantize_int4(weight, 64)
    zero = zero + 0.37
    out = int_gemv(x.to(device), packed.to(device), scale.to(device), zero.to(device),
                   config=SMALL)
    expected = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero))
    if dtype == torch.float32:
        assert _relative(out.cpu(), expected) < 1e-5
    else:
        rounded = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero.round()))
        assert _relative(rounded, expected) > 2**-5  # what losing the fraction would cost
        assert _relative(out.cpu(), expected) < 2**-7


def test_packed_int4_matches_the_fp32_unpacking_at_llama_shapes(device, monkeypatch):
    """The GPU's packed path (two bf16 weights an instruction; KILN_INT_GEMV_PACKED=0 is its
    A/B switch) against the fp32 unpacking and the reference at a real K: its products are
    rounded to bf16 and summed in bf16 four at a time, so it may differ by a few bf16 steps,
    never more. Under the interpreter both runs take the fp32 unpacking."""
    k = 4096 if device == "cuda" else 512
    x, weight, bias = _inputs(64, k, seed=5)
    packed, scale, zero = quantize_int4(weight, 128)
    args = [tensor.to(device) for tensor in (x, packed, scale, zero, bias)]
    expected = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero), bias)
    assert int_gemv_module.packed_usable(args[0]) == (device == "cuda")
    out = int_gemv(*args)
    monkeypatch.setenv("KILN_INT_GEMV_PACKED", "0")
    assert not int_gemv_module.packed_usable(args[0])
    plain = int_gemv(*args)
    assert _relative(out.cpu(), expected) < 2**-7 and _relative(plain.cpu(), expected) < 2**-7
    assert _relative(out.cpu(), plain.cpu()) < 2**-7
    assert not int_gemv_module.packed_usable(args[0].float())  # fp32 x: the fp32 unpacking
    monkeypatch.setenv("KILN_INT_GEMV_PACKED", "yes")
    with pytest.raises(ValueError, match="KILN_INT_GEMV_PACKED must be 0 or 1"):
        int_gemv_module.packed_usable(args[0])


def test_default_config_and_ops_dispatch(device, monkeypatch):
    """ops sends batch-1 int linears here (KILN_INT_GEMV=0 keeps quant_linear's kernel), and
    the default config runs with K needing the tile clipped (K = 192: 48 words)."""
    x, weight, bias = _inputs(24, 192, seed=4)
    q, scale = quantize_int8(weight, 192)
    x, q, scale, bias_d = x.to(device), q.to(device), scale.to(device), bias.to(device)
    monkeypatch.setattr(ops, "_fast", lambda tensor: True)  # the interpreter stands in for CUDA
    calls = []
    real = int_gemv_module.launch_int_gemv  # what ops calls once it has checked the inputs
    monkeypatch.setattr(int_gemv_module, "launch_int_gemv",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    expected = weight_only_linear_reference(x.cpu(), dequantize_int8(q.cpu(), scale.cpu()), bias)
    out = ops.int8_weight_only_linear(x, q, scale, bias_d)
    assert calls == [1] and _relative(out.cpu(), expected) < 2**-7
    monkeypatch.setenv("KILN_INT_GEMV", "0")
    out = ops.int8_weight_only_linear(x, q, scale, bias_d)
    assert calls == [1] and _relative(out.cpu(), expected) < 2**-7


def test_unsupported_inputs_are_named(device):
    q = torch.zeros(8, 64, dtype=torch.int8)
    scale = torch.ones(8, 1, dtype=torch.float16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert int_gemv_unsupported_reason(x, q, scale, False) is None
    assert "one contiguous row" in int_gemv_unsupported_reason(torch.zeros(2, 64), q, scale,
                                                               False)
    assert "float16, bfloat16 or float32" in int_gemv_unsupported_reason(
        x.to(torch.int32), q, scale, False)
    assert "int8 with 64 columns" in int_gemv_unsupported_reason(x, q[:, :32], scale, False)
    assert "multiple of 4" in int_gemv_unsupported_reason(
        torch.zeros(1, 66), torch.zeros(8, 66, dtype=torch.int8), scale, False)
    misaligned = torch.zeros(8 * 64 + 1, dtype=torch.int8)[1:].view(8, 64)  # contiguous, odd
    assert "4-byte boundary" in int_gemv_unsupported_reason(x, misaligned, scale, False)
    assert "whole number of 8-weight words" in int_gemv_unsupported_reason(
        x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 16, dtype=torch.float16), True)
    with pytest.raises(ValueError, match="int_gemv: x must be one contiguous row"):
        int_gemv(torch.zeros(2, 64, device=device), q.to(device), scale.to(device))
    with pytest.raises(ValueError, match="power of 2"):
        IntGemvConfig(block_n=12)
    with pytest.raises(ValueError, match="split_k must be at least 1"):
        IntGemvConfig(split_k=0)
    assert IntGemvConfig.parse("16x32x1x4") == IntGemvConfig(16, 32, 1, 4)


def test_tiling_override_from_the_environment(monkeypatch):
    """KILN_INT_GEMV_TILING (the benchmark's end-to-end A/B of a tiling) replaces the default
    for the formats it names; a malformed value is an error naming the variable."""
    default_int4 = int_gemv_module.default_int_gemv_config(4096, 4096, True)
    monkeypatch.setenv("KILN_INT_GEMV_TILING", "int8=8x128x1")
    assert int_gemv_module.default_int_gemv_config(4096, 4096, False) == IntGemvConfig(8, 128, 1)
    assert int_gemv_module.default_int_gemv_config(4096, 4096, True) == default_int4
    monkeypatch.setenv("KILN_INT_GEMV_TILING", "int4=64x32x2, int8=16x64x4")
    assert int_gemv_module.default_int_gemv_config(8, 64, True) == IntGemvConfig(64, 32, 2)
    for bad, message in (("int4=64x32", "expected rows x words x warps"),
                         ("int4=16x32x1x4x2", r"expected rows x words x warps \[x splits\]"),
                         ("fp16=1x1x1", "expected entries like"),
                         ("int4=64x30x2", "tile_words must be a power of 2")):
        monkeypatch.setenv("KILN_INT_GEMV_TILING", bad)
        with pytest.raises(ValueError, match=f"KILN_INT_GEMV_TILING.*{message}"):
            int_gemv_module.default_int_gemv_config(8, 64, True)


def test_packed_int4_tilings_and_the_wide_matrices_it_takes_from_the_gluon_kernel(monkeypatch):
    """The packed path's measured rules (H100, BENCHMARKS.md): 1-warp programs on matrices at
    least PACKED_WIDE_ROWS wide, which then stay off the Gluon twin at one row; 512-byte tiles
    up to 4096 x 4096; the fp32 unpacking keeps its own default."""
    from kiln.kernels import skinny_int4

    config = int_gemv_module.default_int_gemv_config
    assert config(28672, 4096, True, packed=True) == IntGemvConfig(16, 32, 1)
    assert config(4096, 4096, True, packed=True) == IntGemvConfig(16, 128, 4)
    assert config(6144, 4096, True, packed=True) == IntGemvConfig(16, 64, 4)
    assert config(28672, 4096, True) == config(4096, 4096, True) == IntGemvConfig(16, 64, 4)
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    monkeypatch.setattr(skinny_int4, "gluon_usable", lambda tensor: True)
    monkeypatch.setattr(int_gemv_module, "packed_usable", lambda tensor: True)
    assert not skinny_int4.takes_batch1(x, 28672, 4096)  # gate|up: int_gemv, packed
    assert skinny_int4.takes_batch1(x, 6144, 4096) and skinny_int4.takes_batch1(x, 4096, 14336)
    monkeypatch.setattr(int_gemv_module, "packed_usable", lambda tensor: False)
    assert skinny_int4.takes_batch1(x, 28672, 4096)  # fp16 / fp32 x: the Gluon kernel as before


def _fp8_inputs(n: int, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.02
    weight_scale = (weight.abs().amax(1) / 448).float()
    w_q = (weight / weight_scale[:, None]).to(torch.float8_e4m3fn)
    x = torch.randn(1, k, generator=generator).to(torch.bfloat16) * 3
    bias = torch.randn(n, generator=generator).to(torch.bfloat16)
    return x, w_q, weight_scale, bias


@pytest.mark.parametrize("split_k", [1, 4])
def test_fp8_gemv_matches_reference(split_k, device, poison_outputs):
    """W8A8 FP8 at one row: each product of two E4M3 values is exact in float16 and two are
    summed there, so against the fp32 reference it is a bf16 rounding of the output apart
    (fp32 out: close to exact on the interpreter's fp32 path)."""
    x, w_q, weight_scale, bias = _fp8_inputs(40, 512, seed=7)
    x_q, x_scale = quantize_fp8_per_token_reference(x)
    config = IntGemvConfig(block_n=16, tile_words=16, num_warps=4, split_k=split_k)
    args = [t.to(device) for t in (x_q, x_scale, w_q, weight_scale)]
    out = fp8_gemv(*args, bias.to(device), torch.bfloat16, config=config)
    expected = fp8_linear_prequantized_reference(x_q, x_scale, w_q, weight_scale, bias,
                                                 torch.bfloat16)
    assert out.dtype == torch.bfloat16 and _relative(out.cpu(), expected) < 2**-7
    exact = fp8_linear_prequantized_reference(x_q, x_scale, w_q, weight_scale, None,
                                              torch.float32)
    out = fp8_gemv(*args, None, torch.float32, config=config)
    assert _relative(out.cpu(), exact) < (1e-6 if device == "cpu" else 2**-10)


def test_fp8_gemv_reads_every_e4m3_value_exactly(device):
    """Every finite E4M3 byte in every position of a word, x one-hot (1.0): y[n] is exactly
    the weight's value (the GPU path's float16 products of E4M3 values and 2^-8 are exact)."""
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    w_q = finite[:248].view(torch.float8_e4m3fn).reshape(62, 4).repeat(1, 2).contiguous()
    for column in range(8):
        x = torch.zeros(1, 8)
        x[0, column] = 1.0
        y = fp8_gemv(x.to(torch.float8_e4m3fn).to(device), torch.ones(1, 1, device=device),
                     w_q.to(device), torch.ones(62, device=device), None, torch.float32,
                     config=IntGemvConfig(block_n=16, tile_words=2, num_warps=4))
        assert torch.equal(y.cpu()[0], w_q[:, column].float()), column


def test_fp8_gemv_refusals_and_the_opt_in_dispatch(device, monkeypatch):
    x, w_q, weight_scale, bias = [t.to(device) for t in _fp8_inputs(24, 256, seed=8)]
    x_q, x_scale = quantize_fp8_per_token_reference(x)
    assert fp8_gemv_unsupported_reason(x_q, x_scale, w_q, weight_scale) is None
    assert "one contiguous row" in fp8_gemv_unsupported_reason(x_q.expand(2, -1), x_scale,
                                                               w_q, weight_scale)
    assert "float8_e4m3fn" in fp8_gemv_unsupported_reason(x, x_scale, w_q, weight_scale)
    assert "weight_scale must be float32 (N,)" in fp8_gemv_unsupported_reason(
        x_q, x_scale, w_q, weight_scale[:4])
    assert "x_scale must be one float32" in fp8_gemv_unsupported_reason(
        x_q, x_scale.expand(2, 1), w_q, weight_scale)
    with pytest.raises(ValueError, match="fp8_gemv: weight must be contiguous"):
        fp8_gemv(x_q, x_scale, w_q[:, :128], weight_scale)
    # ops: one bf16 row goes here only with KILN_FP8_GEMV=1, quantised on the way.
    monkeypatch.setattr(ops, "_fast", lambda tensor: True)  # the interpreter stands in for CUDA
    calls = []
    real = int_gemv_module.launch_fp8_gemv  # what ops calls once it has checked the inputs
    monkeypatch.setattr(int_gemv_module, "launch_fp8_gemv",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    expected = fp8_linear_reference(x, w_q, weight_scale, None, bias)
    monkeypatch.setenv("KILN_FP8_GEMV", "1")
    out = ops.fp8_linear(x, w_q, weight_scale, None, bias)
    assert calls == [1] and _relative(out.cpu(), expected.cpu()) < 2**-7
    monkeypatch.setenv("KILN_FP8_GEMV", "0")
    ops.fp8_linear(x, w_q, weight_scale, None, bias)
    assert calls == [1]
