"""Decode GEMV for quantised weights (M ≤ 16 rows) on the tensor cores, and a dequantise
kernel for the int formats at large M (their weights → bf16 once, then cuBLAS).

Why tensor cores at M = 1: a CUDA-core GEMV must turn every weight into fp32 before its FMA,
and conversions run at 16 per SM per clock on Hopper, while the H200 streams ~17 weight
bytes per SM per clock: an int8 or fp8 weight stream is conversion-bound at about half the
copy rate (the first version of this file's M = 1 path measured 245 tok/s int8 and 177
fp8 at batch 1, against 230 bf16). Padding M to 16 and using tl.dot costs nothing that
matters (the tensor cores have ~100× the needed rate) and moves the conversion into the MMA:

    fp8   x is quantised per token first (quantize_fp8_per_token, one small kernel), and
          E4M3 x · E4M3 w go to the tensor cores as they are: no conversion at all.
    int8  w int8 → bf16 (exact: |q| ≤ 127 needs 7 bits) against x as it is; the group
          scale multiplies each tile's partial sum.
    int4  each nibble q becomes the bf16 number 128 + q by OR-ing it into 0x4300's mantissa
          (no conversion instruction); Σ x·(q − z) = dot(x, 128 + q) − (128 + z)·Σ x,
          so the zero point costs one multiply per output and tile.

Program p owns BLOCK_N output columns and walks K in tiles inside one quantisation group,
first weight tile loaded before the PDL wait (weights never depend on the previous kernel),
one tile always in flight, as kiln/kernels/gemv.py. Under Triton's CPU interpreter the dot
operands are fp32 (its bf16/fp8 arithmetic is not trustworthy); the values are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kiln.kernels.triton_utils import interpreter_active, use_pdl

KIND_FP8, KIND_INT8, KIND_INT4 = 0, 1, 2
GEMV_ROWS = 16  # one tl.dot tile of rows


def decode_block_n(n: int) -> int:
    """Columns per program: enough programs to fill 132 SMs several times over (4096 / 16 =
    256), wider tiles for the wide matrices."""
    return 16 if n <= 4096 else 32


@triton.jit
def _load_tile(w_ptr, rows, k, K_W, KIND: tl.constexpr, BLOCK_K: tl.constexpr):
    if KIND == 2:
        offs = tl.arange(0, BLOCK_K // 2)
        return tl.load(w_ptr + rows[:, None] * K_W + k // 2 + offs[None, :])
    offs = tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + rows[:, None] * K_W + k + offs[None, :])


@triton.jit
def _tile(acc, x_ptr, stride_xm, m_mask, k, w, scale_ptr, zero_ptr, stride_sn, rows,
          KIND: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
          BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    m_offs = tl.arange(0, 16)
    if KIND == 0:  # x already E4M3 (per-token quantised), w E4M3
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k + offs[None, :],
                    mask=m_mask[:, None], other=0.0)
        if EMULATE:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    elif KIND == 1:
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k + offs[None, :],
                    mask=m_mask[:, None], other=0.0)
        if EMULATE:
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # |q| ≤ 127 is exact in bf16 (8 significant bits); x stays as it is
            part = tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        if PER_CHANNEL:
            acc += part
        else:
            acc += part * tl.load(scale_ptr + rows * stride_sn + k // GROUP).to(tl.float32)[None, :]
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        offs = tl.arange(0, HALF)
        x_even_ptrs = x_ptr + m_offs[:, None] * stride_xm + k + 2 * offs[None, :]
        x_even = tl.load(x_even_ptrs, mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x_even_ptrs + 1, mask=m_mask[:, None], other=0.0)
        if EMULATE:
            low = (w & 0xF).to(tl.float32) + 128.0
            high = (w >> 4).to(tl.float32) + 128.0
            part = tl.dot(x_even.to(tl.float32), tl.trans(low), input_precision="ieee")
            part = tl.dot(x_odd.to(tl.float32), tl.trans(high), part, input_precision="ieee")
        else:
            # 0x4300 is bf16 128.0 with an empty 7-bit mantissa: OR-ing q (< 16) into it
            # gives the bf16 number 128 + q exactly.
            low = ((w & 0xF).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
            high = ((w >> 4).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
            part = tl.dot(x_even.to(tl.bfloat16), tl.trans(low))
            part = tl.dot(x_odd.to(tl.bfloat16), tl.trans(high), part)
        x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)  # (16,)
        zero = tl.load(zero_ptr + rows * stride_sn + k // GROUP).to(tl.float32)
        part = part - x_sum[:, None] * (zero + 128.0)[None, :]
        if PER_CHANNEL:
            acc += part
        else:
            acc += part * tl.load(scale_ptr + rows * stride_sn + k // GROUP).to(tl.float32)[None, :]
    return acc


@triton.jit
def _quant_gemv_kernel(
    x_ptr, stride_xm,  # (M, K): E4M3 for fp8 (quantised per token), else bf16 / fp16
    x_scale_ptr,  # fp8: (M, 1) float32 per-token scales
    w_ptr, scale_ptr, stride_sn, zero_ptr,  # the contract's layouts
    bias_ptr,
    y_ptr, stride_ym,
    M, N, K, K_W,
    KIND: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr, USE_PDL: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(cols, N - 1).to(tl.int64)  # unmasked weight loads; the store drops them
    m_offs = tl.arange(0, 16)
    m_mask = m_offs < M
    w = _load_tile(w_ptr, rows, 0, K_W, KIND, BLOCK_K)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros((16, BLOCK_N), tl.float32)
    for k in range(0, K - BLOCK_K, BLOCK_K):
        w_next = _load_tile(w_ptr, rows, k + BLOCK_K, K_W, KIND, BLOCK_K)
        acc = _tile(acc, x_ptr, stride_xm, m_mask, k, w, scale_ptr, zero_ptr, stride_sn, rows,
                    KIND, GROUP, PER_CHANNEL, BLOCK_K, EMULATE)
        w = w_next
    acc = _tile(acc, x_ptr, stride_xm, m_mask, K - BLOCK_K, w, scale_ptr, zero_ptr, stride_sn,
                rows, KIND, GROUP, PER_CHANNEL, BLOCK_K, EMULATE)
    if KIND == 0:
        x_scale = tl.load(x_scale_ptr + m_offs, mask=m_mask, other=0.0)
        acc = acc * x_scale[:, None] * tl.load(scale_ptr + rows).to(tl.float32)[None, :]
    elif PER_CHANNEL:
        acc = acc * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & (cols[None, :] < N)
    tl.store(y_ptr + m_offs[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


def quant_gemv(
    x: torch.Tensor,  # (M ≤ 16, K): E4M3 for fp8, else bf16 / fp16
    kind: int,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,  # fp8: (M, 1) float32
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    block_n: int | None = None,
    block_k: int = 512,
) -> torch.Tensor:  # (M, N)
    """The decode GEMV; twin of quant_linear's references (for fp8, given the per-token
    quantised x and its scales)."""
    m, k = x.shape
    if m > GEMV_ROWS:
        raise ValueError(f"the quantised GEMV takes at most {GEMV_ROWS} rows, got {m}")
    n = weight.shape[0]
    k_w = k // 2 if kind == KIND_INT4 else k
    if weight.shape[1] != k_w or not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    group = k if kind == KIND_FP8 else k // scale.shape[1]
    block_k = min(block_k, k & -k, group & -group)
    if block_k < (32 if kind == KIND_INT4 else 16):
        raise ValueError(f"K {k} and group size {group} need a power-of-2 tile ≥ 16 dividing both")
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    block_n = block_n or decode_block_n(n)
    pdl = use_pdl(x)
    _quant_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), x_scale if x_scale is not None else scale,
        weight, scale, scale.stride(0) if scale.dim() == 2 else 1,
        zero if zero is not None else scale, bias if bias is not None else scale,
        y, y.stride(0), m, n, k, k_w,
        KIND=kind, GROUP=group, PER_CHANNEL=group == k, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EMULATE=interpreter_active(), USE_PDL=pdl,
        num_warps=4, num_stages=1, launch_pdl=pdl,
    )
    return y


@triton.jit
def _dequantize_kernel(w_ptr, scale_ptr, stride_sn, zero_ptr, out_ptr, N, K, K_W,
                       KIND: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K
    row_mask = rows < N
    s = tl.load(scale_ptr + rows * stride_sn + k // GROUP, mask=row_mask, other=0.0)
    s = s.to(tl.float32)[:, None]
    if KIND == 2:
        offs = tl.arange(0, BLOCK_K // 2)
        w = tl.load(w_ptr + rows[:, None] * K_W + k // 2 + offs[None, :], mask=row_mask[:, None],
                    other=0)
        z = tl.load(zero_ptr + rows * stride_sn + k // GROUP, mask=row_mask, other=0.0)
        z = z.to(tl.float32)[:, None]
        low = ((w & 0xF).to(tl.float32) - z) * s
        high = ((w >> 4).to(tl.float32) - z) * s
        dst = out_ptr + rows[:, None] * K + k + 2 * offs[None, :]
        tl.store(dst, low.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
        tl.store(dst + 1, high.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        offs = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K_W + k + offs[None, :], mask=row_mask[:, None],
                    other=0)
        tl.store(out_ptr + rows[:, None] * K + k + offs[None, :],
                 (w.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def dequantize(kind: int, weight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """int8 / int4 weights → (N, K) in `dtype`, one pass (twin of dequantize_int8/int4)."""
    n = weight.shape[0]
    k = weight.shape[1] * (2 if kind == KIND_INT4 else 1)
    group = k // scale.shape[1]
    block_k = min(128, k & -k, group & -group)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    pdl = use_pdl(weight)
    _dequantize_kernel[(triton.cdiv(n, 32), k // block_k)](
        weight, scale, scale.stride(0), zero if zero is not None else scale, out, n, k,
        weight.shape[1], KIND=kind, GROUP=group, BLOCK_N=32, BLOCK_K=block_k, USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )
    return out
