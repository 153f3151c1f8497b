"""RMSNorm and SiLU-and-mul with FP8 output (kernels/fused_quant.py) and the FP8 GEMM's
pre-quantised input (quant_linear.ACT_PREQUANTIZED).

The fused kernels are defined to equal the unfused path: the producer's output in the compute
dtype, quantised per token (or by the static scale). So each is checked two ways:
  - bit for bit against the unfused Triton kernels run one after the other (the producer,
    then quantize_fp8_per_token): the same arithmetic in the same order, here and on a GPU;
  - against its torch reference within the producer's own tolerance carried through the
    quantisation (see _assert_within_one_e4m3_step).
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import activation, fused_quant, norm, ops, quant_linear
from kiln.kernels.quant_linear import (
    KIND_FP8,
    QuantGemmConfig,
    fp8_linear_reference,
    quantize_fp8_per_token_reference,
)
from kiln.quant.quantize import quantize_fp8_per_channel
from tests.kernels.kernel_helpers import tolerance

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

DTYPES = [torch.bfloat16, torch.float32]
STATIC_SCALE = 0.005  # small enough that some of these activations saturate at ±448


def _scale(static: bool, device: str) -> torch.Tensor | None:
    return torch.tensor([STATIC_SCALE], device=device) if static else None


def _assert_bits_equal(values: torch.Tensor, expected: torch.Tensor) -> None:
    assert values.dtype == expected.dtype == torch.float8_e4m3fn
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))


def _assert_within_one_e4m3_step(values, scale, expected_values, expected_scale, dtype, ulps):
    """Against the torch reference. Kernel and reference round the producer's output to the
    compute dtype independently (`ulps` of it apart at most: kernel_helpers.tolerance), and a
    dynamic scale is that output's amax / 448, so it moves as much. Together y / scale moves
    by under 2^-5 relatively for bf16, less than one E4M3 step (2^-4 to 2^-3 relatively, 3
    mantissa bits): each value rounds to the same or an adjacent E4M3 number, whose gap is
    at most 2^-3 of the value, 2^-9 below the normal range."""
    torch.testing.assert_close(scale, expected_scale, **tolerance(dtype, ulps))
    q, q_ref = values.float(), expected_values.float()
    assert ((q - q_ref).abs() <= q_ref.abs() * 2**-3 + 2**-9).all()


# ---- RMSNorm → E4M3 ---------------------------------------------------------------------------


def _norm_inputs(dtype, hidden, with_residual, device):
    generator = torch.Generator().manual_seed(hidden)
    x = (torch.randn(6, hidden, generator=generator) * 3).to(dtype).to(device)
    x[2] = 0  # a row of zeros (without a residual): the scale's floor, every value 0
    weight = (torch.randn(hidden, generator=generator) * 0.1 + 1).to(dtype).to(device)
    residual = (torch.randn(6, hidden, generator=generator).to(dtype).to(device)
                if with_residual else None)
    return x, weight, residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 300])  # a power of 2; a masked tail
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_rms_norm_fp8_is_the_unfused_kernels_bit_for_bit(dtype, hidden, with_residual, static,
                                                        device, poison_outputs):
    x, weight, residual = _norm_inputs(dtype, hidden, with_residual, device)
    input_scale = _scale(static, device)
    values, scale, new_residual = fused_quant.rms_norm_fp8(x, weight, 1e-5, residual,
                                                           input_scale)
    normed, expected_residual = norm.rms_norm(x, weight, 1e-5, residual)
    expected_values, expected_scale = quant_linear.quantize_fp8_per_token(normed, input_scale)
    _assert_bits_equal(values, expected_values)
    assert torch.equal(scale, expected_scale) and scale.shape == (6, 1)
    if with_residual:
        assert torch.equal(new_residual, expected_residual)
    else:
        assert new_residual is None
        assert (values[2].float() == 0).all()
    if static:
        assert expected_values.float().abs().max() == 448  # saturated, like the unfused path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_rms_norm_fp8_matches_reference(dtype, with_residual, static, device, poison_outputs):
    x, weight, residual = _norm_inputs(dtype, 300, with_residual, device)
    input_scale = _scale(static, device)
    values, scale, new_residual = fused_quant.rms_norm_fp8(x, weight, 1e-5, residual,
                                                           input_scale)
    _, _, expected_residual = fused_quant.rms_norm_fp8_reference(x, weight, 1e-5, residual,
                                                                 input_scale)
    if with_residual:
        # The sum is rounded once (1 ulp); the norm is then checked on the kernel's own sum,
        # as tests/kernels/test_norm_kernels.py does.
        torch.testing.assert_close(new_residual, expected_residual, **tolerance(dtype))
        x, residual = new_residual, None
    expected_values, expected_scale, _ = fused_quant.rms_norm_fp8_reference(
        x, weight, 1e-5, residual, input_scale)
    # Normalise, round, weight, round: 2 ulps (test_norm_kernels.py).
    _assert_within_one_e4m3_step(values, scale, expected_values, expected_scale, dtype, ulps=2)


def test_rms_norm_fp8_takes_rows_only(device):
    x = torch.randn(2, 3, 32, device=device)
    with pytest.raises(ValueError, match=r"takes \(T, H\)"):
        fused_quant.rms_norm_fp8(x, torch.ones(32, device=device), 1e-6)


# ---- SiLU-and-mul → E4M3 ----------------------------------------------------------------------


def _gate_up(dtype, intermediate, device):
    generator = torch.Generator().manual_seed(intermediate)
    x = (torch.randn(5, 2 * intermediate, generator=generator) * 4).to(dtype).to(device)
    x[3] = 0  # a row of zeros: the scale's floor, every value 0
    return x


@pytest.fixture(params=["whole-row", "tiles"])
def silu_walk(request, monkeypatch):
    """Rows held in registers (the kernel's choice at these widths), or walked in tiles of
    1,024 as it walks rows wider than ROW_IN_REGISTERS."""
    if request.param == "tiles":
        monkeypatch.setattr(fused_quant, "ROW_IN_REGISTERS", 128)
        monkeypatch.setattr(fused_quant, "SILU_TILE", 1024)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [1, 300, 2500])  # one lane; a masked tail; 3 tiles
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_silu_and_mul_fp8_is_the_unfused_kernels_bit_for_bit(dtype, intermediate, static,
                                                            silu_walk, device, poison_outputs):
    x = _gate_up(dtype, intermediate, device)
    input_scale = _scale(static, device)
    values, scale = fused_quant.silu_and_mul_fp8(x, input_scale)
    expected_values, expected_scale = quant_linear.quantize_fp8_per_token(
        activation.silu_and_mul(x), input_scale)
    _assert_bits_equal(values, expected_values)
    assert torch.equal(scale, expected_scale) and scale.shape == (5, 1)
    assert (values[3].float() == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_silu_and_mul_fp8_matches_reference(dtype, static, silu_walk, device, poison_outputs):
    x = _gate_up(dtype, 2500, device)
    input_scale = _scale(static, device)
    values, scale = fused_quant.silu_and_mul_fp8(x, input_scale)
    expected_values, expected_scale = fused_quant.silu_and_mul_fp8_reference(x, input_scale)
    # silu rounded, then the product rounded: 2 ulps (test_activation_kernels.py).
    _assert_within_one_e4m3_step(values, scale, expected_values, expected_scale, dtype, ulps=2)


# ---- the FP8 GEMM on a pre-quantised input ----------------------------------------------------

SMALL_GEMM = QuantGemmConfig(16, 32, 64, 4)  # M > 16: GEMM tiles, small for the interpreter


@pytest.mark.parametrize("m", [1, 5, 37])  # CUDA-core GEMV; tl.dot padded to 16; GEMM tiles
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_prequantized_input_gives_the_quantising_kernel_bit_for_bit(m, static, device,
                                                                    poison_outputs):
    generator = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=generator).to(torch.bfloat16).to(device)
    weight, weight_scale = (t.to(device) for t in
                            quantize_fp8_per_channel(torch.randn(48, 256, generator=generator)))
    bias = torch.randn(48, generator=generator).to(torch.bfloat16).to(device)
    input_scale = _scale(static, device)
    config = SMALL_GEMM if m > 16 else None
    expected = quant_linear.quant_linear(x, KIND_FP8, weight, weight_scale, None, input_scale,
                                         bias, config=config)
    x_q, x_scale = quant_linear.quantize_fp8_per_token(x, input_scale)
    out = quant_linear.quant_linear(x_q, KIND_FP8, weight, weight_scale, bias=bias,
                                    x_scale=x_scale, out_dtype=torch.bfloat16, config=config)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_reference_on_a_prequantized_input_is_the_reference(static):
    # The CPU path (ops.fp8_linear's torch reference): what the fused engine computes there.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 64, generator=generator).to(torch.bfloat16)
    weight, weight_scale = quantize_fp8_per_channel(torch.randn(32, 64, generator=generator))
    input_scale = _scale(static, "cpu")
    x_q, x_scale = quantize_fp8_per_token_reference(x, input_scale)
    out = ops.fp8_linear(x_q, weight, weight_scale, None, None, x_scale=x_scale,
                         out_dtype=torch.bfloat16)
    assert torch.equal(out, fp8_linear_reference(x, weight, weight_scale, input_scale))


def test_prequantized_input_is_checked(device):
    weight = torch.zeros(32, 64, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.ones(32, device=device)
    x = torch.zeros(3, 64, dtype=torch.float8_e4m3fn, device=device)
    with pytest.raises(ValueError, match="needs out_dtype"):
        quant_linear.quant_linear(x, KIND_FP8, weight, scale, x_scale=torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"x_scale must be contiguous \(M, 1\)"):
        quant_linear.quant_linear(x, KIND_FP8, weight, scale, x_scale=torch.ones(3),
                                  out_dtype=torch.bfloat16)


@pytest.mark.parametrize("m", [1, 5, 64])  # on CUDA: GEMV; tl.dot; torch._scaled_mm
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_linear_on_a_prequantized_input_is_the_unfused_op(m, static, device):
    # The dispatcher end to end: the unfused op quantises x exactly as the producer did
    # (on CUDA with quantize_fp8_per_token, or the GEMM's own identical arithmetic), so the
    # same matmul follows. On the CPU both take the torch reference.
    generator = torch.Generator().manual_seed(m)
    x = torch.randn(m, 128, generator=generator).to(torch.bfloat16).to(device)
    weight, weight_scale = (t.to(device) for t in
                            quantize_fp8_per_channel(torch.randn(64, 128, generator=generator)))
    input_scale = _scale(static, device)
    quantise = (quant_linear.quantize_fp8_per_token if device == "cuda"
                else quantize_fp8_per_token_reference)
    x_q, x_scale = quantise(x, input_scale)
    out = ops.fp8_linear(x_q, weight, weight_scale, None, None, x_scale=x_scale,
                         out_dtype=torch.bfloat16)
    assert torch.equal(out, ops.fp8_linear(x, weight, weight_scale, input_scale, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real widths: too slow interpreted")
@pytest.mark.parametrize("tokens", [1, 300])
def test_fused_kernels_at_llama_8b_widths_are_the_unfused_kernels(tokens):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    hidden = torch.randn(tokens, 4096, device="cuda", generator=generator).to(torch.bfloat16)
    residual = torch.randn(tokens, 4096, device="cuda", generator=generator).to(torch.bfloat16)
    weight = torch.randn(4096, device="cuda", generator=generator).to(torch.bfloat16)
    values, scale, new_residual = fused_quant.rms_norm_fp8(hidden, weight, 1e-5, residual)
    normed, expected_residual = norm.rms_norm(hidden, weight, 1e-5, residual)
    expected_values, expected_scale = quant_linear.quantize_fp8_per_token(normed)
    _assert_bits_equal(values, expected_values)
    assert torch.equal(scale, expected_scale) and torch.equal(new_residual, expected_residual)

    for intermediate in (14336, 28672):  # Llama-3-8B: in registers; -70B at tp 1: in tiles
        gate_up = torch.randn(tokens, 2 * intermediate, device="cuda", generator=generator)
        gate_up = gate_up.to(torch.bfloat16)
        values, scale = fused_quant.silu_and_mul_fp8(gate_up)
        expected_values, expected_scale = quant_linear.quantize_fp8_per_token(
            activation.silu_and_mul(gate_up))
        _assert_bits_equal(values, expected_values)
        assert torch.equal(scale, expected_scale)
