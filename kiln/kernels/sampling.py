"""Sampling one token per row in one pass over the logits: the Gumbel-max trick.

    token = argmax_i (logits_i / T + g_i),   g_i = -log(E_i),  E_i ~ Exponential(1) i.i.d.

picks i with probability softmax(logits / T)_i: the same distribution as the sampler's
exponential race, argmax_i p_i / E_i, taken in log space, so nothing is normalised and no
(R, V) intermediate is written. Greedy rows take argmax_i logits_i (ties → lowest index, as
torch.argmax). For temperature-only sampling this replaces ~8 passes over an fp32 (R, V) copy
(cast, divide, softmax, exponential_, clamp, divide, argmax) with one read of the logits.

Two stages, so the grid fills the GPU at batch 1 (one row of 128k logits) as at batch 512:

    logits (R, V)     split 0          split 1                split S-1
    row r   ┌───────────────────┬───────────────────┬ ... ┬──────────────┐
            │ BLOCK │ BLOCK │...│ BLOCK │ BLOCK │...│     │ BLOCK │ ...  │   stage 1, grid (R, S):
            └───────────────────┴───────────────────┴ ... ┴──────────────┘   running best per split
                       ↓                   ↓                     ↓
    partials (R, S)  (value, index)    (value, index)   ...   (value, index)
                       └───────────────────┴──── stage 2 ────────┘
    tokens (R,)                   best value; lowest index among equals

Each split is a whole number of BLOCKs; with one split, stage 1 writes the token itself.

Noise. Element (row, col) draws 32 random bits from Philox4x32-10 (`tl.randint4x`) keyed by
`philox_key(seed)`, with counter (col // 4, row): each call gives four words, one per column
of an aligned group of four. So the noise depends only on (seed, row, col), never on BLOCK or
the split. One call per four elements rather than per element: a call is ~100 integer ops, and
at one per element (estimated, not measured) the H100 would spend longer on Philox than on
reading fp32 logits.

Precision. The winning column's E is about its probability times an Exp(1) draw (it has the
smallest E_i / p_i, and min_j E_j / p_j ~ Exp(1)): ~1e-5 on a flat 128k-token row, so E must
keep its relative precision near 0. The textbook -log(-log(u)) with u = tl.rand has u in steps
of 2^-24 near 1, so an E of 1e-5 would come in steps of ~0.6 %; computing -log(1 - v) directly
rounds 1 - v to 1 for v < 2^-25, giving E = 0 and noise +inf. Here v = (bits + 0.5) / 2^32 in
(0, 1], and E = -log(1 - v) is a series below v = 2^-6: E ≥ 2^-33, never 0. v rounding to 1
(bits ≥ 2^32 - 128) gives E = inf and noise -inf, a draw that loses, as so large an E would
anyway. Scores are in log2 units (a constant factor: the same argmax). A NaN score never wins,
-inf logits never win against a finite one, and a row of only -inf (or NaN) logits returns
column 0.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_utils import (
    check_float,
    check_last_dim_contiguous,
    launchable,
    pdl_prologue,
    use_pdl,
)

# Programs per SM stage 1 aims for. A program streams its columns with one 2048-wide tile in
# flight; several resident per SM keep enough loads outstanding, and rounding the split count
# up (512 rows on 132 SMs: 2 splits, ~8 programs per SM) keeps the last wave's tail short.
PROGRAMS_PER_SM = 4
# Stage 2 reads one (rows, MAX_SPLITS) tile: the split count is a runtime value, so batch
# sizes that change every step share one compiled kernel.
MAX_SPLITS = 128
# Columns per tile: 16 per thread at 4 warps (four 16-byte fp32 loads). Under the interpreter
# smaller tiles, so the tests' small vocabularies still cut into several splits.
BLOCK = 2048
INTERPRETER_BLOCK = 128
_NUM_WARPS = 4
_STAGE2_ROWS = 8
_LOG2_E = tl.constexpr(1.4426950408889634)  # scores and noise are in log2 units


@triton.jit
def _exponential(bits):
    """uint32 random bits → an Exponential(1) draw, scaled by 1/ln 2, in (0, inf]: relative
    precision ~1e-7 near 0, where the winning draws are."""
    v = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (bits + 0.5) / 2^32, in (0, 1]
    # -log(1 - v) = v + v²/2 + v³/3 + v⁴/4 + ...: below 2^-6 the first four terms are exact to
    # fp32 (the fifth is < 2^-25 of the sum), where 1 - v would lose v's low bits.
    series = v * (1.0 + v * (0.5 + v * (0.3333333333 + v * 0.25))) * _LOG2_E
    return tl.where(v < 0.015625, series, -tl.log2(1.0 - v))


@triton.jit
def _scan_columns(
    row_ptr, row, col_start, col_end, logit_scale, seed,
    RANDOM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Best (score, column) of columns [col_start, col_end), per lane of a (BLOCK // 4, 4) tile:
    lane (i, j) sees columns col_start + 4 i + j + k BLOCK and keeps the first of its best."""
    GROUPS: tl.constexpr = BLOCK // 4
    group_index = tl.arange(0, GROUPS)[:, None]  # (GROUPS, 1)
    lane = tl.arange(0, 4)[None, :]  # (1, 4)
    offsets = group_index * 4 + lane  # (GROUPS, 4)
    best_score = tl.full((GROUPS, 4), float("-inf"), tl.float32)
    best_col = tl.full((GROUPS, 4), 0, tl.int32) + col_start
    for start in range(col_start, col_end, BLOCK):
        cols = start + offsets  # (GROUPS, 4)
        x = tl.load(row_ptr + cols, mask=cols < col_end, other=float("-inf")).to(tl.float32)
        if RANDOM:
            # Counter (col // 4, row): the low and high words of the 64-bit offset. Philox
            # runs once per group of four columns, and each lane picks its word by a select
            # on a broadcast, rather than join + reshape, which may change layouts.
            groups = (start // 4 + group_index).to(tl.int64)  # (GROUPS, 1)
            r0, r1, r2, r3 = tl.randint4x(seed, (row << 32) + groups)
            bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
            score = x * logit_scale - tl.log2(_exponential(bits))  # (GROUPS, 4)
        else:
            score = x
        # Strictly greater: a lane keeps its earliest column among equals, and NaN never wins.
        take = score > best_score
        best_score = tl.where(take, score, best_score)
        best_col = tl.where(take, cols, best_col)
    top = tl.max(tl.max(best_score, 1), 0)
    # The lowest column holding the top score; with no finite score (all -inf) every lane
    # still holds col_start.
    col = tl.min(tl.min(tl.where(best_score == top, best_col, 2147483647), 1), 0)
    return top, col


@triton.jit(do_not_specialize=["seed", "num_splits", "temperatures_ptr", "greedy_ptr"])
def _gumbel_split_kernel(
    logits_ptr, stride_row,  # (R, V), last axis contiguous
    temperatures_ptr,  # (R,) float32
    greedy_ptr,  # (R,) bool
    part_score_ptr, part_col_ptr,  # (R, num_splits) float32 / int32, when num_splits > 1
    out_ptr,  # (R,) int64, written here when num_splits == 1
    seed, vocab_size, split_size, num_splits,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    col_start = split * split_size
    col_end = tl.minimum(col_start + split_size, vocab_size)
    row_ptr = logits_ptr + row * stride_row
    greedy = tl.load(greedy_ptr + row)
    if greedy:
        score, col = _scan_columns(row_ptr, row, col_start, col_end, 1.0, seed, False, BLOCK)
    else:
        # log2(e) / T: scores in log2 units, matching the noise's -log2(E).
        logit_scale = _LOG2_E / tl.load(temperatures_ptr + row)
        score, col = _scan_columns(row_ptr, row, col_start, col_end, logit_scale, seed, True,
                                   BLOCK)
    if num_splits == 1:
        tl.store(out_ptr + row, col.to(tl.int64))
    else:
        tl.store(part_score_ptr + row * num_splits + split, score)
        tl.store(part_col_ptr + row * num_splits + split, col)


@triton.jit(do_not_specialize=["num_rows", "num_splits"])
def _pick_split_kernel(
    part_score_ptr, part_col_ptr,  # (R, num_splits) float32 / int32
    out_ptr,  # (R,) int64
    num_rows, num_splits,
    ROWS: tl.constexpr, MAX_SPLITS: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    splits = tl.arange(0, MAX_SPLITS)  # (MAX_SPLITS,)
    mask = (rows < num_rows)[:, None] & (splits < num_splits)[None, :]
    offsets = rows.to(tl.int64)[:, None] * num_splits + splits[None, :]  # (ROWS, MAX_SPLITS)
    score = tl.load(part_score_ptr + offsets, mask=mask, other=float("-inf"))
    col = tl.load(part_col_ptr + offsets, mask=mask, other=2147483647)
    top = tl.max(score, 1)  # (ROWS,)
    # Splits cover increasing columns, so the lowest column among equal scores is the first
    # split's: ties resolve as within a split. A row of -inf takes split 0's column 0.
    best = tl.min(tl.where(score == top[:, None], col, 2147483647), 1)
    tl.store(out_ptr + rows, best.to(tl.int64), mask=rows < num_rows)


def philox_key(seed: int) -> int:
    """The 64-bit Philox key (low word k0, high word k1) the kernel uses for `seed`. Triton
    types an int argument by its value (i32 below 2^31): mapping every seed into [2^62, 2^63)
    keeps it i64, so one compiled kernel serves all seeds."""
    return seed % 2**62 + 2**62


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one after another: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_columns(num_rows: int, vocab_size: int, block: int, device: torch.device,
                  num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, split_size): about PROGRAMS_PER_SM programs per SM over all rows, each
    split a whole number of BLOCKs and none empty. 63 splits of one BLOCK at batch 1 with
    V = 128256 on 132 SMs; 9 at batch 64; 2 at batch 512; 1 from batch 528."""
    if num_splits is None:
        num_splits = triton.cdiv(PROGRAMS_PER_SM * _multiprocessor_count(device), num_rows)
    num_splits = max(1, min(num_splits, MAX_SPLITS, triton.cdiv(vocab_size, block)))
    split_size = triton.cdiv(triton.cdiv(vocab_size, num_splits), block) * block
    return triton.cdiv(vocab_size, split_size), split_size


def _check_inputs(logits, temperatures, greedy_mask, seed) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (rows, vocab); got shape {tuple(logits.shape)}")
    check_float("logits", logits)
    check_last_dim_contiguous("logits", logits)
    num_rows, vocab_size = logits.shape
    if vocab_size == 0 or vocab_size >= 2**31:
        raise ValueError(f"vocabulary size must be in [1, 2^31); got {vocab_size}")
    for name, tensor, dtype in (("temperatures", temperatures, torch.float32),
                                ("greedy_mask", greedy_mask, torch.bool)):
        if tensor.shape != (num_rows,):
            raise ValueError(f"{name} must have shape ({num_rows},), one per logits row; got "
                             f"{tuple(tensor.shape)}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}; got {tensor.dtype}")
        if tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device} but logits are on {logits.device}")
        if num_rows > 1 and tensor.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be a Python int; got {type(seed).__name__}")


def sample_gumbel(
    logits: torch.Tensor,  # (R, V) float32/bfloat16/float16, last axis contiguous
    temperatures: torch.Tensor,  # (R,) float32, > 0; greedy rows' value is unused
    greedy_mask: torch.Tensor,  # (R,) bool
    seed: int,
    *,
    num_splits: int | None = None,  # None: chosen for the device (split_columns)
    block: int | None = None,  # None: BLOCK on CUDA, INTERPRETER_BLOCK under the interpreter
) -> torch.Tensor:  # (R,) int64 token ids in [0, V)
    """One token per row: argmax of the logits for greedy rows, a draw from softmax(logits / T)
    for the others. The draws are a function of (seed, row, logits) only: the same seed gives
    the same tokens whatever the other rows, num_splits or block. No host syncs."""
    _check_inputs(logits, temperatures, greedy_mask, seed)
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    if block is None:
        block = BLOCK if logits.is_cuda else INTERPRETER_BLOCK
    if block < 4 or block & (block - 1):
        raise ValueError(f"block must be a power of 2 >= 4; got {block}")
    num_splits, split_size = split_columns(num_rows, vocab_size, block, logits.device,
                                           num_splits)
    # Unwritten with one split, but always allocated with their own dtypes, so one compiled
    # kernel serves every split count.
    part_score = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
    part_col = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits.device)
    pdl = use_pdl(logits)
    launchable(_gumbel_split_kernel, logits)[(num_rows, num_splits)](
        logits, logits.stride(0), temperatures, greedy_mask, part_score, part_col, out,
        philox_key(seed), vocab_size, split_size, num_splits,
        BLOCK=block, USE_PDL=pdl, num_warps=_NUM_WARPS, launch_pdl=pdl,
    )
    if num_splits > 1:
        launchable(_pick_split_kernel, logits)[(triton.cdiv(num_rows, _STAGE2_ROWS),)](
            part_score, part_col, out, num_rows, num_splits,
            ROWS=_STAGE2_ROWS, MAX_SPLITS=MAX_SPLITS, USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
    return out


def sample_gumbel_reference(
    logits: torch.Tensor,  # (R, V)
    temperatures: torch.Tensor,  # (R,) float32
    greedy_mask: torch.Tensor,  # (R,) bool
    seed: int,
) -> torch.Tensor:  # (R,) int64
    """Torch twin of `sample_gumbel`: the same math in float64, with noise from a
    torch.Generator seeded with `seed` (the same distribution, not the same draws)."""
    _check_inputs(logits, temperatures, greedy_mask, seed)
    generator = torch.Generator(device=logits.device).manual_seed(seed % 2**64)
    exponentials = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
    exponentials.exponential_(generator=generator)
    # An exactly-zero draw would be +inf noise, and -inf + inf = NaN.
    gumbel = -exponentials.clamp_min_(torch.finfo(torch.float64).tiny).log()  # (R, V)
    scores = logits.double() / temperatures.double().unsqueeze(1) + gumbel  # (R, V)
    scores = torch.where(greedy_mask.unsqueeze(1), logits.double(), scores)
    # As the kernel: NaN never wins (torch.argmax would pick it).
    return scores.masked_fill_(scores.isnan(), -math.inf).argmax(dim=-1)
