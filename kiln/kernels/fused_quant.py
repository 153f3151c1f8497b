"""RMSNorm and SiLU-and-mul that write their output as E4M3 for the FP8 linear that reads it
(W8A8, issue 11): torch references and Triton kernels.

Without this the producer writes y in the compute dtype and the FP8 linear quantises it
again: at M ≤ 16 every program of the quantised GEMM re-reads its rows of y for their amax,
above 16 rows a separate kernel (quantize_fp8_per_token) reads y once more and writes E4M3.
Here the producer quantises while y is still in registers and writes one byte per element
plus one float32 scale per token; the linear consumes them as they are
(quant_linear.ACT_PREQUANTIZED, or torch._scaled_mm).

The semantics, exactly those of the unfused path (so fusing changes no result):

    y      = the producer's output rounded to the compute dtype (what it writes unfused:
             rms_norm_reference / silu_and_mul_reference)
    scale  = max(amax(|y_row|) / 448, 1e-12) per token (dynamic), or the consumer's static
             input scale on every row
    values = E4M3(clamp(y / scale, ±448))

= quantize_fp8_per_token_reference(y). Rounding y to the compute dtype first costs one
conversion per element and buys bit-equality with the unfused engine: the fused reference is
the unfused reference composed, and the fused kernel is the unfused kernel's arithmetic
followed by quantize_fp8_per_token's (to_e4m3: see its EMULATE note).

One program per token, because a dynamic scale needs the whole row's amax before any element
is quantised (the unfused SiLU-and-mul spreads a row over several programs). The program keeps
its row in registers, as kernels/norm.py does: up to ROW_IN_REGISTERS elements, 32 per thread
at most (16 warps at 16,384; Llama-3-8B's SiLU-and-mul row is 14,336 at tp 1), so at decode a
row is one round of loads instead of a loop of dependent ones. A wider SiLU-and-mul row is
walked twice in tiles — for the amax, then to quantise — recomputing silu(gate) · up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.activation import silu_and_mul_reference
from kiln.kernels.norm import check_rms_norm_inputs, rms_norm_reference
from kiln.kernels.quant_linear import FP8_DTYPE, quantize_fp8_per_token_reference, to_e4m3
from kiln.kernels.triton_utils import (
    check_float,
    check_last_dim_contiguous,
    interpreter_active,
    launchable,
    next_power_of_2,
    pdl_prologue,
    use_pdl,
)

_TL_FLOAT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Rows up to this wide stay in registers; a wider SiLU-and-mul row is walked in tiles of
# SILU_TILE (RMSNorm rows, the hidden size, are always held whole, as in kernels/norm.py).
ROW_IN_REGISTERS = 16384
SILU_TILE = 8192


def _num_warps(block: int) -> int:
    """At most 32 elements per thread, at least 16 (1 to 16 warps)."""
    return max(1, min(16, block // 512))


# ---------------------------------------------------------------------------------------------
# References


def rms_norm_fp8_reference(
    x: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (T, H)
    input_scale: torch.Tensor | None = None,  # (1,) float32 static scale; None: per token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(E4M3 (T, H), float32 scales (T, 1), x + residual or None): rms_norm_reference's
    output quantised by quantize_fp8_per_token_reference."""
    normed, new_residual = rms_norm_reference(x, weight, eps, residual)
    values, scale = quantize_fp8_per_token_reference(normed, input_scale)
    return values, scale, new_residual


