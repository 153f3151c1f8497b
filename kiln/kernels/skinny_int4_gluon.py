"""The decode W4A16 GEMM of kernels/skinny_int4.py written in Gluon (Triton's explicit-layout
dialect), so that unpacked weights land in the wgmma operand registers directly. Hopper only.

Why: the Triton kernel lets the compiler pick layouts, and it loads the packed words in one
layout and needs the unpacked bf16 tile in the wgmma A-operand layout, so every tile goes
through shared memory (stored and read back: four times the packed bytes). Nsight Compute put
that kernel's shared-memory pipe at 69 % busy while DRAM ran at 22 % (BENCHMARKS.md). Here each
thread loads exactly the words that hold its own fragment:

    A operand (64 rows x 128 K, bf16, wgmma m64nNk16): thread (warp w, lane l) holds rows
    16w + l/4 and +8; within each 16-deep K step, the pairs k = 2(l%4) + {0, 1} and +8.
    words (64 rows x 16 words of a 128-column sub-tile): thread (w, l) loads words
    4(l%4) .. 4(l%4)+3 of the same two rows: 16 bytes a row.

and the K order of the MMA is chosen so that the four registers the unpacking writes per
word, bf16 pairs (nibble n, nibble n + 4), are four of the thread's fragment registers.
`gl.convert_layout(..., assert_trivial=True)` proves at compile time that no data moves
between threads. Fragment-order column c of a sub-tile (bits from low: h, w_hi (2), l0, l1,
w_lo (2)) is the actual column 8 (w_lo + 4 w_hi) + l0 + 2 l1 + 4 h: nibble l0 + 2 l1 + 4 h of
word w_lo + 4 w_hi. x must reach the wgmma's shared tile in that order: it is loaded in
natural order, 16-byte runs, and permuted in registers (_fragment_order; no data crosses
threads). Gathering it in fragment order from global memory instead (two bytes a load, 32-64
loads a thread a step at 32-64 token columns) made the kernel x-bound past 16 rows: H200,
Llama-3.1-8B shapes, a layer's four linears at 32 rows 218 → 123 µs, gate|up at 16 rows 41.8
→ 34.7, batch-32 decode 3,655 → 6,475 tok/s (results/s19-h200-*xruns*).

Everything else is kernels/skinny_int4.py's design: swap-AB (weight rows on M, tokens on N =
8 or 16), q − z by the same inline assembly, each 128-column group's partial scaled in fp32,
split-K partials summed by skinny_fp8's combining kernel. Only x goes through shared memory
(the wgmma B operand must), and two variants differ in how:

- stages = 0: x stored each step into one tile, the next sub-tile's weights and x loaded one
  step ahead into registers. The store needs a generic-to-async proxy fence before the wgmma
  reads it, which ptxas emits as MEMBAR.ALL.CTA, and a MEMBAR waits for the thread's memory
  operations in flight, the prefetch included. That fits what was measured: ~1 µs a step on
  gate|up (about a DRAM latency) whatever the prefetch depth (two sub-tiles ahead, a cp.async
  ring of 2-8, or the prefetch issued after the fence: none faster).
- stages ≥ 2 (default up to 8 rows for long programs: gate|up, down): the program's whole x,
  zero points and scales stored in shared memory once behind one fence, the weights through a
  ring of `stages` sub-tiles filled by cp.async. Each stage is its own allocation and the loop
  is unrolled over one turn of the ring, so the compiler's hazard analysis sees a copy into one
  stage and the read of another as independent: one CTA barrier a step and no fence (a ring
  indexed at run time got a second, compiler-inserted barrier: down 18.5 → 17.8 µs without
  it). x for the program's K range must fit in shared memory (staged_unsupported_reason).

Measured on the H200 (BENCHMARKS.md): 1.2-1.9 TB/s of weights at one to eight rows, against
the Triton kernel's ~1.0 and int_gemv's 1.05-1.5; random Llama-3.1-8B int4-wo decode 287 →
313 tok/s at batch 1 (with int_gemv keeping the 4096 x 4096 linear), 394 → 1,231 at batch 4,
826 → 4,049 at batch 16. The staged variant: gate|up 31.6 → 28.3 µs at one row (2.1 TB/s),
down 18.9 → 17.8; Nsight Compute (its two-barrier version) still finds the warps waiting at
the barrier and on loads (8-11 cycles an instruction, ~25 warps an SM), and fewer
instructions (the zero point taken off after the MMA) did not make it faster.

PDL (programmatic dependent launch, as the Triton kernels): only x comes from the previous
kernel, so the staged variant starts its ring's first copies and loads its zero points and
scales, and the register path loads its first words, before `griddepcontrol.wait`; then it
lets the next kernel launch. H200, random Llama-3.1-8B int4-wo: batch 1 329 → 352 tok/s,
batch 4 1,272 → 1,374, batch 16 4,054 → 4,154 (results/s18-h200-int4-pdl-latency-*.json).
Not done: asynchronous wgmma across steps.

No CPU twin: Gluon does not run under Triton's interpreter. The Triton kernel's CPU tests
cover the arithmetic; tests/kernels/test_sm90_lowering.py compiles this one for sm_90 on the
CPU machine (the trivial layout conversion is checked then); the GPU tests run it.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon arrived in Triton 3.5; older Tritons keep the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        warpgroup_mma,
    )
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

from kiln.kernels.int4_unpack import ASM_BF16, ASM_F16
from kiln.kernels.skinny_fp8 import sum_split_k_partials
from kiln.kernels.triton_utils import use_pdl

ROWS = 64  # weight rows per program: one warpgroup's wgmma M
# Token columns at most (the wgmma's N; x is stored TOKENS x 128 a step): 17-64 rows (decode
# batches, short prefills) stay on packed weights instead of dequantising all of them for
# cuBLAS (kernels/ops.py). H200, Llama-3.1-8B shapes, a layer's four linears (results/s19-
# h200-skinny-int4-xruns-wide.log, -wide64.log): 123 µs at 32 rows, 169 / 192 at 48 / 64
# (64 columns) against 295-297 dequantised. 128 columns would hold 64 fp32 accumulators a
# thread and was not tried.
MAX_TOKENS = 64


def available() -> bool:
    return gluon is not None


if gluon is not None:

    @gluon.jit
    def _pdl_wait_then_release(USE_PDL: gl.constexpr):
        """Programmatic dependent launch (kernels/triton_utils.pdl_prologue's two
        instructions): wait until the previous kernel has finished and its writes (our x) are
        visible, then let the next kernel launch. Only x depends on the previous kernel: the
        weights, zero points and scales are requested before this."""
        if USE_PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)

    @gluon.constexpr_function
    def _mma_layout(tokens):
        """One warpgroup's wgmma accumulator: 64 weight rows x `tokens` columns."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                         instr_shape=[16, tokens, 16])

    @gluon.constexpr_function
    def _a_layout(tokens):
        """The wgmma A operand (the converted weights) in registers, over _mma_layout."""
        return gl.DotOperandLayout(operand_index=0, parent=_mma_layout(tokens), k_width=2)

    @gluon.constexpr_function
    def _x_shared_layout(tokens, float16):
        """x's shared-memory tile (tokens x 128, 16-bit) as the wgmma B operand reads it."""
        dtype = gl.float16 if float16 else gl.bfloat16
        return gl.NVMMASharedLayout.get_default_for([tokens, 128], dtype)

    @gluon.constexpr_function
    def _x_layout(tokens):
        """x's sub-tile, tokens x 128, no element twice: 8 consecutive columns (16 bytes) a
        thread."""
        return gl.BlockedLayout([1, 8], [tokens // 4, 128 // tokens], [4, 1], [1, 0])

    @gluon.jit
    def _program_rows(N, LAYOUT: gl.constexpr):
        """This program's 64 weight rows (program_id(0)) in LAYOUT, those past N read as row
        N - 1: the loads stay unmasked and the store drops them."""
        rows = gl.program_id(0) * 64 + gl.arange(0, 64, layout=LAYOUT)
        return gl.minimum(rows, N - 1).to(gl.int64)

    @gluon.jit
    def _weight_subtile(w_ptr, N, K_WORDS, WORDS: gl.constexpr, WORD_COLUMNS: gl.constexpr):
        """(this program's weight rows, pointers to their first sub-tile's WORD_COLUMNS words
        in the WORDS layout)."""
        rows = _program_rows(N, gl.SliceLayout(1, WORDS))
        words = gl.arange(0, WORD_COLUMNS, layout=gl.SliceLayout(0, WORDS))
        return rows, w_ptr + gl.expand_dims(rows * K_WORDS, 1) + gl.expand_dims(words, 0)

    @gluon.jit
    def _program_subtiles(K, SPLIT_K):
        """[first, end) of this program's 128-column sub-tiles: K split SPLIT_K ways
        (program_id(1)), as evenly as whole sub-tiles allow."""
        pid_k = gl.program_id(1)
        tiles = K // 128
        return pid_k * tiles // SPLIT_K, (pid_k + 1) * tiles // SPLIT_K

    @gluon.jit
    def _x_subtile(x_ptr, M, K, TOKENS: gl.constexpr, X_LAYOUT: gl.constexpr):
        """Pointers to x's first 128-column sub-tile (TOKENS x 128 in natural order, 16 bytes
        a thread in X_LAYOUT) and the mask that reads the padding tokens (≥ M) as 0."""
        x_tokens = gl.arange(0, TOKENS, layout=gl.SliceLayout(1, X_LAYOUT))
        x_columns = gl.arange(0, 128, layout=gl.SliceLayout(0, X_LAYOUT))
        x_tile = x_ptr + gl.expand_dims(x_tokens * K, 1) + gl.expand_dims(x_columns, 0)
        return x_tile, gl.expand_dims(x_tokens < M, 1)

    @gluon.jit
    def _store_output(acc, out_ptr, bias_ptr, out_rows, pid_k, M, N, TOKENS: gl.constexpr,
                      MMA: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr):
        """acc (64 weight rows out_rows x TOKENS, fp32, the MMA layout) = y^T's block → split
        pid_k's fp32 partial (SPLIT_K, M, N), or y (M, N) in out's dtype with the bias added."""
        tokens = gl.arange(0, TOKENS, layout=gl.SliceLayout(0, MMA))
        mask = gl.expand_dims(tokens < M, 0) & gl.expand_dims(out_rows < N, 1)
        offsets = gl.expand_dims(tokens * N, 0) + gl.expand_dims(out_rows, 1)
        if SPLIT:
            gl.store(out_ptr + pid_k * M * N + offsets, acc, mask=mask)
        else:
            if HAS_BIAS:
                bias = gl.load(bias_ptr + out_rows, mask=out_rows < N, other=0.0)
                acc += gl.expand_dims(bias.to(gl.float32), 1)
            gl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _fragment_order(x):
        """x (TOKENS, 128) of one sub-tile, loaded in natural order (16-byte runs) → its
        columns in fragment order (what the shared tile the wgmma reads must hold), permuted
        in registers: natural column bits (high to low) w_hi (2), w_lo (2), h, l1, l0 →
        fragment order w_lo, l1, l0, w_hi, h (see the module docstring)."""
        tokens: gl.constexpr = x.shape[0]
        x = gl.reshape(x, [tokens, 4, 4, 2, 2, 2])
        x = gl.permute(x, (0, 2, 4, 5, 1, 3))
        return gl.reshape(x, [tokens, 128])

    @gluon.jit
    def _operand(word, zero, A_LAYOUT: gl.constexpr, FLOAT16: gl.constexpr):
        """word (ROWS, 16) int32 (the words layout), zero (ROWS,) fp32 → (ROWS, 128) q − z,
        16-bit floats in the wgmma A layout, K in fragment order."""
        if FLOAT16:
            magic: gl.constexpr = 1024.0
            half_dtype: gl.constexpr = gl.float16
            asm: gl.constexpr = ASM_F16
        else:
            magic: gl.constexpr = 128.0
            half_dtype: gl.constexpr = gl.bfloat16
            asm: gl.constexpr = ASM_BF16
        half = (-(zero + magic)).to(half_dtype).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        pair = gl.broadcast(gl.expand_dims(half | (half << 16), 1), word)[0]
        p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
            asm, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, pair], dtype=(gl.int16,) * 8,
            is_pure=True, pack=1)
        rows: gl.constexpr = word.shape[0]
        split: gl.constexpr = [rows, 4, 4]  # word = w_lo + 4 w_hi → (rows, w_hi, w_lo)
        # Nibble n = l0 + 2 l1 + 4 h; joined innermost h (the assembly's register pairs).
        j0 = gl.join(p0.reshape(split), p4.reshape(split))
        j1 = gl.join(p1.reshape(split), p5.reshape(split))
        j2 = gl.join(p2.reshape(split), p6.reshape(split))
        j3 = gl.join(p3.reshape(split), p7.reshape(split))
        full = gl.join(gl.join(j0, j1), gl.join(j2, j3))  # (rows, w_hi, w_lo, h, l0, l1)
        full = gl.permute(full, (0, 2, 5, 4, 1, 3))  # (rows, w_lo, l1, l0, w_hi, h)
        flat = gl.reshape(full, [rows, 128]).to(half_dtype, bitcast=True)
        return gl.convert_layout(flat, A_LAYOUT, assert_trivial=True)

    @gluon.jit(do_not_specialize=["M"])
    def _skinny_int4_gluon_kernel(
        x_ptr,  # (M, K) bfloat16 / float16
        w_ptr,  # (N, K / 8) int32
        scale_ptr, zero_ptr, stride_s,  # (N, K / G) float16 each
        bias_ptr,  # (N,) when HAS_BIAS (unsplit only)
        out_ptr,  # split: fp32 partials (SPLIT_K, M, N); unsplit: y (M, N)
        M, N, K, K_WORDS, SPLIT_K,
        GROUP: gl.constexpr, TOKENS: gl.constexpr, SPLIT: gl.constexpr,
        HAS_BIAS: gl.constexpr, FLOAT16: gl.constexpr, STAGES: gl.constexpr,
        X_TILES: gl.constexpr,  # STAGES ≥ 2: the most sub-tiles a program has
        USE_PDL: gl.constexpr,  # launched as a programmatic dependent launch (launch_pdl)
    ):
        WORDS: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [8, 0]],
            lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 16])
        MMA: gl.constexpr = _mma_layout(TOKENS)
        A_LAYOUT: gl.constexpr = _a_layout(TOKENS)
        X_LAYOUT: gl.constexpr = _x_layout(TOKENS)
        x_dtype: gl.constexpr = gl.float16 if FLOAT16 else gl.bfloat16
        X_SHARED: gl.constexpr = _x_shared_layout(TOKENS, FLOAT16)

        rows, w_tile = _weight_subtile(w_ptr, N, K_WORDS, WORDS, 16)
        z_rows = zero_ptr + rows * stride_s
        out_rows = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
        s_rows = scale_ptr + _program_rows(N, gl.SliceLayout(1, MMA)) * stride_s

        x_tile, x_mask = _x_subtile(x_ptr, M, K, TOKENS, X_LAYOUT)
        tile_begin, tile_end = _program_subtiles(K, SPLIT_K)
        acc = gl.zeros([64, TOKENS], gl.float32, MMA)
        if STAGES == 0:
            # x through one shared-memory tile, stored each step; weights one step ahead in
            # registers. The store needs a generic-to-async proxy fence before the wgmma reads
            # it, emitted as a MEMBAR, which waits for the loads in flight (the next step's
            # weights included): that fits the ~1 µs a step measured (the notes above).
            x_smem = gl.allocate_shared_memory(x_dtype, [TOKENS, 128], X_SHARED)
            word = gl.load(w_tile + tile_begin * 16)
            _pdl_wait_then_release(USE_PDL)
            x = gl.load(x_tile + tile_begin * 128, mask=x_mask, other=0.0)
            for t in range(tile_begin, tile_end):
                ahead = gl.minimum(t + 1, tile_end - 1)  # the last tile re-reads itself
                next_word = gl.load(w_tile + ahead * 16)
                next_x = gl.load(x_tile + ahead * 128, mask=x_mask, other=0.0)
                group = (t * 128) // GROUP
                z = gl.load(z_rows + group).to(gl.float32)
                s = gl.load(s_rows + group).to(gl.float32)
                a = _operand(word, z, A_LAYOUT, FLOAT16)
                x_smem.store(_fragment_order(x))
                fence_async_shared()
                gl.thread_barrier()
                part = warpgroup_mma(a, x_smem.permute((1, 0)),
                                     gl.zeros([64, TOKENS], gl.float32, MMA), use_acc=False)
                acc += gl.expand_dims(s, 1) * part
                word, x = next_word, next_x
        else:
            # The program's whole x (X_TILES sub-tiles) stored in shared memory once, behind one
            # fence; the weights through a ring of STAGES sub-tiles (asynchronous copies,
            # STAGES - 1 in flight), so no memory barrier is left inside the loop.
            COPY: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])
            W_SHARED: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
            # One allocation a stage (not one indexed at run time): the compiler's hazard
            # analysis then sees a copy into one stage and the read of another as independent,
            # and the loop keeps a single CTA barrier a step.
            rings = ()
            for first in gl.static_range(STAGES):
                rings = rings + (gl.allocate_shared_memory(gl.int32, [64, 16], W_SHARED),)
            copy_rows = _program_rows(N, gl.SliceLayout(1, COPY))
            copy_words = gl.arange(0, 16, layout=gl.SliceLayout(0, COPY))
            copy_tile = (w_ptr + gl.expand_dims(copy_rows * K_WORDS, 1)
                         + gl.expand_dims(copy_words, 0))
            for first in gl.static_range(STAGES - 1):
                _copy_subtile(rings[first], copy_tile, copy_words, tile_begin + first,
                              tile_end)
            # The zero points and scales of every sub-tile: loaded once (their latency, a new
            # sector every 16 groups, otherwise stalls a step), read back per step. Like the
            # ring's first copies they do not depend on the previous kernel: before the wait.
            GROUPS_SHARED: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
            z_all = gl.allocate_shared_memory(zero_ptr.dtype.element_ty, [X_TILES, 64],
                                              GROUPS_SHARED)
            s_all = gl.allocate_shared_memory(scale_ptr.dtype.element_ty, [X_TILES, 64],
                                              GROUPS_SHARED)
            zeros = ()
            scales = ()
            for i in gl.static_range(X_TILES):
                group = (gl.minimum(tile_begin + i, tile_end - 1) * 128) // GROUP
                zeros = zeros + (gl.load(z_rows + group),)
                scales = scales + (gl.load(s_rows + group),)
            for i in gl.static_range(X_TILES):
                z_all.index(i).store(zeros[i])
                s_all.index(i).store(scales[i])
            _pdl_wait_then_release(USE_PDL)
            # x loaded a chunk of sub-tiles at a time before any is stored (one latency per
            # chunk; 32 registers of x a thread).
            x_all = gl.allocate_shared_memory(x_dtype, [X_TILES, TOKENS, 128], X_SHARED)
            CHUNK: gl.constexpr = 64 // TOKENS
            for chunk in gl.static_range(0, X_TILES, CHUNK):
                pieces = ()
                for i in gl.static_range(chunk, chunk + CHUNK):
                    if i < X_TILES:
                        present = x_mask & (tile_begin + i < tile_end)
                        pieces = pieces + (gl.load(x_tile + (tile_begin + i) * 128,
                                                   mask=present, other=0.0),)
                for i in gl.static_range(chunk, chunk + CHUNK):
                    if i < X_TILES:
                        x_all.index(i).store(_fragment_order(pieces[i - chunk]))
            fence_async_shared()
            for base in range(tile_begin, tile_end, STAGES):  # unrolled a ring's turn
                for j in gl.static_range(STAGES):
                    t = base + j
                    if t < tile_end:
                        step = t - tile_begin
                        async_copy.wait_group(STAGES - 2)  # this thread's copies of t landed
                        gl.thread_barrier()  # everyone's did; the stage read last step is free
                        z = z_all.index(step).load(gl.SliceLayout(1, WORDS)).to(gl.float32)
                        s = s_all.index(step).load(gl.SliceLayout(1, MMA)).to(gl.float32)
                        _copy_subtile(rings[(j + STAGES - 1) % STAGES], copy_tile, copy_words,
                                      t + STAGES - 1, tile_end)
                        word = rings[j].load(WORDS)
                        a = _operand(word, z, A_LAYOUT, FLOAT16)
                        part = warpgroup_mma(a, x_all.index(step).permute((1, 0)),
                                             gl.zeros([64, TOKENS], gl.float32, MMA),
                                             use_acc=False)
                        acc += gl.expand_dims(s, 1) * part

        _store_output(acc, out_ptr, bias_ptr, out_rows, gl.program_id(1), M, N, TOKENS, MMA,
                      SPLIT, HAS_BIAS)

    @gluon.jit
    def _copy_subtile(stage, copy_tile, copy_words, t, tile_end):
        """Starts the asynchronous copy of sub-tile t's words into a shared-memory stage (one
        commit group; past the program's last tile, an empty group: nothing is read)."""
        present = gl.expand_dims(copy_words < (t < tile_end).to(gl.int32) * 16, 0)
        async_copy.async_copy_global_to_shared(stage, copy_tile + t * 16, mask=present)
        async_copy.commit_group()


