"""FP8 W8A8 linear for decode (M ≤ 16 tokens) on the tensor cores: a swap-AB skinny GEMM.

    y (M, N) = x (M, K) · W^T,   W E4M3 (N, K) with float32 scales (N,) per output channel,
    x → E4M3 per token (amax/448, or a static per-tensor scale) by `quantize_fp8_per_token`.

Swap-AB: the kernel computes y^T = W · x_q^T. A Hopper tensor-core MMA (wgmma) is 64 rows
tall per warpgroup (M ∈ 64·w) and 8..256 wide (N, steps of 8), with K = 32 for fp8. Put the
1-16 tokens on M and the MMA is ≥ 75 % padding, and the weight tile must be the narrow N side
(the earlier attempt: BLOCK_M = 16 tokens, 32 weight columns, one stage, which Triton lowers to
mma.sync, 2-3× slower than the bf16 GEMV). Swapped, the weight rows fill M (BLOCK_N = 64 or
128 rows per program) and the tokens are N (padded to TOKENS = 16, or 8):

    W (N, K) E4M3                          x_q^T (K, TOKENS) E4M3, rows ≥ M masked to 0
    ┌──────────────────────────────┐       ┌──┐
    │ program (n, s): BLOCK_N rows │  ·    │  │  → acc (BLOCK_N, TOKENS) fp32
    │ K range s of SPLIT_K         │       │  │    y[m, n] = acc · x_scale[m] · w_scale[n]
    └──────────────────────────────┘       └──┘

Both operands are K-major (contiguous along K), which is what fp8 wgmma requires; they go
straight from global memory through a `num_stages`-deep cp.async pipeline in shared memory
into the MMA. Nothing is converted on the CUDA cores: the old M = 1 path converted every
weight to fp32 (16 conversions per SM per clock against ~17 weight bytes per clock of
bandwidth), which capped it at about half the copy rate.

Bytes and FLOPs at M = 1 (fp8 weights + fp32 scales; roofline at ~4.1 TB/s, the H200's copy
rate): every shape is a weight stream. Even at M = 16 the intensity is 32 FLOP/byte, far
below the ~250 FLOP/byte where the H200's fp8 tensor cores (~1,000 TFLOP/s) would limit, so
padding the tokens to 16 costs no time.

    shape (Llama-3.1-8B)      N × K             weight bytes   2·N·K FLOPs   µs at 4.1 TB/s
    q|k|v                     6144 × 4096         25.2 MB       50 M          6.1
    o                         4096 × 4096         16.8 MB       34 M          4.1
    gate|up                  28672 × 4096        117.4 MB      235 M         28.6
    down                      4096 × 14336        58.7 MB      117 M         14.3
    lm_head                 128256 × 4096        525.3 MB     1051 M        128.1

Split-K: the H200 has 132 SMs. With BLOCK_N = 128, q|k|v has 48 column blocks and o and down
32: most SMs would idle while a few stream. SPLIT_K programs per column block each cover
K / SPLIT_K (whole BLOCK_K tiles, as even as tiles allow) and combine in one of three ways:
  * "reduce" (the default): each writes its scaled fp32 partial to a (SPLIT_K, M, N)
    workspace; a second tiny kernel sums partials 0..SPLIT_K-1 in order and adds the bias
    (deterministic, no buffer to zero).
  * "atomic": the programs `atomic_add` into a zeroed fp32 buffer and the second kernel only
    adds the bias and casts (the zeroing is a memset in the stream).
  * "serial": no second kernel. In a decode step each extra launch costs ~2 µs of launch
    gap, 64 per Llama-8B token. Each program writes its partial as in "reduce", then bumps
    its column block's int32 arrival counter; the program that arrives last sums the
    SPLIT_K partials in index order, adds the bias, stores y (bit-identical to "reduce") and
    resets the counter to 0, so the persistent counter buffer (`split_k_counters`) is clean
    for the next launch with no memset. Ordering: every thread's partial stores precede
    (CTA barrier, then a gpu-scope release fence) the acq_rel counter increment, and the
    last program's partial loads (`.cg`, past L1) follow its acquire of that counter, so
    the release-acquire pair on one counter makes all SPLIT_K partials visible to it. The
    counters serve one stream at a time: two serial launches running concurrently on one
    device (different streams) would share them.
All three are CUDA-graph safe and need no host sync. benchmarks/skinny_sweep.py measures them;
on the H200 "serial" timed the same as "reduce" (the second launch was already hidden under
PDL: o 9.72 vs 9.68 µs, down 26.21 vs 26.10 at M = 1) and "atomic" 1.4-1.8 µs slower, so
"reduce" stays the default (results/s8-h200-skinny-split-modes.json).

PDL (programmatic dependent launch, sm_90+, as kiln/kernels/gemv.py): the weights never
depend on the previous kernel, so before `gdc_wait` each program asks L2 for the first tiles
the pipeline will load (`prefetch.global.L2`, no registers held); after the wait the
pipeline's first loads hit L2 while the previous kernel's tail drains.

Accumulation: fp32. Triton's default for fp8 on sm_90 lets wgmma accumulate all of K in its
reduced-precision accumulator; `max_num_imprecise_acc` = 128 adds each 128-deep partial into
an fp32 accumulator, as CUTLASS's default fp8 GEMMs do (promotion interval 4 × k32).

The torch reference is `fp8_linear_reference` (kiln/kernels/quant_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kiln.kernels.quant_linear import FP8_DTYPE, quantize_fp8_per_token
from kiln.kernels.triton_utils import interpreter_active, use_pdl

MAX_TOKENS = 16  # the MMA's N at most; more rows are a GEMM (torch._scaled_mm)
MIN_BLOCK_K = 32  # one fp8 wgmma consumes K in steps of 32
PROMOTION_INTERVAL = 128  # products per fp32 promotion of the MMA accumulator (see above)
NUM_SMS = 132  # H100 / H200: only for default_skinny_fp8_config's split rule
SPLIT_K_MODES = ("reduce", "atomic", "serial")
# "serial" mode's arrival counters: at least this many per device, one per column block
# (the LM head of a 128k-vocabulary model has 2,004 blocks of 64 rows), so that they never
# have to grow while a CUDA graph is being captured.
MIN_SPLIT_K_COUNTERS = 4096


@dataclass(frozen=True)
class SkinnyFp8Config:
    """Launch parameters; `default_skinny_fp8_config` guesses them, the sweep measures them."""

    block_n: int = 128  # weight rows per program: the MMA's M (wgmma: a multiple of 64)
    block_k: int = 256  # K per pipelined tile; clipped to the largest power of 2 dividing K
    tokens: int = 16  # the MMA's N: M padded to 8 or 16 (raised to 16 when M > 8)
    split_k: int = 1  # programs per column block along K (clipped to K / block_k)
    num_warps: int = 4
    num_stages: int = 4  # tiles in the shared-memory pipeline (num_stages - 1 in flight)
    split_k_mode: str = "reduce"  # how split partials combine: "reduce", "atomic", "serial"
    pdl: bool = True  # programmatic dependent launch where available (sm_90+, not interpreted)

    def __post_init__(self):
        if self.block_n < 64 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of 2 ≥ 64 (a wgmma is 64 rows per "
                             f"warpgroup); got {self.block_n}")
        if self.block_k < MIN_BLOCK_K or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of 2 ≥ {MIN_BLOCK_K} (fp8 MMA K step); "
                             f"got {self.block_k}")
        if self.tokens not in (8, 16):
            raise ValueError(f"tokens must be 8 or 16 (the MMA's N); got {self.tokens}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be ≥ 1; got {self}")
        if self.split_k_mode not in SPLIT_K_MODES:
            raise ValueError(f"split_k_mode must be one of {SPLIT_K_MODES}; "
                             f"got {self.split_k_mode!r}")


def default_skinny_fp8_config(m: int, n: int, k: int) -> SkinnyFp8Config:
    """The rule the tilings sweep found on the H200 (benchmarks/skinny_sweep.py,
    results/s8-h200-skinny-sweep.json): 64-row programs, 256-deep tiles, 4 warps, 4 stages,
    16 token columns (8 lowers to mma.sync with the weights converted to f16, not wgmma: it
    measured 6 % faster on q|k|v only, 1-4 % slower elsewhere); split K in two only while
    there are fewer programs than
    two thirds of the SMs (each split adds a partial-sum pass). At M = 1 this is within 4 %
    of the best measured tiling of every Llama-3.1-8B linear, where the earlier guess (128-row
    programs, split until two programs per SM) was 21-31 % slower on q|k|v, gate|up and down:
    99.7 → 81.5 µs for one layer's four linears."""
    block_n, block_k = 64, 256
    tiles = max(1, k // min(block_k, k & -k))
    split_k = default_split_k(triton.cdiv(n, block_n), tiles)
    return SkinnyFp8Config(block_n, block_k, tokens=MAX_TOKENS, split_k=split_k)


def default_split_k(column_blocks: int, tiles: int, shallower: int = 1) -> int:
    """The split rule above: double the split while the programs number fewer than two thirds
    of the SMs (times `shallower`: K tiles that many times less deep than 256 make a
    latency-bound loop, skinny_int8's clipped tiles) and each split keeps >= 4 tiles."""
    split_k = 1
    while (column_blocks * split_k < 2 * NUM_SMS // 3 * shallower
           and tiles // (2 * split_k) >= 4):
        split_k *= 2
    return split_k


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at each address; nothing is waited for or held.
    GPU only (the interpreter has no inline assembly; USE_PDL is False there)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _release_fence_gpu():
    """fence.acq_rel.gpu: this thread's earlier writes (and those the CTA barrier before it
    ordered) are visible GPU-wide before its later ones. GPU only: the interpreter has no
    inline assembly (and runs programs one after another, so needs no fence)."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _int8_times_scale(w, scale, dtype: tl.constexpr):
    """int8 weights (rows, K) times their row's float16 scale (rows,) → `dtype` (bf16 or
    fp16), rounded once, with no int-to-float conversion instruction: 2^23's bits plus q + 128
    (0..255, in the low mantissa byte) read as the float 2^23 + q + 128 (exact), and one
    subtraction leaves q (kernels/int_gemv.py's trick); the product is exact in fp32 (8 by 11
    significant bits). Per weight: a sign extension, an integer add, an fp32 subtract and
    multiply, half a packing conversion."""
    field = w.to(tl.int32) + 0x4B000080  # 2^23 as fp32 bits, plus 128
    q = field.to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
    return (q * scale.to(tl.float32)[:, None]).to(dtype)


@triton.jit(do_not_specialize=["M"])
def _skinny_fp8_kernel(
    xq_ptr,  # (M, K) E4M3, contiguous; W8A16: bfloat16 / float16
    x_scale_ptr,  # (M,) float32 (unused by W8A16)
    w_ptr,  # (N, K) E4M3, contiguous; W8A16: int8
    w_scale_ptr,  # (N,) float32; W8A16: float16, one per output channel
    bias_ptr,  # (N,) when HAS_BIAS (read unsplit and by "serial"'s last program)
    out_ptr,  # split: fp32 partials (SPLIT_K, M, N), or (M, N) if "atomic"; unsplit: y (M, N)
    y_ptr,  # (M, N): "serial" only (its last program per column block writes y)
    counter_ptr,  # (≥ column blocks,) int32, zero between launches: "serial" only
    M, N, K, SPLIT_K,
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,  # "unsplit", or the split-K mode: "reduce", "atomic" or "serial"
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TOKENS: tl.constexpr,
    PROMOTE: tl.constexpr, PREFETCH_TILES: tl.constexpr, USE_PDL: tl.constexpr,
    # False under the interpreter: no inline assembly there (and W8A16 dots in fp32)
    GPU_FENCE: tl.constexpr,
    W8A16: tl.constexpr = False,  # int8 weights, 16-bit x (kernels/skinny_int8.py)
    # W8A16 only: 0 = one scale per output channel (w_scale_ptr (N,), applied after the MMA);
    # else the inputs per scale (w_scale_ptr (N, K / GROUP), float16), BLOCK_K dividing it
    GROUP: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features = weight rows
    # Rows past N re-read row N-1 instead of masking: the weight loads stay unmasked and
    # 16 bytes wide; the store drops those rows.
    rows = tl.minimum(cols, N - 1).to(tl.int64)
    # Token block: program_id(2). Every launch has one except kernels/int_gemm.py's given a
    # config of fewer token columns than rows (unsplit or "reduce" only: "serial"'s counters
    # are per column block and assume one).
    tokens = tl.program_id(2) * TOKENS + tl.arange(0, TOKENS)
    offs_k = tl.arange(0, BLOCK_K)
    # This program's share of the K tiles: as even as whole tiles allow.
    tiles = K // BLOCK_K
    tile_begin = pid_k * tiles // SPLIT_K
    tile_end = (pid_k + 1) * tiles // SPLIT_K
    w_tile = w_ptr + rows[:, None] * K + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    x_tile = xq_ptr + tokens[:, None] * K + offs_k[None, :]  # (TOKENS, BLOCK_K)
    x_mask = tokens[:, None] < M  # padding tokens read as 0

    if USE_PDL:
        if PREFETCH_TILES > 0:
            # Weights do not depend on the previous kernel: start them toward L2 first.
            lines = w_ptr + rows[:, None] * K + tl.arange(0, BLOCK_K // 128)[None, :] * 128
            for t in tl.static_range(PREFETCH_TILES):
                if tile_begin + t < tile_end:
                    _prefetch_l2(lines + (tile_begin + t) * BLOCK_K)
        gdc_wait()  # the previous kernel (the quantiser: our x_q) has finished
        gdc_launch_dependents()

    acc = tl.zeros((BLOCK_N, TOKENS), tl.float32)
    for t in range(tile_begin, tile_end):  # pipelined num_stages deep by the compiler
        w = tl.load(w_tile + t * BLOCK_K)
        x = tl.load(x_tile + t * BLOCK_K, mask=x_mask, other=0.0)
        if W8A16 and GROUP:
            # Group scales: each weight times its group's scale before the MMA (one scale a
            # row a tile: BLOCK_K divides GROUP), as the dequantise path's weight would be.
            w_scale = tl.load(w_scale_ptr + rows * (K // GROUP) + t * BLOCK_K // GROUP)
            if GPU_FENCE:
                acc = tl.dot(_int8_times_scale(w, w_scale, x.dtype), tl.trans(x), acc)
            else:  # the interpreter: the same bits, products kept in fp32
                acc = tl.dot(_int8_times_scale(w, w_scale, tl.float32),
                             tl.trans(x.to(tl.float32)), acc)
        elif W8A16:
            # Every int8 is exactly a bf16 and an fp16. Triton converts in registers after
            # the shared-memory pipeline with bit operations (a PRMT puts a byte under the
            # exponent of 128, two LOP3s and a packed subtraction finish two weights), no
            # conversion instructions; fp32 accumulation needs no promotion.
            # (The interpreter computes bf16 on its raw bits: fp32 there, as exact.)
            if GPU_FENCE:
                acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
            else:
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
        else:
            acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=PROMOTE)

    # Scaled here, in the reference's order ((x_q · w^T) · x_scale · w_scale): partials of a
    # split sum to the same y, and the second kernel needs no scales.
    if W8A16 and GROUP:
        out = acc
    elif W8A16:
        out = acc * tl.load(w_scale_ptr + rows).to(tl.float32)[:, None]
    else:
        w_scale = tl.load(w_scale_ptr + rows).to(tl.float32)
        x_scale = tl.load(x_scale_ptr + tokens, mask=tokens < M, other=0.0)
        out = acc * x_scale[None, :] * w_scale[:, None]  # (BLOCK_N, TOKENS)
    mask = (tokens[None, :] < M) & (cols[:, None] < N)
    offsets = tokens[None, :] * N + cols[:, None]  # y[m, n] of the (M, N) output
    if MODE == "atomic":
        tl.atomic_add(out_ptr + offsets, out, mask=mask, sem="relaxed")
    elif MODE == "reduce":
        tl.store(out_ptr + pid_k * M * N + offsets, out, mask=mask)
    elif MODE == "serial":
        tl.store(out_ptr + pid_k * M * N + offsets, out, mask=mask)
        # Release: all of this CTA's partial stores, then the counter (one thread's atomic).
        tl.debug_barrier()
        if GPU_FENCE:
            _release_fence_gpu()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")  # count before ours
        if arrived == SPLIT_K - 1:  # last of the column block: every partial is written
            # Acquired above; .cg reads L2, never a stale L1 line. Summed as the reduce
            # kernel does (partial 0, += 1..SPLIT_K-1, += bias): the same bits.
            total = tl.load(out_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            for part in range(1, SPLIT_K):
                total += tl.load(out_ptr + part * M * N + offsets, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=cols < N,
                                 other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + offsets, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(counter_ptr + pid_n, 0)  # clean for the next launch: no memset
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["TOTAL"])
def _split_k_sum_kernel(
    partial_ptr,  # (PARTS, M, N) float32
    bias_ptr, y_ptr, TOTAL, N, PARTS,  # TOTAL = M·N
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for part in range(1, PARTS):
        acc += tl.load(partial_ptr + part * TOTAL + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_SPLIT_K_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Counter buffers replaced by a larger one: a CUDA graph captured earlier may still address
# them, so they are never freed (the allocator would hand their memory to someone else).
_RETIRED_SPLIT_K_COUNTERS: list[torch.Tensor] = []


def split_k_counters(device: torch.device, column_blocks: int) -> torch.Tensor:
    """The persistent, zero-initialised int32 arrival counters of "serial" split-K on
    `device` (≥ column_blocks of them; each launch leaves them at 0). Growing allocates a new
    zeroed buffer, which must not happen while a CUDA graph is being captured: the zeroing
    would only be recorded into the graph, not run, and the buffer would come from the
    graph's private pool. MIN_SPLIT_K_COUNTERS makes growing never happen for real models,
    and the eager warm-up before capture (which Triton's compile needs anyway) allocates."""
    counters = _SPLIT_K_COUNTERS.get(device)
    if counters is not None and counters.numel() >= column_blocks:
        return counters
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"serial split-K needs {column_blocks} column-block counters on {device} but has "
            f"{0 if counters is None else counters.numel()}, and they cannot be allocated "
            "during CUDA-graph capture: run the same linear once eagerly before capturing, or "
            "use split_k_mode='reduce'")
    if counters is not None:
        _RETIRED_SPLIT_K_COUNTERS.append(counters)
    counters = torch.zeros(max(MIN_SPLIT_K_COUNTERS, triton.next_power_of_2(column_blocks)),
                           dtype=torch.int32, device=device)
    _SPLIT_K_COUNTERS[device] = counters
    return counters


def _check_inputs(x, weight, weight_scale, input_scale, bias, x_scale, out_dtype) -> None:
    if x_scale is not None:  # x quantised by its producer (kernels/fused_quant.py)
        if x.dim() != 2 or x.dtype != FP8_DTYPE:
            raise ValueError(f"with x_scale, x must be 2-D {FP8_DTYPE}; got {tuple(x.shape)} "
                             f"{x.dtype}")
        if x_scale.shape != (x.shape[0], 1) or x_scale.dtype != torch.float32:
            raise ValueError(f"x_scale must be float32 ({x.shape[0]}, 1) (one per row); got "
                             f"{tuple(x_scale.shape)} {x_scale.dtype}")
        if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"with x_scale, out_dtype must be bfloat16, float16 or float32; "
                             f"got {out_dtype}")
    elif x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be 2-D bfloat16, float16 or float32; got {tuple(x.shape)} "
                         f"{x.dtype}")
    if not (x.is_cuda or interpreter_active()):
        raise ValueError(f"x is on {x.device}: the Triton kernels run on CUDA tensors, or on "
                         "the CPU under TRITON_INTERPRET=1")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along K; call .contiguous() first")
    if x.shape[0] > MAX_TOKENS:
        raise ValueError(f"x has {x.shape[0]} rows; the skinny FP8 kernel takes at most "
                         f"{MAX_TOKENS} (use torch._scaled_mm above)")
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D {FP8_DTYPE} (N, K) tensor; got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but weight has K={k}")
    if k % MIN_BLOCK_K:
        raise ValueError(f"K={k} must be a multiple of {MIN_BLOCK_K} (the fp8 MMA's K step)")
    if weight_scale.shape != (n,) or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 ({n},) (one per output row); got "
                         f"{tuple(weight_scale.shape)} {weight_scale.dtype}")
    if input_scale is not None and (input_scale.numel() != 1
                                    or input_scale.dtype != torch.float32):
        raise ValueError(f"input_scale must be one float32 value (static per-tensor scale); "
                         f"got {tuple(input_scale.shape)} {input_scale.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({n},) tensor; got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("weight_scale", weight_scale),
                         ("input_scale", input_scale), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def skinny_fp8_linear(
    x: torch.Tensor,  # (M, K), M ≤ 16
    weight: torch.Tensor,  # (N, K) E4M3
    weight_scale: torch.Tensor,  # (N,) float32
    input_scale: torch.Tensor | None = None,  # (1,) float32: static; None: dynamic per token
    bias: torch.Tensor | None = None,  # (N,)
    *,
    x_scale: torch.Tensor | None = None,  # (M, 1) float32: x is E4M3 already
    out_dtype: torch.dtype | None = None,  # with x_scale: y's dtype (x's before quantising)
    config: SkinnyFp8Config | None = None,
) -> torch.Tensor:  # (M, N) in x's dtype (out_dtype with x_scale)
    """Triton twin of `fp8_linear_reference`: one quantiser launch (none with x_scale: x
    came quantised from its producer), the GEMM, and with split-K one small combining
    launch (plus a memset in "atomic" mode; none in "serial" mode)."""
    _check_inputs(x, weight, weight_scale, input_scale, bias, x_scale, out_dtype)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype if x_scale is None else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    config = config or default_skinny_fp8_config(m, n, k)
    if x_scale is None:
        x_q, x_scale = quantize_fp8_per_token(x, input_scale)  # (M, K) E4M3, (M, 1) float32
    else:
        x_q = x

    block_k = min(config.block_k, k & -k)  # k & -k: the largest power of 2 dividing K (≥ 32)
    tiles = k // block_k
    split_k = min(config.split_k, tiles)
    tokens = config.tokens if m <= config.tokens else MAX_TOKENS
    pdl = config.pdl and use_pdl(x)
    # The first num_stages - 1 tiles are what the pipeline's prologue loads (128-byte lines).
    prefetch = min(config.num_stages - 1, tiles // split_k) if pdl and block_k >= 128 else 0
    mode = config.split_k_mode if split_k > 1 else "unsplit"
    column_blocks = triton.cdiv(n, config.block_n)
    counters = weight_scale  # a placeholder pointer unless "serial"
    if mode == "unsplit":
        out = y
    elif mode == "atomic":
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        if mode == "serial":
            counters = split_k_counters(x.device, column_blocks)
    _skinny_fp8_kernel[(column_blocks, split_k)](
        x_q, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out,
        y, counters, m, n, k, split_k,
        HAS_BIAS=bias is not None, MODE=mode,
        BLOCK_N=config.block_n, BLOCK_K=block_k, TOKENS=tokens,
        PROMOTE=min(PROMOTION_INTERVAL, block_k), PREFETCH_TILES=prefetch, USE_PDL=pdl,
        GPU_FENCE=not interpreter_active(),
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if mode in ("reduce", "atomic"):
        sum_split_k_partials(out, 1 if mode == "atomic" else split_k, bias, y, pdl)
    return y


def sum_split_k_partials(partials: torch.Tensor, parts: int, bias: torch.Tensor | None,
                         y: torch.Tensor, pdl: bool) -> None:
    """y (M, N) = Σ of the first `parts` fp32 partials (·, M, N) in index order, + bias: the
    combining launch of a "reduce" split-K (also the skinny int4 kernels')."""
    m, n = y.shape
    block = 1024
    _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
        partials, bias if bias is not None else partials, y, m * n, n, parts,
        HAS_BIAS=bias is not None, BLOCK=block, USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
