"""Skinny GEMM for decode: y = x @ W^T with few rows (M ≤ 16), and the fused
silu(x @ gate^T) * (x @ up^T) of a gated MLP.

Layout: x (M, K) and W (N, K) row-major, the checkpoint's (out, in) order, so each output
row's weights are one contiguous K-run. Program p owns output columns [p·BLOCK_N,
(p+1)·BLOCK_N) for all M rows, so every weight byte is read exactly once:

    W (N, K)         K →  BLOCK_K tiles, 16-byte loads along K
    ┌──────────────────────────────┐
    │ program 0: BLOCK_N rows      │ ── Σ_k x[m, k] · W[n, k] ──→ y[:, 0:BLOCK_N]
    │ program 1                    │
    │ ...                          │
    └──────────────────────────────┘
    gate|up (2I, K): program p reads rows p·BLOCK_N.. of gate and the same rows of up (+I).

Bytes: at batch 1 a step of Llama-3.1-8B reads 15.0 GB of bf16 weights and a few KB of
activations, so each GEMV is a pure weight stream: q|k|v 6144×4096 is 50 MB, 17 µs at the
H100's 2.97 TB/s copy rate. At that size the ramp-up (CTAs launching, the first loads'
~1 µs latency) and the tail (the last CTAs draining) are a large share of the kernel, and
cuBLAS reaches only 1.4–1.7 TB/s.

Why PDL (programmatic dependent launch, sm_90+): launched with `launch_pdl=True`, a kernel's
CTAs may start while the previous kernel in the stream is still running. Weights do not
depend on the previous kernel, so each program issues its first weight tile load, then
`gdc_wait()`s for the previous kernel's output (x) to be complete and visible, then
`gdc_launch_dependents()` so the next kernel can start prefetching in turn. The ramp-up of
one kernel overlaps the tail of the one before. Nothing is stored before the wait: a buffer
the previous kernel still reads is never overwritten. Every program waits, so completion is
transitive down the chain (kernel n+1 completing implies kernel n completed). Triggering after
the wait keeps at most one GEMV prefetching ahead of the running one. Under Triton's
interpreter, or before sm_90, USE_PDL is False and neither instruction is emitted.

Bytes in flight: a program keeps the next weight tile loading while it multiplies the
current one, so about N·BLOCK_K·2 bytes are in flight (2 MB for N = 4096, BLOCK_K = 256);
Little's law at ~3 TB/s and ~1–1.5 µs loaded latency asks for 3–5 MB. Registers cap that, so
`l2_prefetch_tiles` (sm_90 `cp.async.bulk.prefetch.L2`) can request further tiles into L2
without holding registers; under PDL those requests also go out before the wait.

Accumulation is fp32. M = 1: each thread multiplies its 16-byte run of 8 weights by x and
keeps one partial per row, summed across lanes once at the end. M > 1: M is padded to 16 and
tl.dot (tensor cores) does the products; the padding costs no weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kiln.kernels.triton_utils import (
    dot_dtype,
    dot_precision,
    has_sm90,
    interpreter_active,
    use_pdl,
)

MAX_ROWS = 16  # M up to one tl.dot tile; larger batches are cuBLAS's job
K_MULTIPLE = 64  # every BLOCK_K is a power of 2 ≥ 64 dividing K: no K masks, 16-byte loads


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters; `default_config` picks them, a tuner may pass its own."""

    block_n: int  # output columns per program (≥ 16 when M > 1: a tl.dot tile)
    block_k: int  # K per loaded tile (power of 2); clipped to the largest power of 2 dividing K
    num_warps: int = 4
    num_stages: int = 1  # the loop already keeps one tile in flight by hand
    # Weight tiles requested into L2 ahead of the one in registers (cp.async.bulk.prefetch,
    # sm_90): more bytes in flight than registers allow. 0 = off; ignored off the GPU.
    l2_prefetch_tiles: int = 0


def default_config(m: int, gate_up: bool) -> GemvConfig:
    # Registers per thread grow ~3.3× the weight elements a thread holds per tile (the tile in
    # use, the next one, their fp32 copies): 16×256 over 128 threads is 32 elements, 107
    # registers (sm_90 build), so 4 programs fit on an SM — two for this kernel's grid at
    # N = 4096 and two for the next kernel's programs to start early under PDL. gate|up holds
    # two tiles: half the rows for M = 1; half the K for the tl.dot path (127, not 251).
    if m == 1:
        return GemvConfig(block_n=8 if gate_up else 16, block_k=256)
    return GemvConfig(block_n=16, block_k=128 if gate_up else 256)


