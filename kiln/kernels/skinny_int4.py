"""W4A16 linear for decode (≤ 16 tokens; ≤ 32 in the Gluon twin) on the tensor cores: a
swap-AB skinny GEMM whose int4 weights become bf16 with one LOP3 per two weights.

    y (M, N) = x (M, K) · W^T,   W = (q − z) · s,  q int4 packed 8 to a 32-bit word
    (nibble i of word j = input column 8j + i: kiln/quant/quantize.pack_int4), s and z
    float16 per output row and group of G inputs (G a multiple of 128).

Why: above one row, int4 decode ran on quant_linear's tl.dot kernel, which converts every
weight with `cvt` (two per byte) and streamed at 0.2-0.6 TB/s on the H200, so batch 16 decoded
slower per token than batch 1. Here the multiply-adds go to the tensor cores, which sit idle at
decode, and the CUDA cores only unpack:

    lop3(word >> 4l, 0x000F000F, 0x43004300)  →  bf16x2 (128 + q_l, 128 + q_{l+4}),  l = 0..3

(the "magic number" conversion of FasterTransformer and Marlin: a nibble OR-ed into the
mantissa of bf16 128.0, whose 7-bit mantissa counts in steps of 1 there), then one packed FMA
(t · 1 − (128 + z)) per pair: bf16 (q − z). Per word (8 weights): 3 shifts, 4 LOP3, 4 packed
FMAs. float16 activations use 1024.0 (0x6400) the same way.

Swap-AB as kernels/skinny_fp8.py: the kernel computes y^T = W · x^T, the weight rows fill the
MMA's M (BLOCK_N = 64 per program) and the tokens its N (padded to TOKENS = 16). A 128-column
sub-tile's eight nibble planes, (BLOCK_N, 16) each, are joined along K into one (BLOCK_N, 128)
operand; the dot's K order only has to match on both sides, so the planes are joined in the
order that keeps each register pair the assembly wrote adjacent (no byte permutes; 3.2
instead of 3.6 SASS instructions a weight, static count) and x, 1/4 as many elements at
64 rows, is permuted in registers to match (_subtile). Each sub-tile's fp32 partial is
scaled by its group's s once (BLOCK_N × TOKENS multiplies per 128 × BLOCK_N weights):

    acc (BLOCK_N, TOKENS) += s_g · Σ_k (q_k − z_g) · x_k

Exactness: the zero points must be whole numbers (kiln's builds, AWQ, GPTQ, compressed-
tensors; kiln/quant/int4.integer_zero_points checks once per layer, and GGUF Q4_1's
fractional ones go elsewhere): 128 + z is then exact in bf16 (whose step is 1 at 128), so is
q − z, products accumulate in fp32 and the scale is applied in fp32; against the fp32
reference only the summation order differs. A fractional z would round to an integer.

Split-K (the H200 has 132 SMs; q|k|v, o and down have 64-96 column blocks of 64 rows) as
skinny_fp8's "reduce": fp32 partials and skinny_fp8's combining kernel. PDL: the weights of
the first tiles are asked of L2 before the wait on the previous kernel (which produces x).

Measured on the H200 (benchmarks/skinny_int4_sweep.py, BENCHMARKS.md): this Triton kernel
streams ~1.0 TB/s of weights at M = 1, 4 and 16 alike, against quant_linear's 0.2-0.6 TB/s
above one row, and waits on shared memory (Nsight Compute: the L1/shared pipe 69 % busy),
because the compiler routes the unpacked bf16 tile (4x the packed bytes) through shared
memory into the wgmma operand layout. On sm_90 the launcher therefore runs the Gluon twin
(kernels/skinny_int4_gluon.py: explicit layouts, each thread loads the words of its own
fragment, no round trip; 1.2-1.9 TB/s), which also takes one-row linears larger than
4096 x 4096 from int_gemv (takes_batch1). Random Llama-3.1-8B int4-wo decode: batch 1 287 →
313 tok/s, batch 4 394 → 1,231, batch 16 826 → 4,049. This kernel stays for other GPUs,
for KILN_SKINNY_INT4_GLUON=0, and as the CPU-tested twin.

Under the CPU interpreter (no inline assembly, and bf16 arithmetic that is wrong) the same
kernel unpacks with shifts and masks, joins and permutes in the same orders, and multiplies
in fp32: the CPU tests check that twin and the orders; the same tests on a GPU (and
tests/gpu/test_quant_gpu.py at real shapes) check the assembly.

The torch reference is quant_linear.dequantize_int4 + weight_only_linear_reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kiln.kernels import int_gemv, skinny_int4_gluon
from kiln.kernels.int4_unpack import ASM_BF16, ASM_F16
from kiln.kernels.skinny_fp8 import NUM_SMS, _prefetch_l2, sum_split_k_partials
from kiln.kernels.triton_utils import env_flag, has_sm90, interpreter_active, use_pdl

MAX_TOKENS = 16  # the MMA's N at most (the Triton kernel; the Gluon twin's is its MAX_TOKENS)
TOKEN_COLUMNS = (8, 16, 32, 64)
SUBTILE = 128  # input columns per sub-tile: 16 words, one K = 16 dot per nibble position
MAX_SPLIT_K = 16


@dataclass(frozen=True)
class SkinnyInt4Config:
    """Launch parameters; `default_skinny_int4_config` picks them, skinny_int4_sweep measures."""

    block_n: int = 64  # weight rows per program: the MMA's M (wgmma: 64 per warpgroup)
    subtiles: int = 1  # 128-column sub-tiles per pipelined tile
    tokens: int = 16  # the MMA's N: M padded to 8 or 16 (raised to 16 when M > 8); the
    # Gluon twin also 32 (raised to the smallest that holds M)
    split_k: int = 1  # programs per column block along K (clipped to the tiles)
    num_warps: int = 4
    num_stages: int = 3
    paired: bool = True  # x permuted to the unpacked weights' pairs (no permutes per weight)
    pdl: bool = True
    # On sm_90 CUDA: the Gluon twin (kernels/skinny_int4_gluon.py: split_k and tokens apply,
    # 64-row programs), which unpacks straight into the wgmma operand registers.
    gluon: bool = True
    # Gluon: 0 loads each sub-tile's weights one ahead into registers; 2..8 stream them
    # through a ring of that many sub-tiles in shared memory (asynchronous copies, stages - 1
    # in flight).
    stages: int = 0

    def __post_init__(self):
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of 2 ≥ 16; got {self.block_n}")
        if self.subtiles < 1 or self.subtiles & (self.subtiles - 1):
            raise ValueError(f"subtiles must be a power of 2 ≥ 1; got {self.subtiles}")
        if self.tokens not in TOKEN_COLUMNS:
            raise ValueError(f"tokens must be 8, 16, 32 or 64 (the MMA's N; 32 and 64 the "
                             f"Gluon twin only); got {self.tokens}")
        if self.stages != 0 and not 2 <= self.stages <= 8:
            raise ValueError(f"stages must be 0 (registers) or 2..8; got {self.stages}")
        if not 1 <= self.split_k <= MAX_SPLIT_K or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k must be 1..{MAX_SPLIT_K}, num_warps and num_stages "
                             f"≥ 1; got {self}")


@functools.lru_cache(maxsize=256)  # per linear call at decode: computed once per shape
def default_skinny_int4_config(m: int, n: int, k: int, gluon: bool = True) -> SkinnyInt4Config:
    """The H200 sweeps' rules (benchmarks/skinny_int4_sweep.py; Llama-3.1-8B shapes, M = 1, 4,
    16). The Gluon twin (results/s16-h200-skinny-int4-gluon-sweep-summary.txt): 8 token
    columns up to 8 rows, and K split while that keeps the programs at most ~4 per SM (512)
    and each ≥ 4 tiles: q|k|v in 4, o and down in 8; within 3 % of each shape's best at M = 1
    and 4. Up to 8 rows, programs of ≥ 12 sub-tiles (gate|up, down) take the staged variant
    instead (stages=4; gate|up's K split in 4). The Triton kernel
    (results/s16-h200-skinny-int4-sweep.json, 77 tilings): 64-row programs, one 128-column
    sub-tile per stage, 3 stages (small programs, four per SM, to overlap one another's waits
    on shared memory), and K split until there are about three programs per SM while each
    keeps ≥ 8 tiles: q|k|v and o in 4, down in 8, gate|up unsplit; within 5 % of each shape's
    best at M = 4 and 16."""
    block_n, subtiles = 64, 1
    tiles = max(1, k // (SUBTILE * subtiles))
    column_blocks = triton.cdiv(n, block_n)
    split_k = 1
    if gluon:
        while column_blocks * split_k * 2 <= 4 * 128 and tiles // (2 * split_k) >= 4:
            split_k *= 2
        if m <= 8 and tiles // split_k >= 12:
            # Long programs (gate|up unsplit, down in 8): x and the groups' scales staged once
            # a program, the weights through a 4-sub-tile ring; gate|up split to 8 sub-tiles
            # a program. H200 (results/s17-h200-skinny-int4-one-barrier-ab.json): gate|up
            # 31.6 → 28.3 µs at one row, down 18.9 → 17.8; q|k|v and o (programs of 8 and 4
            # sub-tiles) within ±3 % either way, so they keep the register path.
            if split_k == 1:
                split_k = min(MAX_SPLIT_K, max(1, tiles // 8))
            return SkinnyInt4Config(split_k=split_k, tokens=8, gluon=True, stages=4)
        if m > 32:
            # 64 token columns: K split while there are fewer than 256 programs, at most in 4:
            # q|k|v in 2, o and down in 4, gate|up unsplit, the fastest of splits 1, 2, 4, 8
            # on each Llama-3.1-8B shape at 48 and 64 rows (results/s19-h200-skinny-int4-
            # wide64.log)
            split = max(1, min(4, 256 // column_blocks, tiles // 4))
            return SkinnyInt4Config(split_k=split, tokens=64, gluon=True)
        if m > MAX_TOKENS:
            # 32 token columns: K in 4, the fastest of splits 1, 2, 4 (and the rule above's 8)
            # on every Llama-3.1-8B shape at 17 and 32 rows (results/s18-h200-skinny-int4-
            # wide-bench.json; again with x in 16-byte runs, s19-h200-skinny-int4-xruns-
            # wide.log, gate|up's split 2 within 1 %)
            return SkinnyInt4Config(split_k=max(1, min(4, tiles // 4)), tokens=32, gluon=True)
        return SkinnyInt4Config(split_k=split_k, tokens=8 if m <= 8 else 16, gluon=True)
    while column_blocks * split_k < 3 * NUM_SMS and tiles // (2 * split_k) >= 8:
        split_k *= 2
    return SkinnyInt4Config(block_n, subtiles, split_k=split_k, num_stages=3, gluon=False)


def max_rows(x: torch.Tensor) -> int:
    """The most rows this kernel takes for x: 64 where the Gluon twin runs, else 16."""
    return skinny_int4_gluon.MAX_TOKENS if gluon_usable(x) else MAX_TOKENS


def gluon_usable(x: torch.Tensor) -> bool:
    """Whether the Gluon twin runs for x: sm_90+ CUDA, a Triton with Gluon, and
    KILN_SKINNY_INT4_GLUON not 0 (the A/B switch to the Triton kernel)."""
    return (has_sm90(x) and env_flag("KILN_SKINNY_INT4_GLUON", default=True)
            and skinny_int4_gluon.available())


# One row goes to the Gluon twin only for matrices larger than this (weights): the H200 had
# int_gemv faster on o (4096 x 4096: 7.6 vs 9.2 µs) and the Gluon kernel on q|k|v, gate|up and
# down (11.4 vs 12.8, 33.2 vs 40.9, 19.2 vs 23.5 µs); since int_gemv's packed int4 path, wide
# matrices (gate|up) are int_gemv's again (int_gemv.PACKED_WIDE_ROWS).
BATCH1_MIN_WEIGHTS = 4096 * 4096


def takes_batch1(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether a one-row int4 linear of N x K weights is faster here than on int_gemv
    (KILN_SKINNY_INT4_BATCH1=0 keeps int_gemv for every one-row linear): not the wide ones
    int_gemv's packed path streams faster (int_gemv.takes_wide_packed)."""
    return (n * k > BATCH1_MIN_WEIGHTS and env_flag("KILN_SKINNY_INT4_BATCH1", default=True)
            and gluon_usable(x) and not int_gemv.takes_wide_packed(x, n))


@triton.jit
def _nibbles(word, zero, GPU_ASM: tl.constexpr, FLOAT16: tl.constexpr):
    """word (BLOCK_N, 16) int32, zero (BLOCK_N,) fp32 → the 8 nibble planes q_i − z, i = 0..7,
    each (BLOCK_N, 16): 16-bit floats by the assembly on the GPU; fp32 by shifts and masks
    under the interpreter (no inline assembly there, and its bf16 arithmetic is wrong)."""
    if GPU_ASM:
        magic = 1024.0 if FLOAT16 else 128.0
        half_dtype: tl.constexpr = tl.float16 if FLOAT16 else tl.bfloat16
        asm: tl.constexpr = ASM_F16 if FLOAT16 else ASM_BF16
        half = (-(zero + magic)).to(half_dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
            asm, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, (half | (half << 16))[:, None]],
            dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        w0, w1 = p0.to(half_dtype, bitcast=True), p1.to(half_dtype, bitcast=True)
        w2, w3 = p2.to(half_dtype, bitcast=True), p3.to(half_dtype, bitcast=True)
        w4, w5 = p4.to(half_dtype, bitcast=True), p5.to(half_dtype, bitcast=True)
        w6, w7 = p6.to(half_dtype, bitcast=True), p7.to(half_dtype, bitcast=True)
    else:  # if/else, not an early return: Triton traces the code after a constexpr return
        z = zero[:, None]
        w0, w1 = (word & 0xF).to(tl.float32) - z, ((word >> 4) & 0xF).to(tl.float32) - z
        w2, w3 = ((word >> 8) & 0xF).to(tl.float32) - z, ((word >> 12) & 0xF).to(tl.float32) - z
        w4, w5 = ((word >> 16) & 0xF).to(tl.float32) - z, ((word >> 20) & 0xF).to(tl.float32) - z
        w6, w7 = ((word >> 24) & 0xF).to(tl.float32) - z, ((word >> 28) & 0xF).to(tl.float32) - z
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _subtile(word, x, zero, GPU_ASM: tl.constexpr, FLOAT16: tl.constexpr,
             PAIRED: tl.constexpr):
    """Σ_k (q_k − z) · x_k over one 128-column sub-tile: word (BLOCK_N, 16) int32, x
    (TOKENS, 128) in natural column order, zero (BLOCK_N,) fp32 → (BLOCK_N, TOKENS) fp32.

    The weight tile is the eight nibble planes joined along K; the dot's K order only has to
    be the same on both sides. PAIRED: column 8j + 2l + h holds nibble 4h + l, so each
    register pair the assembly wrote (nibbles l and l + 4) stays adjacent into the MMA (no
    byte permutes; measured statically: 3.2 instead of 3.6 SASS instructions a weight), and
    x is permuted to match (it is 1/8 as many elements as the weights at 16 tokens, 128 rows).
    Otherwise natural order: column 8j + i holds nibble i."""
    w0, w1, w2, w3, w4, w5, w6, w7 = _nibbles(word, zero, GPU_ASM, FLOAT16)
    rows: tl.constexpr = word.shape[0]
    tokens: tl.constexpr = x.shape[0]
    if PAIRED:  # joins nest as (p, q, h) with l = 2p + q
        low = tl.join(tl.join(w0, w2), tl.join(w1, w3))
        high = tl.join(tl.join(w4, w6), tl.join(w5, w7))
        w = tl.reshape(tl.join(low, high), (rows, 128))
        x = tl.reshape(tl.permute(tl.reshape(x, (tokens, 16, 2, 4)), (0, 1, 3, 2)),
                       (tokens, 128))
    else:  # joins nest as (a, b, c): nibble 4a + 2b + c
        even = tl.join(tl.join(w0, w4), tl.join(w2, w6))
        odd = tl.join(tl.join(w1, w5), tl.join(w3, w7))
        w = tl.reshape(tl.join(even, odd), (rows, 128))
    if GPU_ASM:
        part = tl.dot(w, tl.trans(x))
    else:
        part = tl.dot(w, tl.trans(x.to(tl.float32)), input_precision="ieee")
    return part


@triton.jit(do_not_specialize=["M"])
def _skinny_int4_kernel(
    x_ptr,  # (M, K) bfloat16 / float16, contiguous
    w_ptr,  # (N, K / 8) int32: the packed (N, K / 2) uint8 weight as words
    scale_ptr, zero_ptr, stride_s,  # (N, K / G) float16 each, stride_s between rows
    bias_ptr,  # (N,) when HAS_BIAS (unsplit only)
    out_ptr,  # split: fp32 partials (SPLIT_K, M, N); unsplit: y (M, N)
    M, N, K, SPLIT_K,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, SUBTILES: tl.constexpr, TOKENS: tl.constexpr,
    PREFETCH_TILES: tl.constexpr, USE_PDL: tl.constexpr, GPU_ASM: tl.constexpr,
    FLOAT16: tl.constexpr, PAIRED: tl.constexpr,
):
    WORDS_PER_SUBTILE: tl.constexpr = 16  # SUBTILE / 8
    TILE_K: tl.constexpr = SUBTILES * 128
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(cols, N - 1).to(tl.int64)  # unmasked weight loads; the store drops them
    # token block: program_id(2) (kernels/int_gemm.py's 65-128 rows; one elsewhere)
    tokens = tl.program_id(2) * TOKENS + tl.arange(0, TOKENS)
    words = tl.arange(0, WORDS_PER_SUBTILE)
    k_words = K // 8
    tiles = K // TILE_K
    tile_begin = pid_k * tiles // SPLIT_K
    tile_end = (pid_k + 1) * tiles // SPLIT_K
    w_tile = w_ptr + rows[:, None] * k_words + words[None, :]  # (BLOCK_N, 16) of a sub-tile
    x_tile = x_ptr + tokens[:, None] * K + tl.arange(0, 128)[None, :]  # (TOKENS, 128)
    x_mask = tokens[:, None] < M  # padding tokens read as 0
    s_rows = scale_ptr + rows * stride_s
    z_rows = zero_ptr + rows * stride_s

    if USE_PDL:
        if PREFETCH_TILES > 0:  # the weights do not depend on the previous kernel
            # A tile is TILE_K / 2 bytes of each row; one prefetch per 128-byte line (32
            # words), at least one per tile.
            LINES: tl.constexpr = max(TILE_K // 256, 1)
            lines = (w_ptr + rows * k_words)[:, None] + tl.arange(0, LINES)[None, :] * 32
            for t in tl.static_range(PREFETCH_TILES):
                if tile_begin + t < tile_end:
                    _prefetch_l2(lines + (tile_begin + t) * (TILE_K // 8))
        gdc_wait()  # the previous kernel (our x) has finished
        gdc_launch_dependents()

    acc = tl.zeros((BLOCK_N, TOKENS), tl.float32)
    for t in range(tile_begin, tile_end):  # pipelined num_stages deep by the compiler
        for j in tl.static_range(SUBTILES):
            column = t * TILE_K + j * 128
            word = tl.load(w_tile + column // 8)
            group = column // GROUP
            s = tl.load(s_rows + group).to(tl.float32)
            z = tl.load(z_rows + group).to(tl.float32)
            x = tl.load(x_tile + column, mask=x_mask, other=0.0)
            part = _subtile(word, x, z, GPU_ASM, FLOAT16, PAIRED)
            acc += s[:, None] * part

    mask = (tokens[None, :] < M) & (cols[:, None] < N)
    offsets = tokens[None, :] * N + cols[:, None]  # y[m, n] of the (M, N) output
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N + offsets, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def skinny_int4_unsupported_reason(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                   zero: torch.Tensor,
                                   rows_limit: int | None = None) -> str | None:
    """Why skinny_int4 cannot take these inputs (the dispatcher then uses another kernel), or
    None. rows_limit: the most rows a caller launching the Triton kernel itself takes
    (kernels/int_gemm.py); by default this module's max_rows."""
    if x.dim() != 2 or x.stride(-1) != 1:
        return f"x must be (M, K), contiguous along K; got {tuple(x.shape)}"
    if rows_limit is not None:
        if not 1 <= x.shape[0] <= rows_limit:
            return f"x has {x.shape[0]} rows; this kernel takes 1-{rows_limit}"
    elif not 1 <= x.shape[0] <= max_rows(x):
        return (f"x has {x.shape[0]} rows; this kernel takes 1-{max_rows(x)} here "
                f"({skinny_int4_gluon.MAX_TOKENS} with the Gluon twin on sm_90, {MAX_TOKENS} "
                f"otherwise)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x must be bfloat16 or float16; got {x.dtype}"
    k = x.shape[1]
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k \
            or not qweight.is_contiguous():
        return (f"qweight must be contiguous uint8 (N, {k // 2}) for K = {k}; got "
                f"{qweight.dtype} {tuple(qweight.shape)}")
    if k % SUBTILE:
        return f"K = {k} must be a multiple of {SUBTILE}"
    if qweight.data_ptr() % 4:
        return "qweight must start on a 4-byte boundary (it is read as 32-bit words)"
    n, groups = qweight.shape[0], scale.shape[-1]
    if scale.dim() != 2 or groups < 1 or k % groups or (k // groups) % SUBTILE:
        return f"the group size must be a multiple of {SUBTILE}; got K = {k} in {groups} groups"
    for name, tensor in (("scale", scale), ("zero", zero)):
        if tensor.shape != (n, groups) or tensor.stride(1) != 1 or tensor.dtype != torch.float16:
            return f"{name} must be float16 ({n}, {groups}), contiguous along groups"
    if zero.stride(0) != scale.stride(0):
        return "scale and zero must have the same row stride"
    if not (x.is_cuda or (interpreter_active() and x.device.type == "cpu")):
        return f"x is on {x.device}: Triton runs on CUDA, or on the CPU when interpreted"
    return None


def skinny_int4_linear(
    x: torch.Tensor,  # (M, K), M ≤ 16, bfloat16 / float16
    qweight: torch.Tensor,  # (N, K / 2) uint8, packed int4
    scale: torch.Tensor,  # (N, K / G) float16
    zero: torch.Tensor,  # (N, K / G) float16
    bias: torch.Tensor | None = None,  # (N,)
    *,
    config: SkinnyInt4Config | None = None,
) -> torch.Tensor:  # (M, N) in x's dtype
    """Triton twin of weight_only_linear_reference(x, dequantize_int4(qweight, scale, zero))."""
    reason = skinny_int4_unsupported_reason(x, qweight, scale, zero)
    if reason is not None:
        raise ValueError(f"skinny_int4_linear: {reason}")
    if bias is not None and (bias.shape != (qweight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({qweight.shape[0]},) tensor; got "
                         f"{tuple(bias.shape)}")
    return launch_skinny_int4(x, qweight, scale, zero, bias, config=config)


def launch_skinny_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, bias: torch.Tensor | None, *,
                       config: SkinnyInt4Config | None = None) -> torch.Tensor:
    """skinny_int4_linear for inputs skinny_int4_unsupported_reason already accepted."""
    m, k = x.shape
    n = qweight.shape[0]
    gluon = gluon_usable(x)
    config = config or default_skinny_int4_config(m, n, k, gluon)
    if config.gluon and gluon:
        return skinny_int4_gluon.launch(x, qweight, scale, zero, bias, config.split_k,
                                        config.tokens, config.stages, config.pdl)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    group = k // scale.shape[1]
    subtiles = config.subtiles
    while k % (SUBTILE * subtiles):
        subtiles //= 2
    tiles = k // (SUBTILE * subtiles)
    split_k = min(config.split_k, tiles)
    tokens = min(config.tokens, MAX_TOKENS) if m <= config.tokens else MAX_TOKENS
    pdl = config.pdl and use_pdl(x)
    prefetch = min(config.num_stages - 1, tiles // split_k) if pdl else 0
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    column_blocks = triton.cdiv(n, config.block_n)
    gpu = not interpreter_active()
    _skinny_int4_kernel[(column_blocks, split_k)](
        x, qweight.view(torch.int32), scale, zero, scale.stride(0),
        bias if bias is not None else scale, out, m, n, k, split_k,
        GROUP=group, HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        BLOCK_N=config.block_n, SUBTILES=subtiles, TOKENS=tokens,
        PREFETCH_TILES=prefetch, USE_PDL=pdl, GPU_ASM=gpu, FLOAT16=x.dtype == torch.float16,
        PAIRED=config.paired,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if split_k > 1:
        sum_split_k_partials(out, split_k, bias, y, pdl)
    return y
