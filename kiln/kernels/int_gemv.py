"""Batch-1 weight-only int8 / int4 linear (W8A16, W4A16): y (1, N) = x (1, K) · dequant(W)^T,
with the weights unpacked by integer bit operations instead of conversion instructions.

Why: the general kernel (kernels/quant_linear.py) converts every weight to fp32 with
`cvt`, and on the H200 an SM issues 16 conversions per clock against ~15 weight bytes per
clock of copy bandwidth (4.1 TB/s over 132 SMs at 1.98 GHz). int8 then streams at ~55 % of
the copy rate and int4 (two conversions per byte) at ~15-25 % (benchmarks/results/
s8-h200-quant-micro-base.json). Integer and/or, shifts and fp32 adds issue at 64-128 per SM
per clock instead. Measured on the H200 (batch-1 decode of the random 8B): int8-wo 245 → 335
and int4-wo 153 → 286 tok/s. Not yet at the copy rate: the sm_90 SASS of the default tilings
spends ~9.4 instructions per int4 weight (~8.6 per int8), against the ~4 (int4) / ~8
(int8) the card can issue per weight at the copy rate (BENCHMARKS.md). Fewer static
instructions did not measure faster: 2^23 in a register (−9 to −13 %) was 5 % slower, and
tilings giving a thread 8 rows (−30 %) lost to the 2-row default in the tiling grid.

The trick (the "magic number" conversion of FasterTransformer and Marlin, in fp32 so it needs
no packed-half instructions): OR an unsigned b-bit field into the mantissa of 2^23 and read
the word as fp32; the float is exactly 2^23 + field, and one subtraction leaves the field.
A field at bit offset s reads as field · 2^s, which is exact while s + b ≤ 23; the kernel
undoes the 2^s on x (a power of 2: exact) instead of shifting every weight:

    word (int32, little-endian)   int8: 4 weights, columns 4j..4j+3 (byte i = column 4j+i)
                                  int4: 8 weights, columns 8j..8j+7 (nibble i = column 8j+i,
                                        the packing of kiln/quant/quantize.pack_int4)
    int8  u = word ^ 0x80808080 (q + 128 per byte); fields at bits 0 and 8 of u and of
          u >> 16: (field | 2^23 as bits) − (2^23 + 128·2^s) = q · 2^s
    int4  fields at bits 0, 4, 8, 12, 16 of the word and 0, 4, 8 of word >> 20:
          (field | 2^23 as bits) − 2^23 = q · 2^s;  w = (q − z) · s_g

Per weight: an and and an or (two LOP3s: 2^23 is an immediate), one fp32 subtract, one FMA,
plus a shift per word and the x side (load, scale by 2^-s, Σ x) per row a thread holds. The
zero point leaves the inner loop as Σ s_g (q − z) x = s_g (Σ q x − z Σ x), with Σ x per
word shared by every row of the program. Scales are per output channel (applied once at the
end) or per group of G inputs (a tile is TILE_GROUPS groups of GROUP_WORDS words; each group's
partial sum is scaled once).

Program p owns output rows [p·BLOCK_N, +BLOCK_N) and streams K in tiles, one tile always in
flight, the first one loaded before the PDL wait (as kernels/gemv.py: weights never depend on
the previous kernel). Accumulation fp32, one reduction across the tile at the end.

Packed int4 (bf16 x on an sm_80+ GPU; KILN_INT_GEMV_PACKED=0 is the A/B switch): the
fields above cost an and, an or, a subtract and an FMA per weight in fp32, ~8.1 static SASS
instructions a weight at the default tiling. In bf16x2 (two weights a register) one LOP3
ORs nibbles i and i + 4 into 128.0's two halves, one packed FMA leaves q − 8 exactly, and
four packed FMAs (x paired to match by PRMT) sum a word's 8 products, each half over 4; the
halves are widened to fp32 and added once a word: 4.6 static instructions a weight. The zero
point leaves as (z − 8) · Σx in fp32 once a group. Products and the two 4-term sums round to
bf16, so the output is within ~2^-8 of its largest value (the Gluon kernel's error), not
fp32's 1e-5. On the H100 gate|up went 41.0 → 26.3 µs (80 % of copy) in 1-warp programs.

The torch references are quant_linear.dequantize_int8 / dequantize_int4 followed by
weight_only_linear_reference. M > 1 stays on quant_linear's kernel (tl.dot).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.int4_unpack import nibble_pair_lines
from kiln.kernels.skinny_fp8 import sum_split_k_partials
from kiln.kernels.triton_utils import (env_flag, interpreter_active, launchable, pdl_prologue,
                                       power_of_2_dividing, use_pdl)


@dataclass(frozen=True)
class IntGemvConfig:
    block_n: int = 16  # output rows per program
    tile_words: int = 64  # int32 words of each row per tile (256 B); clipped to divide K
    num_warps: int = 4
    # K in this many parts, one program each (more programs for a matrix of few rows); the
    # fp32 partials are summed by a second launch (skinny_fp8.sum_split_k_partials).
    split_k: int = 1

    def __post_init__(self):
        for name in ("block_n", "tile_words", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of 2; got {value}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be at least 1; got {self.split_k}")

    @classmethod
    def parse(cls, spec: str) -> IntGemvConfig:
        """"64x32x2": rows × words × warps, and "x4" more to split K in 4
        (KILN_INT_GEMV_TILING, quant_bench's grid)."""
        numbers = spec.split("x")
        if len(numbers) not in (3, 4) or not all(number.isdigit() for number in numbers):
            raise ValueError(f"expected rows x words x warps [x splits] such as 64x32x2; got "
                             f"{spec!r}")
        return cls(*(int(number) for number in numbers))


TILING_ENV = "KILN_INT_GEMV_TILING"


@functools.lru_cache(maxsize=8)
def _tiling_override(value: str) -> dict[str, IntGemvConfig]:
    """KILN_INT_GEMV_TILING, e.g. "int4=64x32x2,int8=8x128x1" (rows × words × warps per
    format): one tiling for every shape of a format, so a benchmark can A/B a tiling end to
    end without a code change. Malformed entries are an error naming the variable."""
    configs = {}
    for entry in filter(None, (part.strip() for part in value.split(","))):
        fmt, _, spec = entry.partition("=")
        if fmt not in ("int4", "int8", "fp8"):
            raise ValueError(f"{TILING_ENV}: expected entries like int4=64x32x2 (rows x words "
                             f"x warps, for int4, int8 or fp8); got {entry!r}")
        try:
            configs[fmt] = IntGemvConfig.parse(spec)
        except ValueError as error:
            raise ValueError(f"{TILING_ENV}: {entry!r}: {error}") from None
    return configs


# Matrices at least this wide take the packed int4 path at one row in 1-warp programs of
# 16 rows (128-byte row tiles), and not the Gluon twin: on the H100, gate|up (28,672 x 4,096)
# 26.3 µs (80 % of copy) against the Gluon kernel's 31.0 and the 4-warp tiling's 32.1; it
# needs ~8 programs an SM, so narrower matrices (q|k|v 9.9 vs 11.9, down 18.1 vs 23.9) stay
# where they were (results/s26/h100-int4/int_gemv_ab-packed.json).
PACKED_WIDE_ROWS = 16384


def default_int_gemv_config(n: int, k: int, int4: bool, packed: bool = False,
                            fp8: bool = False) -> IntGemvConfig:
    """From the H200 tiling grid (benchmarks/quant_bench.py, QUANT_BENCH_INT_GRID=1;
    results/s8-h200-int-gemv-grid.json), Llama-3.1-8B shapes: int8 streams 512-byte row tiles,
    8 rows over 2 warps on the 25-50 MB matrices and 16 rows over 4 warps on the larger ones
    (within 5 % of each shape's best); int4 16 rows over 4 warps with 256-byte tiles (within
    4 % of the best per layer). A 15-tiling grid later (results/s9-*, BENCHMARKS.md) found
    nothing faster: tilings giving a thread 8 rows, fewer instructions, were slower. The
    packed int4 path (H100, results/s26/h100-int4): 1 warp of 16 rows on wide matrices
    (PACKED_WIDE_ROWS), 512-byte tiles up to 4096 x 4096 (o: 6.9 vs 7.4 µs)."""
    formats = _tiling_override(os.environ.get(TILING_ENV, ""))
    override = formats.get("fp8" if fp8 else "int4" if int4 else "int8")
    if override is not None:
        return override
    if int4 and packed and n >= PACKED_WIDE_ROWS:
        return IntGemvConfig(block_n=16, tile_words=32, num_warps=1)
    if int4 and packed and n * k <= 4096 * 4096:
        return IntGemvConfig(block_n=16, tile_words=128, num_warps=4)
    if int4:
        return IntGemvConfig(block_n=16, tile_words=64, num_warps=4)
    if n * k >= 48 * 2**20:
        return IntGemvConfig(block_n=16, tile_words=128, num_warps=4)
    return IntGemvConfig(block_n=8, tile_words=128, num_warps=2)


@triton.jit
def _field(word, mask, offset: tl.constexpr):
    """(word & mask) | 2^23 as fp32, minus 2^23 + offset: the field times 2^(its bit
    position), less `offset` in the same units. Exact (integers below 2^23). 2^23's bits
    stay an immediate: passed as a register (one LOP3 per field instead of two, −9 to −13 %
    static SASS) it measured 5 % slower on the H200 (BENCHMARKS.md, 2026-12-03)."""
    bits = (word & mask) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _halves(x):
    """(A, B, 2C) → the even and the odd columns of the last axis, each (A, B, C)."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))


@triton.jit
def _columns4(x):
    """(A, B, 4) → its four last-axis columns, each (A, B)."""
    even, odd = _halves(x)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _tile_int8(acc, word, x):
    """acc (BLOCK_N, TG, GW) += Σ_i q_i · x_i per word; x (TG, GW, 4) fp32."""
    x0, x1, x2, x3 = _columns4(x)
    u = word ^ -0x7F7F7F80  # 0x80808080 as an int32: each byte's sign bit flipped, q + 128
    high = u >> 16  # bytes 2 and 3 to bits 0 and 8 (the masks drop the sign fill)
    acc += _field(u, 0xFF, 128.0) * x0[None]
    acc += _field(u, 0xFF00, 32768.0) * (x1 * 0.00390625)[None]  # field · 2^8: x / 2^8
    acc += _field(high, 0xFF, 128.0) * x2[None]
    acc += _field(high, 0xFF00, 32768.0) * (x3 * 0.00390625)[None]
    return acc


@triton.jit
def _tile_int4(word, x):
    """(Σ_i q_i · x_i per word (BLOCK_N, TG, GW), Σ_i x_i per word (TG, GW)); x (TG, GW, 8)."""
    even, odd = _halves(x)
    x0, x2, x4, x6 = _columns4(even)
    x1, x3, x5, x7 = _columns4(odd)
    high = word >> 20  # nibbles 5, 6, 7 to bits 0, 4, 8
    t = _field(word, 0xF, 0.0) * x0[None]
    t += _field(word, 0xF0, 0.0) * (x1 * 0.0625)[None]
    t += _field(word, 0xF00, 0.0) * (x2 * 0.00390625)[None]
    t += _field(word, 0xF000, 0.0) * (x3 * 0.000244140625)[None]
    t += _field(word, 0xF0000, 0.0) * (x4 * 0.0000152587890625)[None]
    t += _field(high, 0xF, 0.0) * x5[None]
    t += _field(high, 0xF0, 0.0) * (x6 * 0.0625)[None]
    t += _field(high, 0xF00, 0.0) * (x7 * 0.00390625)[None]
    return t, x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7


# PTX: x's bf16 pairs (x_i, x_{i+1}) per 32-bit word, four words a0..a3 ($4..$7) of a weight
# word's 8 columns → the pairs (x_i, x_{i+4}) ($0..$3) that match the nibble pairs below.
_X_PAIRS_ASM = tl.constexpr("""{
prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;
}""")

# PTX: Σ_i (q_i − 8) · x_i over a word ($1) of 8 nibbles, x as the pairs above ($2..$5), as
# fp32 bits ($0). Nibbles i and i + 4 OR-ed into the two bf16 halves of 128.0 read 128 + q
# (one LOP3 for two weights; int4_unpack's lines), − 136 leaves q − 8 exactly, and four
# packed bf16 FMAs sum the products, each half over 4 weights; the halves are widened to fp32
# (bf16 is fp32's upper half) and added. Two weights an instruction instead of fp32's one
# (sm_80+; −0 is the first FMA's addend, so the product is only rounded).
_DOT_ASM = tl.constexpr("\n".join([
    "{",
    ".reg .b32 t0, t1, t2, t3, s1, s2, s3, acc, lo, hi, one, minus, nought;",
    ".reg .f32 flo, fhi, sum;",
    "mov.b32 one, 0x3F803F80;",
    "mov.b32 minus, 0xC308C308;",
    "mov.b32 nought, 0x80008000;",
    *nibble_pair_lines("$1", "minus", float16=False),
    "fma.rn.bf16x2 acc, t0, $2, nought;",
    "fma.rn.bf16x2 acc, t1, $3, acc;",
    "fma.rn.bf16x2 acc, t2, $4, acc;",
    "fma.rn.bf16x2 acc, t3, $5, acc;",
    "shl.b32 lo, acc, 16;",
    "and.b32 hi, acc, 0xFFFF0000;",
    "mov.b32 flo, lo;",
    "mov.b32 fhi, hi;",
    "add.f32 sum, flo, fhi;",
    "mov.b32 $0, sum;",
    "}",
]))


@triton.jit
def _tile_int4_packed(word, x_words):
    """Σ_i (q_i − 8) · x_i per word (BLOCK_N, TG, GW) fp32; x_words (TG, GW, 4) int32: the
    word's 8 bf16 x values as they lie in memory."""
    a0, a1, a2, a3 = _columns4(x_words)
    p0, p1, p2, p3 = tl.inline_asm_elementwise(
        _X_PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r", [a0, a1, a2, a3], dtype=(tl.int32,) * 4,
        is_pure=True, pack=1)
    bits = tl.inline_asm_elementwise(
        _DOT_ASM, "=r,r,r,r,r,r", [word, p0[None], p1[None], p2[None], p3[None]],
        dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


# PTX (sm_89+): a word of 4 E4M3 x bytes ($2) → the f16x2 pairs (x0, x1) and (x2, x3)
# ($0, $1), each times 2^-8 so that a product with a weight (≤ 448 · 1.75) and the sum of two
# stay far below float16's 65,504. Exact: E4M3 values are float16 values, and 2^-8 of them
# are too (down to 2^-17, float16's subnormals reach 2^-24).
_FP8_X_ASM = tl.constexpr("""{
.reg .b16 lo, hi;
.reg .b32 scale;
mov.b32 {lo, hi}, $2;
mov.b32 scale, 0x1C001C00;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
mul.rn.f16x2 $0, $0, scale;
mul.rn.f16x2 $1, $1, scale;
}""")

# PTX (sm_89+): Σ_i w_i · x_i · 2^-8 over a word ($1) of 4 E4M3 weights, x as the pairs above
# ($2, $3), as fp32 bits ($0): one conversion and one packed float16 FMA per two weights (the
# product of two E4M3 values is exact in float16, the sum of two rounds at 2^-11), the two
# halves widened and added in fp32.
_FP8_DOT_ASM = tl.constexpr("""{
.reg .b16 wlo, whi, alo, ahi;
.reg .b32 w01, w23, acc, nought;
.reg .f32 flo, fhi, sum;
mov.b32 nought, 0x80008000;
mov.b32 {wlo, whi}, $1;
cvt.rn.f16x2.e4m3x2 w01, wlo;
cvt.rn.f16x2.e4m3x2 w23, whi;
fma.rn.f16x2 acc, w01, $2, nought;
fma.rn.f16x2 acc, w23, $3, acc;
mov.b32 {alo, ahi}, acc;
cvt.f32.f16 flo, alo;
cvt.f32.f16 fhi, ahi;
add.f32 sum, flo, fhi;
mov.b32 $0, sum;
}""")


@triton.jit
def _e4m3(byte):
    """An E4M3 byte (int32, 0-255) → its value in fp32, exactly: sign, exponent and mantissa
    moved to fp32's places read 2^-120 of it (subnormals included), then times 2^120. The
    interpreter's path (no inline assembly there)."""
    bits = ((byte & 0x80) << 24) | ((byte & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120


@triton.jit
def _tile_fp8(word, x_words, GPU_ASM: tl.constexpr):
    """Σ_i w_i · x_i per word (BLOCK_N, TG, GW) fp32 (times 2^-8 on the GPU path); word and
    x_words (TG, GW) hold 4 E4M3 values each, column 4j + i in byte i."""
    if GPU_ASM:
        x01, x23 = tl.inline_asm_elementwise(
            _FP8_X_ASM, "=r,=r,r", [x_words], dtype=(tl.int32, tl.int32), is_pure=True,
            pack=1)
        bits = tl.inline_asm_elementwise(
            _FP8_DOT_ASM, "=r,r,r,r", [word, x01[None], x23[None]], dtype=tl.int32,
            is_pure=True, pack=1)
        t = bits.to(tl.float32, bitcast=True)
    else:
        x = x_words[None]
        t = _e4m3(word & 0xFF) * _e4m3(x & 0xFF)
        t += _e4m3((word >> 8) & 0xFF) * _e4m3((x >> 8) & 0xFF)
        t += _e4m3((word >> 16) & 0xFF) * _e4m3((x >> 16) & 0xFF)
        t += _e4m3((word >> 24) & 0xFF) * _e4m3((x >> 24) & 0xFF)
    return t


@triton.jit
def _accumulate_tile(acc, word, x_ptr, x_offs, start, scale_ptr, zero_ptr, stride_sn, rows,
                     g_offs, INT4: tl.constexpr, PER_CHANNEL: tl.constexpr,
                     PER_WORD: tl.constexpr, GROUP_WORDS: tl.constexpr, GROUP: tl.constexpr,
                     PACKED: tl.constexpr, x_word_offs, FP8: tl.constexpr,
                     GPU_ASM: tl.constexpr):
    """One tile starting at word `start` of every row."""
    # if/else, not early returns: Triton traces the code after a constexpr-if's return too.
    if FP8:  # per channel: the weight and x scales wait for the end
        x_words = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                          + start + x_word_offs)  # (TG, GW): x's bytes of each weight word
        acc += _tile_fp8(word, x_words, GPU_ASM)
    else:
        acc = _accumulate_int_tile(acc, word, x_ptr, x_offs, start, scale_ptr, zero_ptr,
                                   stride_sn, rows, g_offs, INT4, PER_CHANNEL, PER_WORD,
                                   GROUP_WORDS, GROUP, PACKED, x_word_offs)
    return acc


@triton.jit
def _accumulate_int_tile(acc, word, x_ptr, x_offs, start, scale_ptr, zero_ptr, stride_sn, rows,
                         g_offs, INT4: tl.constexpr, PER_CHANNEL: tl.constexpr,
                         PER_WORD: tl.constexpr, GROUP_WORDS: tl.constexpr,
                         GROUP: tl.constexpr, PACKED: tl.constexpr, x_word_offs):
    """_accumulate_tile for int8 / int4 weights."""
    x = tl.load(x_ptr + start * PER_WORD + x_offs).to(tl.float32)  # (TG, GW, PER_WORD)
    if PER_CHANNEL:  # INT8 only (int4 is always grouped): the scale waits for the end
        acc = _tile_int8(acc, word, x)
    else:
        groups = (start + g_offs * GROUP_WORDS) * PER_WORD // GROUP  # (TG,)
        s_offs = rows[:, None] * stride_sn + groups[None, :]
        s = tl.load(scale_ptr + s_offs).to(tl.float32)[:, :, None]  # (BLOCK_N, TG, 1)
        if INT4 and PACKED:
            x_words = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                              + start * 4 + x_word_offs)
            t = _tile_int4_packed(word, x_words)
            # Σ (q − z) x = Σ (q − 8) x − (z − 8) Σ x: the zero's share is spread evenly over
            # the group's words of the tile (Σ x once a group, not once a word, and in fp32,
            # so fractional zero points stay exact).
            z = tl.load(zero_ptr + s_offs).to(tl.float32)[:, :, None] - 8.0
            x_share = tl.sum(tl.sum(x, axis=2), axis=1) * (1.0 / GROUP_WORDS)  # (TG,)
            acc += s * (t - z * x_share[None, :, None])
        elif INT4:
            t, x_sum = _tile_int4(word, x)
            z = tl.load(zero_ptr + s_offs).to(tl.float32)[:, :, None]
            acc += s * (t - z * x_sum[None])
        else:
            acc += s * _tile_int8(tl.zeros(acc.shape, tl.float32), word, x)
    return acc


@triton.jit
def _int_gemv_kernel(
    x_ptr,  # (K,) float
    w_ptr,  # (N, WORDS) int32: the int8 (N, K) or packed-int4 (N, K / 2) weight as words
    scale_ptr, stride_sn,  # (N, K / G) float16
    zero_ptr,  # int4: (N, K / G) float16
    x_scale_ptr,  # FP8: (1,) float32, x's per-token scale
    bias_ptr,  # (N,) when HAS_BIAS
    y_ptr,  # (N,), or (SPLIT_K, N) fp32 partials when SPLIT_K > 1
    N, WORDS,  # a row's words; each of a row block's SPLIT_K programs takes 1 / SPLIT_K of them
    SPLIT_K: tl.constexpr,
    INT4: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_GROUPS: tl.constexpr, GROUP_WORDS: tl.constexpr,
    USE_PDL: tl.constexpr, PACKED: tl.constexpr, FP8: tl.constexpr, GPU_ASM: tl.constexpr,
):
    PER_WORD: tl.constexpr = 8 if INT4 else 4
    TILE_WORDS: tl.constexpr = TILE_GROUPS * GROUP_WORDS
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(cols, N - 1).to(tl.int64)  # unmasked loads; the store drops them
    g_offs = tl.arange(0, TILE_GROUPS)
    words = g_offs[:, None] * GROUP_WORDS + tl.arange(0, GROUP_WORDS)[None, :]  # (TG, GW)
    w_ptrs = w_ptr + rows[:, None, None] * WORDS + words[None]
    x_offs = words[:, :, None] * PER_WORD + tl.arange(0, PER_WORD)[None, None, :]
    if FP8:
        x_word_offs = words  # x's 4 bytes of a weight word are one int32 word too
    else:
        x_word_offs = words[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]  # int32 pairs

    split_words = WORDS // SPLIT_K
    first = tl.program_id(1) * split_words
    last = first + split_words - TILE_WORDS
    word = tl.load(w_ptrs + first)  # weights never depend on the previous kernel
    pdl_prologue(USE_PDL)
    acc = tl.zeros((BLOCK_N, TILE_GROUPS, GROUP_WORDS), tl.float32)
    for start in range(first, last, TILE_WORDS):  # one tile always in flight
        next_word = tl.load(w_ptrs + start + TILE_WORDS)
        acc = _accumulate_tile(acc, word, x_ptr, x_offs, start, scale_ptr, zero_ptr,
                               stride_sn, rows, g_offs, INT4, PER_CHANNEL, PER_WORD,
                               GROUP_WORDS, GROUP, PACKED, x_word_offs, FP8, GPU_ASM)
        word = next_word
    acc = _accumulate_tile(acc, word, x_ptr, x_offs, last, scale_ptr, zero_ptr,
                           stride_sn, rows, g_offs, INT4, PER_CHANNEL, PER_WORD,
                           GROUP_WORDS, GROUP, PACKED, x_word_offs, FP8, GPU_ASM)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
    if PER_CHANNEL:
        out = out * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)
    if FP8:
        out = out * (tl.load(x_scale_ptr) * (256.0 if GPU_ASM else 1.0))  # 2^-8: _FP8_X_ASM
    if SPLIT_K > 1:  # fp32 partials; the summing launch adds the bias
        tl.store(y_ptr + tl.program_id(1) * N + cols, out, mask=cols < N)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=cols < N)