# Batch-invariant mode (ops.linear under KILN_BATCH_INVARIANT=1): one tiling for every M ≤ 16,
# the tl.dot path's default, so the summation order of a row never depends on M.
BATCH_INVARIANT_CONFIG = GemvConfig(block_n=16, block_k=256)


def decode_config(out_features: int, in_features: int) -> GemvConfig:
    """Batch-1 launch parameters by matrix size, from the H100 sweep of
    benchmarks/decode_chain_bench.py (best config with PDL, L2-rotated weights, µs per launch
    against cuBLAS): large matrices stream best as many narrow programs (4 rows, 4 warps:
    gate|up 77.4 vs 81.8, down 40.8 vs 43.9, lm_head 335.6 vs 376.9); the 33–50 MB ones need
    wider programs with 8 warps to have enough bytes in flight (o 12.7 vs 15.8 with 16 rows,
    q|k|v 18.9 vs 20.8 with 8 rows and 1024-wide K tiles)."""
    if out_features * in_features >= 48 * 2**20:  # ≥ 96 MB of bf16
        return GemvConfig(block_n=4, block_k=512, num_warps=4)
    if out_features <= 4096:
        return GemvConfig(block_n=16, block_k=512, num_warps=8)
    return GemvConfig(block_n=8, block_k=1024, num_warps=8)