# Shared memory a program of the staged variant may take (the H200 allows 227 KB a block; at
# most this leaves room for two programs an SM).
STAGED_SHARED_LIMIT = 112 * 1024


def program_subtiles(k: int, split_k: int) -> int:
    """The most 128-column sub-tiles one program of a K-split launch takes."""
    return triton.cdiv(k // 128, split_k)


def staged_shared_bytes(k: int, split_k: int, tokens: int, stages: int) -> int:
    """Shared memory of one staged program: x for its K range, one zero point and one scale a
    row per sub-tile, and the weights' ring."""
    return (program_subtiles(k, split_k) * (tokens * 128 * 2 + 64 * 2 * 2)
            + stages * 64 * 16 * 4)


def staged_unsupported_reason(k: int, split_k: int, tokens: int, stages: int) -> str | None:
    """Why a staged launch cannot keep its x in a program's shared memory, or None."""
    if not stages:
        return None
    need = staged_shared_bytes(k, split_k, tokens, stages)
    if need <= STAGED_SHARED_LIMIT:
        return None
    return (f"stages={stages} keeps x for {program_subtiles(k, split_k) * 128} columns of "
            f"{tokens} tokens in shared memory ({need // 1024} KB > "
            f"{STAGED_SHARED_LIMIT // 1024} KB a program): raise split_k or use stages=0")


def launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           bias: torch.Tensor | None, split_k: int, tokens: int = 16,
           stages: int = 0, pdl: bool = True) -> torch.Tensor:
    """y = x · dequant(W)^T for inputs skinny_int4_unsupported_reason accepted, on sm_90+;
    with `pdl`, launched as a programmatic dependent launch (the weights start loading while
    the previous kernel finishes)."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"skinny_int4 (Gluon): x has {m} rows; it takes 1-{MAX_TOKENS}")
    while tokens < m:  # the smallest of 8, 16, 32, 64 token columns that holds the rows
        tokens *= 2
    split_k = max(1, min(split_k, k // 128))
    reason = staged_unsupported_reason(k, split_k, tokens, stages)
    if reason:
        raise ValueError(f"skinny_int4 (Gluon): {reason}")
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    x_tiles = program_subtiles(k, split_k) if stages else 1
    pdl = pdl and use_pdl(x)
    _skinny_int4_gluon_kernel[(triton.cdiv(n, ROWS), split_k)](
        x, qweight.view(torch.int32), scale, zero, scale.stride(0),
        bias if bias is not None else scale, out, m, n, k, k // 8, split_k,
        GROUP=k // scale.shape[1], TOKENS=tokens, SPLIT=split_k > 1,
        HAS_BIAS=bias is not None, FLOAT16=x.dtype == torch.float16, STAGES=stages,
        X_TILES=x_tiles, USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    if split_k > 1:
        sum_split_k_partials(out, split_k, bias, y, pdl)
    return y