def silu_and_mul_fp8_reference(
    x: torch.Tensor,  # (T, 2I) [gate | up]
    input_scale: torch.Tensor | None = None,  # (1,) float32 static scale; None: per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 (T, I), float32 scales (T, 1)): silu_and_mul_reference's output quantised by
    quantize_fp8_per_token_reference."""
    return quantize_fp8_per_token_reference(silu_and_mul_reference(x), input_scale)


# ---------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _row_scale(amax, input_scale_ptr, STATIC: tl.constexpr):
    """The row's scale: the static one, or amax / 448 floored as quantize_fp8_per_token's."""
    if STATIC:
        scale = tl.load(input_scale_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.div_rn(amax, 448.0), 1e-12)
    return scale


@triton.jit
def _quantize(y, scale, EMULATE_FP8: tl.constexpr):
    """E4M3 of y / scale, saturating (quantize_fp8_per_token's arithmetic)."""
    q = tl.minimum(tl.maximum(tl.div_rn(y, scale), -448.0), 448.0)
    return to_e4m3(q, EMULATE_FP8)


@triton.jit
def _rms_norm_fp8_kernel(
    x_ptr, stride_x,  # (T, H)
    residual_ptr, stride_r,  # (T, H), when HAS_RESIDUAL
    weight_ptr,  # (H,)
    values_ptr,  # (T, H) E4M3, contiguous
    scale_ptr,  # (T,) float32 (a contiguous (T, 1))
    residual_out_ptr,  # (T, H) contiguous: x + residual, when HAS_RESIDUAL
    input_scale_ptr,  # (1,) float32, when STATIC
    eps,
    H: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STATIC: tl.constexpr,
    OUT_DTYPE: tl.constexpr, USE_PDL: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # From here to `y`, kernels/norm.py's _rms_norm_kernel, line for line.
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * H + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, 0) / H
    normed = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # The value the unfused norm would have written (masked columns are 0: no effect on amax).
    y = (weight * normed).to(OUT_DTYPE).to(tl.float32)
    scale = _row_scale(tl.max(tl.abs(y), 0), input_scale_ptr, STATIC)
    tl.store(values_ptr + row * H + cols, _quantize(y, scale, EMULATE_FP8), mask=mask)
    tl.store(scale_ptr + row, scale)


def rms_norm_fp8(
    x: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (T, H), same dtype as x
    input_scale: torch.Tensor | None = None,  # (1,) float32 static scale; None: per token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton twin of rms_norm_fp8_reference: (E4M3 (T, H), float32 (T, 1), x + residual or
    None), new tensors."""
    check_rms_norm_inputs("rms_norm_fp8", x, weight, residual, ((2, "(T, H)"),))
    tokens, hidden = x.shape
    values = torch.empty(tokens, hidden, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    new_residual = None
    if residual is not None:
        check_last_dim_contiguous("residual", residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return values, scale, new_residual
    r = residual if residual is not None else x  # unread without a residual
    block = next_power_of_2(hidden)
    pdl = use_pdl(x)
    launchable(_rms_norm_fp8_kernel, x)[(tokens,)](
        x, x.stride(0), r, r.stride(0), weight, values, scale,
        new_residual if new_residual is not None else x,
        input_scale if input_scale is not None else scale, eps,
        H=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        STATIC=input_scale is not None,
        # The dtype rms_norm would return (weight * normed promotes).
        OUT_DTYPE=_TL_FLOAT[torch.promote_types(weight.dtype, x.dtype)],
        USE_PDL=pdl, EMULATE_FP8=interpreter_active(),
        num_warps=_num_warps(block), launch_pdl=pdl,
    )
    return values, scale, new_residual


@triton.jit
def _silu_and_mul_tile(row_ptr, cols, intermediate, OUT_DTYPE: tl.constexpr):
    """silu(gate) · up for columns `cols` of one row, rounded as kernels/activation.py's
    _silu_and_mul_kernel rounds it (masked columns give 0)."""
    mask = cols < intermediate
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row_ptr + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(OUT_DTYPE).to(tl.float32)
    return (silu * up).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(
    x_ptr, stride_x,  # (T, 2I): [gate | up]
    values_ptr,  # (T, I) E4M3, contiguous
    scale_ptr,  # (T,) float32 (a contiguous (T, 1))
    input_scale_ptr,  # (1,) float32, when STATIC
    intermediate,
    BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr, STATIC: tl.constexpr,
    OUT_DTYPE: tl.constexpr, USE_PDL: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    row = x_ptr + token * stride_x
    out = values_ptr + token * intermediate
    offs = tl.arange(0, BLOCK)
    if WHOLE_ROW:  # BLOCK ≥ intermediate: the row in registers
        y = _silu_and_mul_tile(row, offs, intermediate, OUT_DTYPE)
        scale = _row_scale(tl.max(tl.abs(y), 0), input_scale_ptr, STATIC)
        tl.store(out + offs, _quantize(y, scale, EMULATE_FP8), mask=offs < intermediate)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        if not STATIC:  # first walk: the row's amax
            for k in range(0, intermediate, BLOCK):
                y = _silu_and_mul_tile(row, k + offs, intermediate, OUT_DTYPE)
                amax = tl.maximum(amax, tl.abs(y))
        scale = _row_scale(tl.max(amax, 0), input_scale_ptr, STATIC)
        for k in range(0, intermediate, BLOCK):  # second walk: the same values, quantised
            y = _silu_and_mul_tile(row, k + offs, intermediate, OUT_DTYPE)
            tl.store(out + k + offs, _quantize(y, scale, EMULATE_FP8),
                     mask=k + offs < intermediate)
    tl.store(scale_ptr + token, scale)


def silu_and_mul_fp8(
    x: torch.Tensor,  # (T, 2I) [gate | up]
    input_scale: torch.Tensor | None = None,  # (1,) float32 static scale; None: per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of silu_and_mul_fp8_reference: (E4M3 (T, I), float32 (T, 1))."""
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    if x.dim() != 2 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul_fp8 takes (T, 2I) [gate | up]; got {tuple(x.shape)}")
    tokens, intermediate = x.shape[0], x.shape[1] // 2
    values = torch.empty(tokens, intermediate, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return values, scale
    whole_row = next_power_of_2(intermediate) <= ROW_IN_REGISTERS
    block = next_power_of_2(intermediate) if whole_row else SILU_TILE
    pdl = use_pdl(x)
    launchable(_silu_and_mul_fp8_kernel, x)[(tokens,)](
        x, x.stride(0), values, scale, input_scale if input_scale is not None else scale,
        intermediate,
        BLOCK=block, WHOLE_ROW=whole_row, STATIC=input_scale is not None,
        OUT_DTYPE=_TL_FLOAT[x.dtype], USE_PDL=pdl, EMULATE_FP8=interpreter_active(),
        num_warps=_num_warps(block), launch_pdl=pdl,
    )
    return values, scale