@functools.lru_cache(maxsize=8)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def packed_usable(x: torch.Tensor) -> bool:
    """Whether int4 runs with two weights an instruction (_DOT_ASM): bf16 x on an sm_80+
    GPU, 4-byte aligned (read as pairs); not under the interpreter (no inline assembly).
    KILN_INT_GEMV_PACKED=0 is the A/B switch to the fp32 unpacking."""
    return (env_flag("KILN_INT_GEMV_PACKED", default=True) and x.dtype == torch.bfloat16
            and x.is_cuda and not interpreter_active() and x.data_ptr() % 4 == 0
            and _capability(x.device) >= (8, 0))  # fma.rn.bf16x2: sm_80


def takes_wide_packed(x: torch.Tensor, n: int) -> bool:
    """Whether a one-row int4 linear N rows wide runs fastest here (PACKED_WIDE_ROWS)."""
    return n >= PACKED_WIDE_ROWS and packed_usable(x)


def int_gemv_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                int4: bool) -> str | None:
    """Why int_gemv cannot take these inputs (the dispatcher then uses quant_linear), or
    None."""
    per_word = 8 if int4 else 4
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(1) != 1:
        return f"x must be one contiguous row (1, K); got {tuple(x.shape)}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x must be float16, bfloat16 or float32; got {x.dtype}"
    k = x.shape[1]
    expected = (torch.uint8, k // 2) if int4 else (torch.int8, k)
    if (weight.dtype, weight.shape[1]) != expected or not weight.is_contiguous():
        return (f"weight must be contiguous {expected[0]} with {expected[1]} columns for "
                f"K = {k}; got {weight.dtype} {tuple(weight.shape)}")
    if k % per_word:
        return f"K = {k} must be a multiple of {per_word} (whole 32-bit words per row)"
    if weight.data_ptr() % 4:
        return "weight must start on a 4-byte boundary (it is read as 32-bit words)"
    groups = scale.shape[1]
    if groups < 1 or k % groups or (k // groups) % per_word:
        return (f"the group size K / {groups} must be a whole number of {per_word}-weight "
                "words")
    if scale.shape[0] != weight.shape[0] or scale.stride(1) != 1:
        return f"scale must be ({weight.shape[0]}, groups), contiguous along groups"
    return None


def int_gemv(
    x: torch.Tensor,  # (1, K) float16 / bfloat16 / float32
    weight: torch.Tensor,  # int8 (N, K), or uint8 (N, K / 2) packed int4
    scale: torch.Tensor,  # float16 (N, K / G)
    zero: torch.Tensor | None = None,  # int4: float16 (N, K / G)
    bias: torch.Tensor | None = None,  # (N,)
    *,
    config: IntGemvConfig | None = None,
) -> torch.Tensor:  # (1, N) in x's dtype
    """Triton twin of weight_only_linear_reference(x, dequantize_int8 / dequantize_int4)."""
    reason = int_gemv_unsupported_reason(x, weight, scale, zero is not None)
    if reason is not None:
        raise ValueError(f"int_gemv: {reason}")
    return launch_int_gemv(x, weight, scale, zero, bias, config=config)


def launch_int_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor | None, bias: torch.Tensor | None, *,
                    config: IntGemvConfig | None = None) -> torch.Tensor:
    """int_gemv for inputs int_gemv_unsupported_reason already accepted (the dispatcher
    checks once per call, not twice)."""
    int4 = zero is not None
    n, k = weight.shape[0], x.shape[1]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    packed = int4 and packed_usable(x)
    config = config or default_int_gemv_config(n, k, int4, packed)
    return _launch(x, weight, scale, zero, None, bias, y, config, int4=int4, packed=packed)


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
            zero: torch.Tensor | None, x_scale: torch.Tensor | None,
            bias: torch.Tensor | None, y: torch.Tensor, config: IntGemvConfig, *,
            int4: bool = False, packed: bool = False, fp8: bool = False) -> torch.Tensor:
    n, k = weight.shape[0], x.shape[1]
    if n == 0:
        return y
    per_word = 8 if int4 else 4
    words = k // per_word
    group = k // scale.shape[1] if scale.dim() == 2 else k  # fp8: (N,) per channel
    # K in config.split_k parts, or in its largest divisor that divides the row's words
    split = math.gcd(config.split_k, words)
    tile_words = min(config.tile_words, power_of_2_dividing(words // split))
    per_channel = group == k and not int4
    # A power of 2 (a divisor of tile_words) dividing the words of a group: sub-tiles never
    # straddle two groups.
    group_words = tile_words if per_channel else math.gcd(tile_words, group // per_word)
    pdl = use_pdl(x)
    out = y if split == 1 else torch.empty(split, 1, n, dtype=torch.float32, device=x.device)
    launchable(_int_gemv_kernel, x)[(triton.cdiv(n, config.block_n), split)](
        x, weight.view(torch.int32), scale, scale.stride(0),
        zero if int4 else scale, x_scale if fp8 else scale,
        bias if bias is not None else scale, out,
        n, words, SPLIT_K=split,
        INT4=int4, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None, GROUP=group,
        BLOCK_N=config.block_n, TILE_GROUPS=tile_words // group_words,
        GROUP_WORDS=group_words, USE_PDL=pdl, PACKED=packed, FP8=fp8,
        GPU_ASM=fp8 and not interpreter_active(),
        num_warps=config.num_warps, launch_pdl=pdl,
    )
    if split > 1:
        sum_split_k_partials(out, split, bias, y, pdl)
    return y


def fp8_gemv_unsupported_reason(x_q: torch.Tensor, x_scale: torch.Tensor,
                                weight: torch.Tensor, weight_scale: torch.Tensor) -> str | None:
    """Why fp8_gemv cannot take these inputs (the dispatcher then uses skinny_fp8), or
    None."""
    if x_q.dim() != 2 or x_q.shape[0] != 1 or x_q.stride(1) != 1:
        return f"x must be one contiguous row (1, K); got {tuple(x_q.shape)}"
    k = x_q.shape[1]
    if x_q.dtype != torch.float8_e4m3fn or weight.dtype != torch.float8_e4m3fn:
        return f"x and the weight must be float8_e4m3fn; got {x_q.dtype} and {weight.dtype}"
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous():
        return f"weight must be contiguous (N, {k}); got {tuple(weight.shape)}"
    if k % 4 or weight.data_ptr() % 4 or x_q.data_ptr() % 4:
        return f"K = {k}, x and the weight must be whole 32-bit words (4-byte aligned)"
    if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32:
        return "weight_scale must be float32 (N,), one scale an output channel"
    if x_scale.numel() != 1 or x_scale.dtype != torch.float32:
        return "x_scale must be one float32 scale (x quantised per token)"
    if x_q.is_cuda and _capability(x_q.device) < (8, 9):  # cvt.rn.f16x2.e4m3x2: sm_89
        return "E4M3 conversions need sm_89 or newer"
    if not (x_q.is_cuda or (interpreter_active() and x_q.device.type == "cpu")):
        return f"x is on {x_q.device}: Triton runs on CUDA, or on the CPU when interpreted"
    return None


def fp8_gemv(
    x_q: torch.Tensor,  # (1, K) E4M3
    x_scale: torch.Tensor,  # (1, 1) float32
    weight: torch.Tensor,  # (N, K) E4M3
    weight_scale: torch.Tensor,  # (N,) float32
    bias: torch.Tensor | None = None,  # (N,)
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: IntGemvConfig | None = None,
) -> torch.Tensor:  # (1, N) in out_dtype
    """Batch-1 W8A8 FP8 on the CUDA cores, in this file's loop: each word's 4 weights and 4
    x values converted to float16 pairs by the E4M3 conversion instruction, one packed FMA
    per two weights (_FP8_DOT_ASM), fp32 across words, the weight's and x's scales at the
    end. Twin of quant_linear.fp8_linear_prequantized_reference. KILN_FP8_GEMV=1 sends
    one-row fp8 linears here (off: on the H100 it did not beat skinny_fp8 end to end, 267.7
    against 270.1 tok/s; BENCHMARKS.md)."""
    reason = fp8_gemv_unsupported_reason(x_q, x_scale, weight, weight_scale)
    if reason is not None:
        raise ValueError(f"fp8_gemv: {reason}")
    return launch_fp8_gemv(x_q, x_scale, weight, weight_scale, bias, out_dtype, config=config)


def launch_fp8_gemv(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                    weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype, *,
                    config: IntGemvConfig | None = None) -> torch.Tensor:
    """fp8_gemv for inputs fp8_gemv_unsupported_reason already accepted (the dispatcher
    checks once per call, not twice)."""
    n, k = weight.shape
    y = torch.empty(1, n, dtype=out_dtype, device=x_q.device)
    config = config or default_int_gemv_config(n, k, int4=False, fp8=True)
    return _launch(x_q, weight, weight_scale, None, x_scale.reshape(1), bias, y, config,
                   fp8=True)
