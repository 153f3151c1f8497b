"""int8 and int4 weight-only linears (W8A16, W4A16) of 17-128 rows that the skinny kernels'
Gluon twins do not take (65-128: short prefills, mixed steps, big decode batches; 17-64 where
a twin does not run, e.g. int8 with K not a multiple of 128): the skinny kernels' swap-AB
Triton GEMMs at 128 token columns and 64 or 128 weight rows a program
(`default_int_gemm_config`), with a token-block grid axis.

    int8  y (M, N) = x (M, K) · (q · s)^T          q int8 (N, K), s float16 (N, 1) per
          channel or (N, K / G) per group of G inputs (G a multiple of 16), on skinny_fp8's
          kernel with W8A16 (as kernels/skinny_int8.py at 1-16 rows)
    int4  y (M, N) = x (M, K) · ((q − z) · s_g)^T   q packed int4 (N, K / 2), s_g, z float16
          (N, K / G), integer zero points, on kernels/skinny_int4.py's Triton kernel

Why: above the Gluon twins' 64 rows, ops dequantised the whole weight to bf16 every call and
multiplied on cuBLAS: for Llama-3.1-8B int8-wo 7 GB read + 14 GB written + 14 GB read again,
int4-wo 4.8 + 14 + 14 GB; a 128-token prompt's TTFT was 12.5 ms for both on the H200 against
6.9 in bf16. Here the weights are read once (one token block holds all the rows) and turned
into bf16 in registers (int8 by Triton's bit-operation lowering, int4 by the skinny kernel's
LOP3 assembly), x (128 tokens x a K tile) from shared memory. A 128-token prompt:

    bytes  7.0 GB int8 / 3.9 GB int4 weights       ~1.8 / ~1.0 ms at 3.9 TB/s
    FLOPs  2 x 128 x 7.0 G = 1.8 TFLOP             ~2.4 ms at 736 TFLOP/s (bf16 dense)

so the GEMM is near balance at 128 rows, and the prediction was a 128-token TTFT near
bf16's. Measured on the H200 (2026-12-05, BENCHMARKS.md): int8-wo's 128-token TTFT 12.52 →
9.25 ms and batch-128 decode 11,319 → 16,689 tok/s. Not at bf16's 6.9 ms: int8 gate|up
takes 89 µs at 128 rows (1.3 T weights/s, ~270 TFLOP/s), bound by neither bytes nor FLOPs;
most likely the conversion is not hidden behind the MMA (the same warps convert, then wait
on the wgmma; not profiled). int4's unpacking costs more: faster than dequantising only
where its K is not split (gate|up 141 against 165 µs), so int4 takes this kernel only there
(`chosen_config`).
sm_90 PTX (compiled on the CPU): m64n128k16 bf16 wgmma, no conversion instructions, no
register spills (int8 126 registers, int4 238 at 128 x 128 on 8 warps).

Rows beyond M in the token block read as 0 (masked loads), so 65 rows cost what 128 do.
int8 per-channel scales are applied once, after the MMA; group scales (`--group-size`,
GGUF Q8_0's 32) multiply each weight in registers before it (K tiles inside one group: one
scale load a row a tile; the int8 → fp32 by int_gemv's bit trick, not a conversion
instruction; the fp32 product rounded once to bf16, as the Gluon twin at 1-64 rows). int4
with fractional zero points keeps the dequantise path. KILN_INT_GEMM=0 keeps the dequantise path
for both (the A/B switch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.kernels.skinny_fp8 import _skinny_fp8_kernel, sum_split_k_partials
from kiln.kernels.skinny_int4 import _skinny_int4_kernel, skinny_int4_unsupported_reason
from kiln.kernels.skinny_int8 import int8_weight_reason
from kiln.kernels.triton_utils import env_flag, has_sm90, interpreter_active, use_pdl

MAX_ROWS = 128  # one token block of 128 columns: the weights are read once
NUM_SMS = 132  # H100 / H200: only for the split rule
INT4_SUBTILE = 128  # the int4 kernel's K step (16 words of 8 nibbles)
PARTIAL_ELEMENTS = 1 << 21  # fp32 split-K partials at most (8 MiB)


@dataclass(frozen=True)
class IntGemmConfig:
    block_n: int = 128  # weight rows per program: the MMA's M (two warpgroups of 64)
    block_k: int = 64  # int8: K per pipelined tile (clipped to divide K); int4: 128 always
    tokens: int = 128  # token columns per program (the MMA's N)
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_n", "block_k", "tokens"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of 2 ≥ 16; got {value}")
        if self.block_n < 64:
            raise ValueError(f"block_n must be ≥ 64 (a wgmma is 64 rows per warpgroup); got "
                             f"{self.block_n}")
        if self.tokens > 256:
            raise ValueError(f"tokens must be ≤ 256 (the MMA's N); got {self.tokens}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be ≥ 1; got {self}")


def default_int_gemm_config(m: int, n: int, k: int) -> IntGemmConfig:
    """The H200 sweep's rule (benchmarks/skinny_int8_bench.py --rows 96 128, BENCHMARKS.md
    2026-12-05): 64 weight rows a program (one warpgroup) when 128 would leave fewer than a
    quarter as many column blocks as SMs (Llama-3.1-8B: o and down, N = 4,096), else 128;
    K split in at most 4 while the programs are fewer than the SMs, each split keeps ≥ 8
    tiles of 64 and the fp32 partials (split x M x N) stay within PARTIAL_ELEMENTS (8 MiB:
    at 128 rows q|k|v split in 4 wrote and re-read 12.6 MB and took 36.8 µs, in 2 29.8). So:
    q|k|v in 2, o and down in 4, gate|up unsplit (int8 at 128 rows 29.8 / 19.6 / 50.0 /
    89.3 µs, against 36.8 / 22.4 / 53.3 / 89.3 for the first guess's 128 rows and splits
    of 4)."""
    block_n = 64 if 4 * triton.cdiv(n, 128) < NUM_SMS else 128
    column_blocks = triton.cdiv(n, block_n)
    tiles = k // min(64, k & -k)
    split_k = 1
    while (column_blocks * split_k < NUM_SMS and tiles // (2 * split_k) >= 8 and split_k < 4
           and 2 * split_k * m * n <= PARTIAL_ELEMENTS):
        split_k *= 2
    return IntGemmConfig(block_n=block_n, split_k=split_k, num_warps=block_n // 16)


def _int8_reason(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> str | None:
    rows = x.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        return f"x has {rows} rows; this kernel takes 1-{MAX_ROWS}"
    reason = int8_weight_reason(x, weight)
    if reason is not None:
        return reason
    n, k = weight.shape
    if k == 0 or k % 16:
        return f"K={k} must be a positive multiple of 16 (the MMA's K step)"
    if (scale.dim() != 2 or scale.shape[0] != n or scale.dtype != torch.float16
            or not scale.is_contiguous()):
        return (f"scale must be contiguous float16 ({n}, groups) (one per output channel or "
                f"per group of K / groups inputs); got {tuple(scale.shape)} {scale.dtype}")
    groups = scale.shape[1]
    if groups < 1 or k % groups or (groups > 1 and (k // groups) % 16):
        return (f"the group size K / {groups} must be a whole multiple of 16 (the MMA's K "
                f"step) for K={k}")
    return None


def int_gemm_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                zero: torch.Tensor | None,
                                bias: torch.Tensor | None) -> str | None:
    """Why int_gemm cannot take these inputs (the caller then dequantises), or None. `zero`
    None: int8 weights (N, K); given: packed int4 (N, K / 2) uint8 with integer zero
    points (the caller's promise, as for kernels/skinny_int4.py)."""
    if x.dim() != 2 or not x.is_contiguous():  # both kernels index x's rows by K
        return f"x must be a contiguous (M, K) tensor; got {tuple(x.shape)}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x must be bfloat16 or float16; got {x.dtype}"
    if not (x.is_cuda or interpreter_active()):
        return (f"x is on {x.device}: the Triton kernels run on CUDA tensors, or on the CPU "
                "under TRITON_INTERPRET=1")
    if zero is None:
        reason = _int8_reason(x, weight, scale)
    else:
        reason = skinny_int4_unsupported_reason(x, weight, scale, zero, rows_limit=MAX_ROWS)
    if reason is not None:
        return reason
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        return f"bias must be a contiguous ({n},) tensor; got {tuple(bias.shape)}"
    for name, tensor in (("weight", weight), ("scale", scale), ("zero", zero), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            return f"{name} is on {tensor.device} but x is on {x.device}"
    return None


def chosen_config(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, bias: torch.Tensor | None) -> IntGemmConfig | None:
    """The tiling ops launches this linear with (after the skinny kernels declined it), or
    None when it does not come here: up to 128 rows on Hopper (bf16 wgmma, the skinny
    kernels' machine), KILN_INT_GEMM not 0, and inputs the kernels take. In practice 65-128
    rows, and 17-64 where the Gluon twins do not run (K not a multiple of 128 for int8, e.g.
    SmolLM2's 576). int4 only where its GEMM needs no K split: measured faster than
    dequantise + cuBLAS there (gate|up at 128 rows 140.9 µs against 165.2) and slower
    wherever it split (q|k|v 49.9 against 35.6, o 32.7 against 24.3; down 79.4 against
    83.8, a wash): its unpacking, a few instructions a weight, is not hidden behind the MMA,
    and a split adds the partials' round trip."""
    if not (x.shape[0] <= MAX_ROWS and has_sm90(x) and env_flag("KILN_INT_GEMM", default=True)
            and int_gemm_unsupported_reason(x, weight, scale, zero, bias) is None):
        return None
    rows, k = x.shape
    config = default_int_gemm_config(rows, weight.shape[0], k)
    return config if zero is None or config.split_k == 1 else None


def int_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
             config: IntGemmConfig | None = None) -> torch.Tensor:
    """Triton twin of weight_only_linear_reference(x, dequantize_int8(weight, scale), bias),
    or of dequantize_int4(weight, scale, zero) with `zero`: the GEMM and, with split-K,
    skinny_fp8's combining launch."""
    reason = int_gemm_unsupported_reason(x, weight, scale, zero, bias)
    if reason is not None:
        raise ValueError(f"int_gemm: {reason}")
    return launch_int_gemm(x, weight, scale, zero, bias, config=config)


def launch_int_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                    config: IntGemmConfig | None = None) -> torch.Tensor:
    """int_gemm for inputs int_gemm_unsupported_reason already accepted (ops checked them
    once, in `chosen_config`, and passes the config it chose)."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    config = config or default_int_gemm_config(m, n, k)
    int4 = zero is not None
    # int8 group scales: a K tile inside one group (one scale a row a tile)
    group = 0 if int4 or scale.shape[1] == 1 else k // scale.shape[1]
    block_k = INT4_SUBTILE if int4 else min(config.block_k, k & -k, (group & -group) or k)
    tiles = k // block_k
    split_k = min(config.split_k, tiles)
    pdl = use_pdl(x)
    gpu = not interpreter_active()
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32,
                                             device=x.device)
    grid = (triton.cdiv(n, config.block_n), split_k, triton.cdiv(m, config.tokens))
    bias_or_placeholder = bias if bias is not None else scale
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl)
    if int4:
        _skinny_int4_kernel[grid](
            x, weight.view(torch.int32), scale, zero, scale.stride(0), bias_or_placeholder,
            out, m, n, k, split_k, GROUP=k // scale.shape[1], HAS_BIAS=bias is not None,
            SPLIT=split_k > 1, BLOCK_N=config.block_n, SUBTILES=1, TOKENS=config.tokens,
            PREFETCH_TILES=0, USE_PDL=pdl, GPU_ASM=gpu, FLOAT16=x.dtype == torch.float16,
            PAIRED=True, **launch)
    else:
        _skinny_fp8_kernel[grid](
            x, scale, weight, scale, bias_or_placeholder, out, y, scale, m, n, k, split_k,
            HAS_BIAS=bias is not None, MODE="unsplit" if split_k == 1 else "reduce",
            BLOCK_N=config.block_n, BLOCK_K=block_k, TOKENS=config.tokens, PROMOTE=0,
            PREFETCH_TILES=0, USE_PDL=pdl, GPU_FENCE=gpu, W8A16=True, GROUP=group, **launch)
    if split_k > 1:
        sum_split_k_partials(out, split_k, bias, y, pdl)
    return y