def skinny_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(M, K) @ (N, K)^T [+ bias] in fp32, rounded once to x's dtype."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def skinny_gate_up_silu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight = [gate (I rows) | up (I rows)] (2I, K) → silu(x @ gate^T) * (x @ up^T) (M, I),
    in fp32, rounded once to x's dtype."""
    gate, up = (x.float() @ weight.float().T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@triton.jit
def _accumulate(acc, x, w, DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    if DOT:  # acc (BLOCK_M, BLOCK_N) += x (BLOCK_M, BLOCK_K) @ w^T (BLOCK_K, BLOCK_N)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    else:  # acc (BLOCK_N, BLOCK_K // 8) += w * x (x broadcast), summed over runs of 8 along K
        BLOCK_N: tl.constexpr = w.shape[0]
        BLOCK_K: tl.constexpr = w.shape[1]
        # Each thread's 16-byte load is 8 consecutive K: summing those 8 in the thread keeps
        # one fp32 partial per row and thread (not 8), so registers go to loads in flight.
        products = (w.to(tl.float32) * x.to(tl.float32)).reshape(BLOCK_N, BLOCK_K // 8, 8)
        acc += tl.sum(products, axis=2)
    return acc


@triton.jit
def _load_x(ptrs, mask, DOT: tl.constexpr):
    if DOT:
        x = tl.load(ptrs, mask=mask, other=0.0)  # rows M..15 of the tl.dot tile are zeros
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _finish(acc, DOT: tl.constexpr):
    if DOT:
        out = acc  # (BLOCK_M, BLOCK_N)
    else:
        out = tl.sum(acc, axis=1)[None, :]  # (1, BLOCK_N)
    return out


@triton.jit
def _prefetch_l2(ptrs, NBYTES: tl.constexpr):
    """Ask L2 to fetch NBYTES (a multiple of 16) from each 16-byte-aligned address: no
    registers held, nothing waited for. sm_90+ only (the interpreter never reaches it)."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; // $0", "=r,l,r",
        [ptrs, tl.full(ptrs.shape, NBYTES, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _prefetch_tile(w_ptr, row, col, N, K, GATE_UP: tl.constexpr, BLOCK_K: tl.constexpr,
                   PIECES: tl.constexpr, ROWS_PER_WARP: tl.constexpr, ROW_STEP: tl.constexpr):
    """L2-prefetch this warp's pieces of one (BLOCK_N, BLOCK_K) weight tile (both halves for
    gate|up); `row`, `col` are per-thread tensors equal across each warp."""
    for r in tl.static_range(ROWS_PER_WARP):
        clamped = tl.minimum(row + r * ROW_STEP, N - 1).to(tl.int64)
        _prefetch_l2(w_ptr + clamped * K + col, BLOCK_K // PIECES * 2)
        if GATE_UP:
            _prefetch_l2(w_ptr + (clamped + N) * K + col, BLOCK_K // PIECES * 2)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # (M, K) contiguous
    w_ptr,  # (N, K) contiguous; (2N, K) [gate | up] when GATE_UP
    bias_ptr,  # (N,) when HAS_BIAS
    y_ptr,  # (M, N) contiguous
    M, N, K,
    HAS_BIAS: tl.constexpr, GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    L2_AHEAD: tl.constexpr, NUM_THREADS: tl.constexpr,
    L2_PIECES: tl.constexpr, L2_ROWS_PER_WARP: tl.constexpr, L2_ROW_STEP: tl.constexpr,
):
    DOT: tl.constexpr = BLOCK_M > 1
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N re-read row N-1 rather than being masked: the weight loads stay unmasked
    # (16 bytes wide); the store below drops them.
    rows = tl.minimum(cols, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_tile = w_ptr + rows[:, None] * K + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    up_tile = w_ptr + (rows + N)[:, None] * K + offs_k[None, :]

    if L2_AHEAD > 0:
        # The bulk prefetch takes one address per warp (ptxas loops over distinct lane values),
        # so each warp prefetches whole pieces of its own rows: warp w covers tile row
        # w // L2_PIECES (+ L2_ROW_STEP·r), piece w % L2_PIECES of it.
        warp = tl.arange(0, NUM_THREADS) // 32  # (NUM_THREADS,): equal across a warp's lanes
        pf_row = tl.program_id(0) * BLOCK_N + warp // L2_PIECES
        pf_col = (warp % L2_PIECES) * (BLOCK_K // L2_PIECES)
        for j in tl.static_range(1, L2_AHEAD + 1):
            if j * BLOCK_K < K:
                _prefetch_tile(w_ptr, pf_row, pf_col + j * BLOCK_K, N, K, GATE_UP, BLOCK_K,
                               L2_PIECES, L2_ROWS_PER_WARP, L2_ROW_STEP)

    # The weights never depend on the previous kernel: start streaming them before waiting.
    w = tl.load(w_tile)
    if GATE_UP:
        u = tl.load(up_tile)
    if USE_PDL:
        gdc_wait()  # the previous kernel has finished and its writes (our x) are visible
        gdc_launch_dependents()  # let the next kernel launch and prefetch its own weights

    if DOT:
        offs_m = tl.arange(0, BLOCK_M)
        x_tile = x_ptr + offs_m[:, None] * K + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
        x_mask = offs_m[:, None] < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    else:
        # M == 1: x broadcast to the weight tile's shape, so it is loaded straight into the
        # weight tile's register layout (the compiler sees the pointers are equal along N and
        # issues one 16-byte load per thread) instead of through shared memory and 2 barriers.
        x_tile = x_ptr + (offs_k[None, :] + 0 * rows[:, None])  # (BLOCK_N, BLOCK_K)
        x_mask = None
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), tl.float32)
    acc_up = tl.zeros_like(acc)

    # Each step loads tile k+1 (weights and x) before using tile k: one tile always in flight.
    x = _load_x(x_tile, x_mask, DOT)
    for k in range(0, K - BLOCK_K, BLOCK_K):
        if L2_AHEAD > 0:
            ahead = k + (L2_AHEAD + 1) * BLOCK_K
            if ahead < K:
                _prefetch_tile(w_ptr, pf_row, pf_col + ahead, N, K, GATE_UP, BLOCK_K,
                               L2_PIECES, L2_ROWS_PER_WARP, L2_ROW_STEP)
        w_next = tl.load(w_tile + k + BLOCK_K)
        if GATE_UP:
            u_next = tl.load(up_tile + k + BLOCK_K)
        x_next = _load_x(x_tile + k + BLOCK_K, x_mask, DOT)
        acc = _accumulate(acc, x, w, DOT, DOT_DTYPE, PRECISION)
        if GATE_UP:
            acc_up = _accumulate(acc_up, x, u, DOT, DOT_DTYPE, PRECISION)
            u = u_next
        w = w_next
        x = x_next
    acc = _accumulate(acc, x, w, DOT, DOT_DTYPE, PRECISION)
    out = _finish(acc, DOT)  # (BLOCK_M, BLOCK_N) fp32
    if GATE_UP:
        acc_up = _accumulate(acc_up, x, u, DOT, DOT_DTYPE, PRECISION)
        out = out / (1.0 + tl.exp(-out)) * _finish(acc_up, DOT)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]

    out_rows = tl.arange(0, BLOCK_M)
    mask = (out_rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptr + out_rows[:, None] * N + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=mask)


def _unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.dim() != 2 or weight.dim() != 2:
        return f"x and weight must be 2-D; got {tuple(x.shape)} and {tuple(weight.shape)}"
    if not (x.is_cuda or interpreter_active()):
        return f"Triton kernels run on CUDA tensors (or under TRITON_INTERPRET=1); got {x.device}"
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return f"x and weight must both be bfloat16 or float16; got {x.dtype} and {weight.dtype}"
    if x.shape[0] > MAX_ROWS:
        return f"x has {x.shape[0]} rows; the skinny kernel takes at most {MAX_ROWS}"
    if x.shape[1] != weight.shape[1]:
        return f"x has K={x.shape[1]} but weight has K={weight.shape[1]}"
    if x.shape[1] % K_MULTIPLE:
        return f"K={x.shape[1]} must be a multiple of {K_MULTIPLE}"
    if not (x.is_contiguous() and weight.is_contiguous()):
        return "x and weight must be contiguous; call .contiguous() first"
    return None


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_linear(x, weight)` runs; otherwise the dispatcher uses cuBLAS."""
    return _unsupported_reason(x, weight) is None


def _launch(x, weight, bias, out_features: int, gate_up: bool, pdl: bool,
            config: GemvConfig | None, tensor_cores: bool = False) -> torch.Tensor:
    reason = _unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"skinny GEMM: {reason}")
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return y
    config = config or default_config(m, gate_up)
    dot = m > 1 or tensor_cores
    block_m = MAX_ROWS if dot else 1
    block_n = max(16, config.block_n) if dot else config.block_n  # tl.dot needs ≥ 16
    block_k = min(config.block_k, k & -k)  # k & -k: the largest power of 2 dividing k (≥ 64)
    sm90 = has_sm90(x)
    pdl = pdl and use_pdl(x)
    # L2 prefetch: each warp takes whole rows of a tile, or 1/pieces of one row.
    warps = config.num_warps
    l2_pieces, l2_rows_per_warp = max(1, warps // block_n), max(1, block_n // warps)
    l2_ahead = config.l2_prefetch_tiles if sm90 else 0
    # The bulk prefetch moves 16-byte multiples from 16-byte-aligned addresses.
    if (block_k * 2 // l2_pieces) % 16 or weight.data_ptr() % 16:
        l2_ahead = 0
    grid = (triton.cdiv(out_features, block_n),)
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        m, out_features, k,
        HAS_BIAS=bias is not None, GATE_UP=gate_up,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype(x), PRECISION=dot_precision(x), USE_PDL=pdl,
        L2_AHEAD=l2_ahead, NUM_THREADS=32 * warps, L2_PIECES=l2_pieces,
        L2_ROWS_PER_WARP=l2_rows_per_warp, L2_ROW_STEP=warps // l2_pieces,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    return y


def skinny_linear(
    x: torch.Tensor,  # (M, K), M ≤ 16
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None = None,  # (N,)
    *,
    pdl: bool = False,
    config: GemvConfig | None = None,
    tensor_cores: bool = False,
) -> torch.Tensor:  # (M, N), x's dtype
    """Triton twin of `skinny_linear_reference`. With `pdl`, launched as a programmatic
    dependent launch (sm_90+; ignored elsewhere): it may start before the previous kernel ends
    and prefetch weights meanwhile. Safe inside CUDA graphs and after any kernel.
    tensor_cores: M = 1 too takes the tl.dot path (rows padded to 16) rather than the
    CUDA-core one, so with one `config` a row's result is the same bits at every M ≤ 16."""
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({weight.shape[0]},) tensor of {x.dtype}; "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    return _launch(x, weight, bias, weight.shape[0], False, pdl, config, tensor_cores)


def skinny_gate_up_silu(
    x: torch.Tensor,  # (M, K), M ≤ 16
    weight: torch.Tensor,  # (2I, K): [gate | up]
    *,
    pdl: bool = False,
    config: GemvConfig | None = None,
) -> torch.Tensor:  # (M, I)
    """Triton twin of `skinny_gate_up_silu_reference`: both projections and the activation in
    one kernel, so the (M, 2I) intermediate is never written."""
    if weight.dim() == 2 and weight.shape[0] % 2:
        raise ValueError(f"gate|up weight needs an even number of rows; got {weight.shape[0]}")
    return _launch(x, weight, None, weight.shape[0] // 2 if weight.dim() == 2 else 0, True,
                   pdl, config)
