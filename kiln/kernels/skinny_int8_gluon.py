"""The decode W8A16 GEMM of kernels/skinny_int8.py written in Gluon, as kernels/
skinny_int4_gluon.py is for int4: each thread loads the int8 words of its own wgmma fragment,
and the bit-operation conversion to bf16 (or fp16) lands in the operand registers. Hopper only.

Why: Triton's skinny_int8 streams the weights through its cp.async pipeline into shared memory
and reads them back in the bf16 operand's layout, two bytes a load (`ld.shared.v2.b8`: the
fragment holds K pairs), repacking them before converting: about four instructions a weight,
1.6-2.1 TB/s on the H200 at 2-16 rows (results/s19-h200-skinny-int8-bench.log) against
int_gemv's 2.3-3.6 at one row.

    A operand (64 rows x 128 K, 16-bit, wgmma m64nNk16): thread (warp w, lane l) holds rows
    16w + l/4 and +8; in each 16-deep K step s, the pairs k = 2(l%4) + {0, 1} and +8.
    words (64 rows x 32 words of a 128-column sub-tile): thread (w, l) loads words
    8(l%4) .. 8(l%4)+7 of the same two rows: 32 bytes a row, two 16-byte loads.

The K order of the MMA is chosen so that the thread's own bytes are its fragment: fragment
column c = e + 2q + 8h + 16j (e the element of a bf16 pair, q = l%4, h the k / k+8 half, j
the step) holds the byte at natural column 32q + 4j + 2h + e, i.e. word j + 8q, byte e + 2h,
of the row. A word's bytes (0, 1) and (2, 3) are the bf16 pairs of halves h = 0 and 1 of
step j. x is loaded in natural order (16-byte runs) and permuted to the same order in
registers before it is stored for the MMA (_fragment_order). `gl.convert_layout(...,
assert_trivial=True)` proves at compile time that no data moves between threads.

Conversion, per word (four weights), as Triton lowers int8 → bf16: a PRMT puts bytes 0, 1
(then 2, 3) under the bf16 exponent of 128 (0x43), so a pair reads as 128 + (b & 127) or
256 + (b & 127) by the byte's sign bit; two LOP3s split that into (128 + low 7 bits) and
(128 or 256), and one packed bf16 subtraction leaves the signed byte: 8 instructions per four
weights, exact. float16 x: the byte XOR 0x80 (q + 128) under 1024's exponent (0x64), minus
1152, 5 instructions.

Scales per output channel (int8-wo's default): the MMA accumulates the whole K range on the
integers and the scale is applied once at the end. Group scales (GROUP, a multiple of 32:
`--group-size`, GGUF Q8_0's 32): a thread's 32 bytes of a row in a sub-tile lie in one
group, so it loads one scale a row a step (a (rows, runs) tile in a slice of the words'
layout, broadcast over the run's eight words in registers) and multiplies each weight by it
before the MMA: byte → fp32 (exact), times the scale (exact), rounded once to the 16-bit float
(15 instructions per four weights). Split-K partials are summed by skinny_fp8's
combining kernel; PDL as the int4 twin (the first words before `griddepcontrol.wait`, x after).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import skinny_int4_gluon
from kiln.kernels.skinny_fp8 import sum_split_k_partials
from kiln.kernels.triton_utils import use_pdl

def int8_assembly(float16: bool, scaled: bool) -> str:
    """PTX: a word ($4) of four int8 weights → four 16-bit floats ($0..$3 = bytes 0..3).
    `scaled`: times $5, the weights' group scale as fp32 bits: each byte through fp32 (its
    q + 128 under 2^23's exponent, minus 2^23 + 128: q exactly; times the scale: exact, 8 by
    11 significant bits), rounded once to the 16-bit float as the dequantise kernel's weight
    would be; 15 instructions per four weights."""
    if scaled:
        kind = "f16x2" if float16 else "bf16x2"
        lines = ["{", ".reg .b32 u, f0, f1, f2, f3, l, h;", ".reg .f32 s;", "mov.b32 s, $5;",
                 "xor.b32 u, $4, 0x80808080;"]
        lines += [f"prmt.b32 f{i}, u, 0x4B000000, 0x754{i};" for i in range(4)]
        lines += [f"sub.rn.f32 f{i}, f{i}, 0f4B000080;" for i in range(4)]
        lines += [f"mul.rn.f32 f{i}, f{i}, s;" for i in range(4)]
        lines += [f"cvt.rn.{kind}.f32 l, f1, f0;", f"cvt.rn.{kind}.f32 h, f3, f2;"]
        low, high = "l", "h"
    elif float16:
        lines = ["{", ".reg .b32 u, l, h, c;", "xor.b32 u, $4, 0x80808080;",
                 "mov.b32 c, 0x64806480;",  # 1152 = 1024 + 128 in both halves
                 "prmt.b32 l, u, 0x64, 0x4140;", "prmt.b32 h, u, 0x64, 0x4342;",
                 "sub.rn.f16x2 l, l, c;", "sub.rn.f16x2 h, h, c;"]
        low, high = "l", "h"
    else:
        lines = ["{", ".reg .b32 l0, h0, l1, h1, l2, h2;",
                 "prmt.b32 l0, $4, 0x43, 0x4140;", "prmt.b32 h0, $4, 0x43, 0x4342;",
                 "and.b32 l1, l0, 0xff7fff7f;", "and.b32 h1, h0, 0xff7fff7f;",
                 "and.b32 l2, l0, 0xff80ff80;", "and.b32 h2, h0, 0xff80ff80;",
                 "sub.bf16x2 l1, l1, l2;", "sub.bf16x2 h1, h1, h2;"]
        low, high = "l1", "h1"
    lines += [f"mov.b32 {{$0, $1}}, {low};", f"mov.b32 {{$2, $3}}, {high};", "}"]
    return "\n".join(lines)


ASM_BF16 = tl.constexpr(int8_assembly(float16=False, scaled=False))
ASM_F16 = tl.constexpr(int8_assembly(float16=True, scaled=False))
ASM_BF16_SCALED = tl.constexpr(int8_assembly(float16=False, scaled=True))
ASM_F16_SCALED = tl.constexpr(int8_assembly(float16=True, scaled=True))

gluon = skinny_int4_gluon.gluon  # None on a Triton without Gluon (before 3.5)

# Token columns at most (the wgmma's N), as the int4 twin: 17-64 rows (decode batches, short
# prefills) stay on int8 weights instead of dequantising all of them for cuBLAS (kernels/
# ops.py). The Triton kernel (skinny_fp8's) takes 16.
MAX_TOKENS = skinny_int4_gluon.MAX_TOKENS


def available() -> bool:
    return gluon is not None


if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
    )

    # shared with the int4 twin
    _pdl_wait_then_release = skinny_int4_gluon._pdl_wait_then_release
    _store_output = skinny_int4_gluon._store_output
    _x_subtile = skinny_int4_gluon._x_subtile
    _mma_layout = skinny_int4_gluon._mma_layout
    _a_layout = skinny_int4_gluon._a_layout
    _x_shared_layout = skinny_int4_gluon._x_shared_layout
    _program_rows = skinny_int4_gluon._program_rows
    _program_subtiles = skinny_int4_gluon._program_subtiles
    _weight_subtile = skinny_int4_gluon._weight_subtile
    _x_layout = skinny_int4_gluon._x_layout

    @gluon.jit
    def _fragment_order(x):
        """x (TOKENS, 128) of one sub-tile in natural order → fragment order: natural column
        bits (high to low) q (2), j (3), h, e → j, h, q, e (the module docstring)."""
        tokens: gl.constexpr = x.shape[0]
        x = gl.reshape(x, [tokens, 4, 8, 2, 2])
        x = gl.permute(x, (0, 2, 3, 1, 4))
        return gl.reshape(x, [tokens, 128])

    @gluon.jit
    def _operand(word, scale, A_LAYOUT: gl.constexpr, FLOAT16: gl.constexpr,
                 GROUPED: gl.constexpr):
        """word (64, 32) int32 (the words layout) → (64, 128) 16-bit floats in the wgmma A
        layout, K in fragment order. GROUPED: each weight times its group's scale (`scale`,
        (64, 32) int32 in the words layout: the word's scale's fp32 bits); otherwise `scale`
        is unused and the weights are the integers."""
        if FLOAT16:
            half_dtype: gl.constexpr = gl.float16
            asm: gl.constexpr = ASM_F16_SCALED if GROUPED else ASM_F16
        else:
            half_dtype: gl.constexpr = gl.bfloat16
            asm: gl.constexpr = ASM_BF16_SCALED if GROUPED else ASM_BF16
        if GROUPED:
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                asm, "=h,=h,=h,=h,r,r", [word, scale], dtype=(gl.int16,) * 4, is_pure=True,
                pack=1)
        else:
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                asm, "=h,=h,=h,=h,r", [word], dtype=(gl.int16,) * 4, is_pure=True, pack=1)
        rows: gl.constexpr = word.shape[0]
        split: gl.constexpr = [rows, 4, 8]  # word = j + 8 q → (rows, q, j)
        low = gl.join(p0.reshape(split), p1.reshape(split))  # bytes 0, 1: h = 0, (.., e)
        high = gl.join(p2.reshape(split), p3.reshape(split))  # bytes 2, 3: h = 1
        full = gl.join(low, high)  # (rows, q, j, e, h)
        full = gl.permute(full, (0, 2, 4, 1, 3))  # (rows, j, h, q, e)
        flat = gl.reshape(full, [rows, 128]).to(half_dtype, bitcast=True)
        return gl.convert_layout(flat, A_LAYOUT, assert_trivial=True)

    @gluon.jit(do_not_specialize=["M"])
    def _skinny_int8_gluon_kernel(
        x_ptr,  # (M, K) bfloat16 / float16
        w_ptr,  # (N, K / 4) int32: four int8 weights a word
        scale_ptr, stride_s,  # (N, K / G) float16: per channel (G = K) or per group
        bias_ptr,  # (N,) when HAS_BIAS (unsplit only)
        out_ptr,  # split: fp32 partials (SPLIT_K, M, N); unsplit: y (M, N)
        M, N, K, K_WORDS, SPLIT_K,
        TOKENS: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
        FLOAT16: gl.constexpr, USE_PDL: gl.constexpr,
        GROUP: gl.constexpr,  # 0: per channel (scaled after the MMA); else a multiple of 32
    ):
        WORDS: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]],
            lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 32])
        # the same, words split as (runs of eight words, word within the run)
        WORDS_3D: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 4, 8])
        MMA: gl.constexpr = _mma_layout(TOKENS)
        A_LAYOUT: gl.constexpr = _a_layout(TOKENS)
        X_LAYOUT: gl.constexpr = _x_layout(TOKENS)
        x_dtype: gl.constexpr = gl.float16 if FLOAT16 else gl.bfloat16
        X_SHARED: gl.constexpr = _x_shared_layout(TOKENS, FLOAT16)

        _, w_tile = _weight_subtile(w_ptr, N, K_WORDS, WORDS, 32)
        out_rows = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))

        x_tile, x_mask = _x_subtile(x_ptr, M, K, TOKENS, X_LAYOUT)
        tile_begin, tile_end = _program_subtiles(K, SPLIT_K)
        acc = gl.zeros([64, TOKENS], gl.float32, MMA)
        # x through one shared-memory tile, stored each step; weights one step ahead in
        # registers (the int4 twin's register path).
        x_smem = gl.allocate_shared_memory(x_dtype, [TOKENS, 128], X_SHARED)
        word = gl.load(w_tile + tile_begin * 32)
        _pdl_wait_then_release(USE_PDL)
        x = gl.load(x_tile + tile_begin * 128, mask=x_mask, other=0.0)
        # GROUP: a thread's 32 bytes of a row in a sub-tile (natural columns 32 (l % 4) + 0..31)
        # lie in one group, so its eight words of a row share one scale: loaded once a row as
        # (64 rows, 4 runs) in a slice of the words' layout seen as (rows, runs, words of a
        # run), then broadcast over the words (registers only).
        RUNS: gl.constexpr = gl.SliceLayout(2, WORDS_3D)
        run_rows = _program_rows(N, gl.SliceLayout(1, RUNS))
        runs = gl.arange(0, 4, layout=gl.SliceLayout(0, RUNS))
        s_rows = scale_ptr + gl.expand_dims(run_rows * stride_s, 1)
        for t in range(tile_begin, tile_end):
            ahead = gl.minimum(t + 1, tile_end - 1)  # the last tile re-reads itself
            next_word = gl.load(w_tile + ahead * 32)
            next_x = gl.load(x_tile + ahead * 128, mask=x_mask, other=0.0)
            if GROUP:
                group = gl.expand_dims((t * 128 + runs * 32) // GROUP, 0)
                bits = gl.load(s_rows + group).to(gl.float32).to(gl.int32, bitcast=True)
                bits = gl.broadcast(gl.expand_dims(bits, 2),
                                    gl.zeros([64, 4, 8], gl.int32, WORDS_3D))[0]
                bits = gl.convert_layout(gl.reshape(bits, [64, 32]), WORDS, assert_trivial=True)
            else:
                bits = word  # unused
            a = _operand(word, bits, A_LAYOUT, FLOAT16, GROUP != 0)
            x_smem.store(_fragment_order(x))
            fence_async_shared()
            gl.thread_barrier()
            acc = warpgroup_mma(a, x_smem.permute((1, 0)), acc)
            word, x = next_word, next_x

        if not GROUP:  # per channel: once, after the MMA
            scale = gl.load(scale_ptr + gl.minimum(out_rows, N - 1) * stride_s)
            acc = acc * gl.expand_dims(scale.to(gl.float32), 1)
        _store_output(acc, out_ptr, bias_ptr, out_rows, gl.program_id(1), M, N, TOKENS, MMA,
                      SPLIT, HAS_BIAS)


def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None, split_k: int, tokens: int = 16,
           pdl: bool = True) -> torch.Tensor:
    """y = x · (weight · scale)^T for inputs skinny_int8_unsupported_reason accepted, with K a
    multiple of 128, on sm_90+; with `pdl`, a programmatic dependent launch."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"skinny_int8 (Gluon): x has {m} rows; it takes 1-{MAX_TOKENS}")
    if k % 128:
        raise ValueError(f"skinny_int8 (Gluon): K={k} must be a multiple of 128")
    if tokens not in (8, 16, 32, 64):
        raise ValueError(f"skinny_int8 (Gluon): tokens must be 8, 16, 32 or 64; got {tokens}")
    while tokens < m:  # the smallest of 8, 16, 32, 64 token columns that holds the rows
        tokens *= 2
    split_k = max(1, min(split_k, k // 128))
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    pdl = pdl and use_pdl(x)
    groups = scale.shape[1]
    _skinny_int8_gluon_kernel[(triton.cdiv(n, 64), split_k)](
        x, weight.view(torch.int32), scale, scale.stride(0), bias if bias is not None else scale,
        out, m, n, k, k // 4, split_k, TOKENS=tokens, SPLIT=split_k > 1,
        HAS_BIAS=bias is not None, FLOAT16=x.dtype == torch.float16, USE_PDL=pdl,
        GROUP=0 if groups == 1 else k // groups, num_warps=4, launch_pdl=pdl,
    )
    if split_k > 1:
        sum_split_k_partials(out, split_k, bias, y, pdl)
    return y
