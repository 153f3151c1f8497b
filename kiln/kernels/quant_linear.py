"""Quantised linear layers: torch references, a Triton GEMM that dequantises weights in
registers, and per-token FP8 activation quantisation.

Weight layouts (the quantisation contract, kiln/quant/*.py), W (N, K) = (out, in):

    fp8      weight E4M3 (N, K), weight_scale float32 (N,)        y = x_q·q^T · x_s · w_s
    int8-wo  weight int8 (N, K), scale float16 (N, K / G)          w = q · s
    int4-wo  qweight uint8 (N, K / 2) (column 2j low nibble, 2j+1 high), scale and zero
             float16 (N, K / G)                                     w = (q − z) · s

FP8 activations (W8A8): x_s = amax(|x_row|) / 448 per token (dynamic) or one calibrated
scale (static); x_q = E4M3(x / x_s). Or x arrives quantised already (ACT_PREQUANTIZED): E4M3
values with their per-row scales, made by the kernel that produced x (RMSNorm, SiLU-and-mul:
kiln/kernels/fused_quant.py), so the linear does no activation quantisation of its own.

`quant_linear` (Triton) is one kernel for the three formats. Program (n, m) owns output
columns [n·BLOCK_N, +BLOCK_N) of rows [m·BLOCK_M, +BLOCK_M) and walks K in BLOCK_K tiles,
each inside one quantisation group (BLOCK_K divides G), so a tile needs one scale (and zero)
per output column:

    int4 tile:  bytes (BLOCK_N, BLOCK_K/2) ─ low nibble ─ × x[:, k + 2j]     (even columns)
                                           └ high nibble ─ × x[:, k + 2j + 1] (odd columns)

Decode (M ≤ 16) is a weight stream like the bf16 GEMV (kiln/kernels/gemv.py), and follows
it: M = 1 multiplies in fp32 on the CUDA cores and reduces across K once at the end; M > 1
pads M to 16 and uses tl.dot; the first weight tile is loaded before the PDL wait (weights do
not depend on the previous kernel), and one tile is always in flight. For FP8 with dynamic
scales each program first reads its rows of x once for their amax (a few KB from L2), so no
separate quantisation kernel runs at decode. Large M (prefill, big batches) uses the same
kernel with 64×128 tiles for int8 up to 512 rows; beyond that (and for int4 above 16 rows)
`dequantize` writes the weight in bf16 once and cuBLAS multiplies; FP8 above 16 rows uses
`torch._scaled_mm` (row-wise scales) after `quantize_fp8_per_token`. The ops dispatcher
picks by these measured crossovers (kiln/kernels/ops.py, BENCHMARKS.md "Quantization").

Measured on the H200: the decode path converts every weight to fp32 on the CUDA cores, and
conversions issue at 16 per SM per clock against ~17 weight bytes per SM per clock of
bandwidth, so 1-byte weights stream at about half the copy rate (int8 246 tok/s, fp8 177
and int4 154 at batch 1, bf16 230). A tensor-core variant (M padded to 16, E4M3 operands
straight into tl.dot, int4 nibbles OR-ed into bf16 0x4300) measured slower still (fp8 116,
int8 110) with the tiles tried and was removed; a faster decode path needs packed
(two-per-instruction) dequantisation, see BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kiln.kernels.triton_utils import dot_dtype, interpreter_active, power_of_2_dividing, use_pdl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_ACT_SCALE = 1e-12  # a row of zeros: any positive scale gives q = 0

KIND_FP8, KIND_INT8, KIND_INT4 = 0, 1, 2
ACT_NONE, ACT_DYNAMIC, ACT_STATIC, ACT_PREQUANTIZED = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# References


def quantize_fp8_per_token_reference(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) → (E4M3 (M, K), float32 scales (M, 1)); one scale per row (dynamic) or the
    given (1,) per-tensor scale."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_ACT_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def fp8_linear_reference(
    x: torch.Tensor,  # (M, K)
    weight: torch.Tensor,  # (N, K) E4M3
    weight_scale: torch.Tensor,  # (N,) float32
    input_scale: torch.Tensor | None = None,  # (1,) float32: static; None: per token
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # (M, N) in x's dtype
    x_q, x_scale = quantize_fp8_per_token_reference(x, input_scale)
    return fp8_linear_prequantized_reference(x_q, x_scale, weight, weight_scale, bias, x.dtype)


def fp8_linear_prequantized_reference(
    x_q: torch.Tensor,  # (M, K) E4M3
    x_scale: torch.Tensor,  # (M, 1) float32
    weight: torch.Tensor,  # (N, K) E4M3
    weight_scale: torch.Tensor,  # (N,) float32
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # (M, N) in out_dtype
    """fp8_linear_reference after its activation quantisation: x arrives as E4M3 values and
    per-row scales (fp8_linear_reference of x = this of quantize_fp8_per_token_reference(x))."""
    y = (x_q.float() @ weight.float().T) * x_scale * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) and (N, K / G) scales → float32 (N, K)."""
    n, k = weight.shape
    groups = scale.shape[1]
    w = weight.float().reshape(n, groups, k // groups) * scale.float()[..., None]
    return w.reshape(n, k)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """packed uint8 (N, K / 2), (N, K / G) scales and zero points → float32 (N, K)."""
    n = qweight.shape[0]
    k = qweight.shape[1] * 2
    low, high = qweight & 0xF, qweight >> 4
    q = torch.stack([low, high], dim=-1).reshape(n, k).float()
    groups = scale.shape[1]
    w = (q.reshape(n, groups, k // groups) - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, k)


def weight_only_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K) @ dequantised float32 weight (N, K)^T [+ bias] in fp32, rounded once."""
    y = x.float() @ weight.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 x (already within ±448) as E4M3, rounded to nearest. EMULATE (Triton's CPU
    interpreter): round in fp32 first so the cast is exact, because the interpreter's own
    fp32 → fp8 cast loses the carry when rounding up crosses a power of 2 (1.953 → 1.0,
    not 2.0). On the GPU the hardware cast rounds correctly and EMULATE is False."""
    if EMULATE:
        magnitude = tl.abs(x)
        # E4M3 has 3 mantissa bits: a step of 2^(e - 3) in binade e; subnormals (below
        # 2^-6) share the 2^-9 step of the lowest binade.
        exponent = tl.floor(tl.log2(tl.maximum(magnitude, 0.015625)))
        step = tl.exp2(exponent - 3.0)
        rounded = tl.floor(magnitude / step + 0.5) * step
        x = tl.where(x < 0, -rounded, rounded)
    return x.to(tl.float8e4nv)


@dataclass(frozen=True)
class QuantGemmConfig:
    block_m: int
    block_n: int
    block_k: int  # clipped to the largest power of 2 dividing K and the group size
    num_warps: int
    num_stages: int = 1


MAX_GEMV_ROWS = 16


def default_quant_config(m: int, n: int) -> QuantGemmConfig:
    """Decode (M ≤ 16): narrow programs streaming long K tiles, as the bf16 GEMV; larger M:
    ordinary 64×128 GEMM tiles."""
    if m == 1:
        return QuantGemmConfig(1, 16 if n <= 4096 else 8, 512, 8 if n <= 4096 else 4)
    if m <= MAX_GEMV_ROWS:
        return QuantGemmConfig(16, 32, 256, 4)
    return QuantGemmConfig(64, 128, 64, 4, 3)


@triton.jit
def _load_weight_tile(w_ptr, rows, k, offs_w, K_W, KIND: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) weight tile (int4: (BLOCK_N, BLOCK_K / 2) bytes) at column k."""
    if KIND == 2:
        k = k // 2
    return tl.load(w_ptr + rows[:, None] * K_W + k + offs_w[None, :])


@triton.jit
def _tile_product(
    acc, x_ptr, stride_xm, m_offs, m_mask, k, w, scale_ptr, zero_ptr, stride_sn, rows, x_scale,
    KIND: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    EMULATE_FP8: tl.constexpr,
):
    """acc += x[:, k:k+BLOCK_K] · dequantised w^T (FP8 and per-channel int: unscaled;
    the epilogue applies those scales)."""
    if KIND == 2:
        HALF: tl.constexpr = BLOCK_K // 2
        offs = tl.arange(0, HALF)
        x_even_ptrs = x_ptr + m_offs[:, None] * stride_xm + k + 2 * offs[None, :]
        x_even = tl.load(x_even_ptrs, mask=m_mask[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_even_ptrs + 1, mask=m_mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + rows * stride_sn + k // GROUP).to(tl.float32)[:, None]
        low = (w & 0xF).to(tl.float32) - zero
        high = (w >> 4).to(tl.float32) - zero
        if not PER_CHANNEL:
            s = tl.load(scale_ptr + rows * stride_sn + k // GROUP).to(tl.float32)[:, None]
            low = low * s
            high = high * s
        if DOT:
            acc = tl.dot(x_even.to(DOT_DTYPE), tl.trans(low.to(DOT_DTYPE)), acc)
            acc = tl.dot(x_odd.to(DOT_DTYPE), tl.trans(high.to(DOT_DTYPE)), acc)
        else:
            acc += low * x_even + high * x_odd  # x (1, HALF) broadcast over the rows
    else:
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k + offs[None, :],
                    mask=m_mask[:, None], other=0.0).to(tl.float32)
        wf = w.to(tl.float32)
        if KIND == 0 and ACT != 3:  # (ACT_PREQUANTIZED: x is E4M3 already)
            # E4M3 of x / x_scale, as the reference: exact division, saturating.
            x = tl.div_rn(x, x_scale[:, None])
            x = to_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0), EMULATE_FP8).to(tl.float32)
        elif not PER_CHANNEL:
            wf = wf * tl.load(scale_ptr + rows * stride_sn + k // GROUP).to(tl.float32)[:, None]
        if DOT:
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(wf.to(DOT_DTYPE)), acc)
        else:
            acc += wf * x
    return acc


@triton.jit
def _quant_gemm_kernel(
    x_ptr, stride_xm,  # (M, K) float; E4M3 when ACT_PREQUANTIZED
    w_ptr,  # fp8 / int8 (N, K); uint8 (N, K / 2) for int4
    scale_ptr, stride_sn,  # fp8: (N,) float32; int: (N, K / G) float16
    zero_ptr,  # int4: (N, K / G) float16
    input_scale_ptr,  # fp8 static: (1,) float32; ACT_PREQUANTIZED: x's (M,) row scales
    bias_ptr,  # (N,) when HAS_BIAS
    y_ptr, stride_ym,  # (M, N)
    M, N, K, K_W,  # K_W: weight elements per row (K, or K / 2 for int4)
    KIND: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, USE_PDL: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    DOT: tl.constexpr = BLOCK_M > 1
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(cols, N - 1).to(tl.int64)  # unmasked weight loads; the store drops them
    m_offs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_offs < M
    if KIND == 2:
        offs_w = tl.arange(0, BLOCK_K // 2)
    else:
        offs_w = tl.arange(0, BLOCK_K)

    # Weights never depend on the previous kernel: start streaming before the PDL wait.
    w = _load_weight_tile(w_ptr, rows, 0, offs_w, K_W, KIND)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()

    x_scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if ACT == 1:  # per-token scales: this program's rows of x, once, for their amax
        amax = tl.zeros([BLOCK_M], tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k in range(0, K, BLOCK_K):
            xs = tl.load(x_ptr + m_offs[:, None] * stride_xm + k + offs_k[None, :],
                         mask=m_mask[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xs), 1))
        x_scale = tl.maximum(tl.div_rn(amax, 448.0), 1e-12)
    elif ACT == 2:
        x_scale = x_scale * tl.load(input_scale_ptr)
    elif ACT == 3:
        x_scale = tl.load(input_scale_ptr + m_offs, mask=m_mask, other=1.0)

    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    elif KIND == 2:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 2), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k in range(0, K - BLOCK_K, BLOCK_K):  # one tile always in flight
        w_next = _load_weight_tile(w_ptr, rows, k + BLOCK_K, offs_w, K_W, KIND)
        acc = _tile_product(acc, x_ptr, stride_xm, m_offs, m_mask, k, w, scale_ptr, zero_ptr,
                            stride_sn, rows, x_scale, KIND, ACT, GROUP, PER_CHANNEL, BLOCK_K,
                            DOT, DOT_DTYPE, EMULATE_FP8)
        w = w_next
    acc = _tile_product(acc, x_ptr, stride_xm, m_offs, m_mask, K - BLOCK_K, w, scale_ptr,
                        zero_ptr, stride_sn, rows, x_scale, KIND, ACT, GROUP, PER_CHANNEL,
                        BLOCK_K, DOT, DOT_DTYPE, EMULATE_FP8)
    if DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)[None, :]  # (1, BLOCK_N)

    if KIND == 0:
        w_scale = tl.load(scale_ptr + rows).to(tl.float32)
        out = out * x_scale[:, None] * w_scale[None, :]
    elif PER_CHANNEL:
        out = out * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & (cols[None, :] < N)
    tl.store(y_ptr + m_offs[:, None] * stride_ym + cols[None, :],
             out.to(y_ptr.dtype.element_ty), mask=mask)


def quant_linear(
    x: torch.Tensor,  # (M, K)
    kind: int,  # KIND_FP8 / KIND_INT8 / KIND_INT4
    weight: torch.Tensor,  # see the module docstring
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,  # fp8 static (1,)
    bias: torch.Tensor | None = None,
    *,
    x_scale: torch.Tensor | None = None,  # fp8: x is E4M3 already, with these (M, 1) scales
    out_dtype: torch.dtype | None = None,  # default x's dtype (needed with x_scale)
    config: QuantGemmConfig | None = None,
) -> torch.Tensor:  # (M, N) in out_dtype
    """Triton twin of fp8_linear_reference (with x_scale: fp8_linear_prequantized_reference)
    / weight_only_linear_reference(dequantize_*)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D and contiguous along K; got {tuple(x.shape)}")
    if x_scale is not None:
        if kind != KIND_FP8 or x.dtype != FP8_DTYPE or out_dtype is None:
            raise ValueError("a pre-quantised x (x_scale) must be fp8 E4M3 for an fp8 weight, "
                             "and needs out_dtype")
        if x_scale.shape != (x.shape[0], 1) or not x_scale.is_contiguous():
            raise ValueError(f"x_scale must be contiguous (M, 1) = ({x.shape[0]}, 1); "
                             f"got {tuple(x_scale.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    k_w = k // 2 if kind == KIND_INT4 else k
    if weight.shape[1] != k_w or not weight.is_contiguous():
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    group = k if kind == KIND_FP8 else k // scale.shape[1]
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    config = config or default_quant_config(m, n)
    block_k = min(config.block_k, power_of_2_dividing(k), power_of_2_dividing(group))
    if block_k < (32 if kind == KIND_INT4 else 16):
        raise ValueError(f"K {k} and group size {group} need a power-of-2 tile ≥ 16 dividing both")
    act = ACT_NONE
    if x_scale is not None:
        act, input_scale = ACT_PREQUANTIZED, x_scale
    elif kind == KIND_FP8:
        act = ACT_DYNAMIC if input_scale is None else ACT_STATIC
    pdl = use_pdl(x)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _quant_gemm_kernel[grid](
        x, x.stride(0), weight, scale, scale.stride(0) if scale.dim() == 2 else 1,
        zero if zero is not None else scale,
        input_scale if input_scale is not None else scale,
        bias if bias is not None else scale,
        y, y.stride(0),
        m, n, k, k_w,
        KIND=kind, ACT=act, GROUP=group, PER_CHANNEL=group == k, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype(y),  # y's dtype is x's, but for a pre-quantised (E4M3) x
        USE_PDL=pdl, EMULATE_FP8=interpreter_active(),
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    return y


@triton.jit
def _dequantize_kernel(w_ptr, scale_ptr, stride_sn, zero_ptr, out_ptr, N, K, K_W,
                       KIND: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of the dense weight, BLOCK_K within one group. Every row's
    tile is stored as one contiguous run (an int4 byte's two nibbles joined into adjacent
    columns in registers first: two stores at a stride of two elements each, the old way, ran
    at a fraction of the copy rate)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    s = tl.load(scale_ptr + rows64 * stride_sn + k // GROUP, mask=row_mask, other=0.0)
    s = s.to(tl.float32)[:, None]
    if KIND == 2:
        offs = tl.arange(0, BLOCK_K // 2)
        w = tl.load(w_ptr + rows64[:, None] * K_W + k // 2 + offs[None, :],
                    mask=row_mask[:, None], other=0)
        z = tl.load(zero_ptr + rows64 * stride_sn + k // GROUP, mask=row_mask, other=0.0)
        z = z.to(tl.float32)[:, None]
        low = ((w & 0xF).to(tl.float32) - z) * s  # column 2j
        high = ((w >> 4).to(tl.float32) - z) * s  # column 2j + 1
        values = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    else:
        offs = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows64[:, None] * K_W + k + offs[None, :], mask=row_mask[:, None],
                    other=0)
        values = w.to(tl.float32) * s
    columns = k + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows64[:, None] * K + columns[None, :],
             values.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def dequantize(kind: int, weight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, dtype: torch.dtype, *, block_n: int = 32,
               block_k: int = 256) -> torch.Tensor:
    """int8 / int4 weights → (N, K) in `dtype`, one pass (twin of dequantize_int8/int4).
    A tile is block_n rows × block_k columns, block_k clipped to what divides K and the
    group size (H200: 3.2-4.2 TB/s on Llama-3.1-8B's linears; tiles of 16-64 rows and
    128-512 columns within 8 % of each other, results/s18-h200-dequantize-bench.json)."""
    n = weight.shape[0]
    k = weight.shape[1] * (2 if kind == KIND_INT4 else 1)
    group = k // scale.shape[1]
    block_k = min(block_k, k & -k, group & -group)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    pdl = use_pdl(weight)
    _dequantize_kernel[(triton.cdiv(n, block_n), k // block_k)](
        weight, scale, scale.stride(0), zero if zero is not None else scale, out, n, k,
        weight.shape[1], KIND=kind, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return out


@triton.jit
def _per_token_fp8_kernel(
    x_ptr, stride_xm, q_ptr, stride_qm, scale_ptr, input_scale_ptr, K,
    STATIC: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    EMULATE_FP8: tl.constexpr,
):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if STATIC:
        scale = tl.load(input_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k + offs, mask=k + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.div_rn(tl.max(amax, 0), 448.0), 1e-12)
    for k in range(0, K, BLOCK_K):
        mask = k + offs < K
        x = tl.load(x_ptr + row * stride_xm + k + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
        tl.store(q_ptr + row * stride_qm + k + offs, to_e4m3(q, EMULATE_FP8), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_fp8_per_token(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of quantize_fp8_per_token_reference: (E4M3 (M, K), float32 (M, 1))."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D and contiguous along K; got {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    pdl = use_pdl(x)
    _per_token_fp8_kernel[(m,)](
        x, x.stride(0), q, q.stride(0), scale,
        static_scale if static_scale is not None else scale, k,
        STATIC=static_scale is not None, BLOCK_K=min(2048, triton.next_power_of_2(k)),
        USE_PDL=pdl, EMULATE_FP8=interpreter_active(), num_warps=4, launch_pdl=pdl,
    )
    return q, scale


def quant_kernels_supported(x: torch.Tensor) -> bool:
    """Whether the Triton path can take x (CUDA, or the interpreter on the CPU)."""
    return x.is_cuda or interpreter_active()
