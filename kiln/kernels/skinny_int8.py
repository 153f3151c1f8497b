"""int8 weight-only linear (W8A16) for decode rows (M ≤ 16; ≤ 64 on the Gluon twin) on the
tensor cores: skinny_fp8's swap-AB GEMM with int8 weights turned into exact 16-bit floats in
registers and x as it is.

    y (M, N) = x (M, K) · (q · s)^T,   q int8 (N, K), s float16 (N, 1) per output channel

Why: the general kernel (quant_linear.py) converted every weight with `cvt` and multiplied on
the CUDA cores; at 2-16 rows it streamed int8 weights at 0.7-1.5 TB/s (H200, Llama-3.1-8B
shapes; results/s19-h200-int8-small-rows-linears.log), so a batch-2 decode step took 2.2x a
batch-1 step (int_gemv) and batch 2 gave fewer tokens a second than batch 1. Here the weights
stream through skinny_fp8's cp.async pipeline into bf16 (or fp16) wgmma, converted exactly
in registers by Triton's bit-operation lowering of int8 → 16-bit float, with the same
tilings, split-K, combining kernel and PDL as the FP8 kernel: one byte a weight either way.

Scales per output channel (int8-wo's default) are applied once, after the MMA. Group scales
(`--group-size`, and GGUF Q8_0 kept quantised: groups of 32; any multiple of 32) multiply
each weight by its group's scale in registers before the MMA, rounded once to the 16-bit
float as the dequantise path's weights are: here as in kernels/int_gemm.py (K tiles inside
one group, int_gemv's bit trick for int8 → fp32), in the Gluon twin by its own assembly.

On sm_90, with K a multiple of 128, the Gluon twin (kernels/skinny_int8_gluon.py) runs
instead: each thread loads its own fragment's bytes from global memory in a permuted K order,
no shared-memory round trip for the weights (KILN_SKINNY_INT8_GLUON=0 keeps this kernel).

The torch reference is quant_linear.dequantize_int8 then weight_only_linear_reference.
"""

from __future__ import annotations

import torch
import triton

from kiln.kernels import skinny_int8_gluon
from kiln.kernels.skinny_fp8 import (
    MAX_TOKENS,
    MIN_BLOCK_K,
    SkinnyFp8Config,
    _skinny_fp8_kernel,
    default_skinny_fp8_config,
    default_split_k,
    sum_split_k_partials,
)
from kiln.kernels.triton_utils import env_flag, has_sm90, interpreter_active, use_pdl

# Group sizes both kernels take: in the Gluon twin a thread's 32 bytes of a row in a sub-tile
# must share a group (kernels/skinny_int8_gluon.py); the Triton kernel's K tiles (≥ 32) lie
# inside one.
GROUP_MULTIPLE = 32

__all__ = ["MAX_TOKENS", "skinny_int8_linear", "skinny_int8_unsupported_reason"]


def skinny_int8_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                   bias: torch.Tensor | None,
                                   gluon: bool = True) -> str | None:
    """Why skinny_int8_linear (with `gluon` as given to it) cannot take these inputs (the
    caller then uses another kernel), or None."""
    if x.dim() != 2 or not x.is_contiguous():
        return f"x must be a contiguous (M, K) tensor; got {tuple(x.shape)}"
    rows = x.shape[0]
    if not 1 <= rows <= skinny_int8_gluon.MAX_TOKENS:
        return (f"x has {rows} rows; this kernel takes 1-{skinny_int8_gluon.MAX_TOKENS} "
                f"({MAX_TOKENS} unless the Gluon twin runs)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x must be bfloat16 or float16; got {x.dtype}"
    if not (x.is_cuda or interpreter_active()):
        return (f"x is on {x.device}: the Triton kernels run on CUDA tensors, or on the CPU "
                "under TRITON_INTERPRET=1")
    reason = int8_weight_reason(x, weight)
    if reason is not None:
        return reason
    n, k = weight.shape
    if k == 0 or k % MIN_BLOCK_K:
        return f"K={k} must be a positive multiple of {MIN_BLOCK_K} (the pipeline's smallest tile)"
    if (scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] < 1
            or scale.dtype != torch.float16 or not scale.is_contiguous()):
        return (f"scale must be contiguous float16 ({n}, K / G); got {tuple(scale.shape)} "
                f"{scale.dtype}")
    if rows > MAX_TOKENS and not (gluon and gluon_usable(x, weight)):
        return (f"x has {rows} rows: more than {MAX_TOKENS} run on the Gluon twin only (sm_90, "
                "K a multiple of 128)")
    groups = scale.shape[1]
    if groups > 1 and (k % groups or (k // groups) % GROUP_MULTIPLE):
        return (f"scale has {groups} groups over K={k}: this kernel takes one per output "
                f"channel or groups of a multiple of {GROUP_MULTIPLE} inputs")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        return f"bias must be a contiguous ({n},) tensor; got {tuple(bias.shape)}"
    for name, tensor in (("weight", weight), ("scale", scale), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            return f"{name} is on {tensor.device} but x is on {x.device}"
    return None


def int8_weight_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """What the W8A16 kernels (here and kernels/int_gemm.py) ask of the weight: a contiguous
    2-D int8 (N, K) tensor of x's K; None when it is one."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_contiguous():
        return (f"weight must be a contiguous 2-D int8 (N, K) tensor; got "
                f"{tuple(weight.shape)} {weight.dtype}")
    if x.shape[1] != weight.shape[1]:
        return f"x has K={x.shape[1]} but weight has K={weight.shape[1]}"
    return None


def skinny_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       config: SkinnyFp8Config | None = None,
                       gluon: bool = True) -> torch.Tensor:
    """Triton twin of weight_only_linear_reference(x, dequantize_int8(weight, scale), bias)
    for 1-16 rows (1-64 on the Gluon twin): the GEMM and, with split-K, skinny_fp8's
    combining launch. `gluon`: the Gluon twin where it runs (gluon_usable; config's split_k
    and tokens then apply to it)."""
    reason = skinny_int8_unsupported_reason(x, weight, scale, bias, gluon)
    if reason is not None:
        raise ValueError(f"skinny_int8_linear: {reason}")
    return launch_skinny_int8(x, weight, scale, bias, config=config, gluon=gluon)


def launch_skinny_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       config: SkinnyFp8Config | None = None,
                       gluon: bool = True) -> torch.Tensor:
    """skinny_int8_linear for inputs skinny_int8_unsupported_reason already accepted (the
    dispatcher checked them once, in `takes`)."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    if config is not None and config.split_k_mode != "reduce":
        raise ValueError(f"skinny_int8_linear combines split-K partials by 'reduce' only; "
                         f"got split_k_mode={config.split_k_mode!r}")
    if gluon and gluon_usable(x, weight):
        split_k, tokens = ((config.split_k, config.tokens) if config
                           else default_gluon_split_and_tokens(m, n, k, scale.shape[1] > 1))
        return skinny_int8_gluon.launch(x, weight, scale, bias, split_k, tokens,
                                        config.pdl if config else True)
    chosen = config is None
    config = config or default_skinny_fp8_config(m, n, k)  # one byte a weight, as FP8
    group = 0 if scale.shape[1] == 1 else k // scale.shape[1]  # K tiles inside one group
    block_k = min(config.block_k, k & -k, (group & -group) or k)
    tiles = k // block_k
    split_k = min(config.split_k, tiles)
    if chosen and block_k < config.block_k:
        split_k = _split_for_shallow_tiles(n, tiles, config.block_n, config.block_k // block_k)
    tokens = config.tokens if m <= config.tokens else MAX_TOKENS
    pdl = config.pdl and use_pdl(x)
    prefetch = min(config.num_stages - 1, tiles // split_k) if pdl and block_k >= 128 else 0
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32,
                                             device=x.device)
    _skinny_fp8_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, scale, weight, scale, bias if bias is not None else scale, out, y, scale, m, n, k,
        split_k, HAS_BIAS=bias is not None, MODE="unsplit" if split_k == 1 else "reduce",
        BLOCK_N=config.block_n, BLOCK_K=block_k, TOKENS=tokens, PROMOTE=0,
        PREFETCH_TILES=prefetch, USE_PDL=pdl, GPU_FENCE=not interpreter_active(), W8A16=True,
        GROUP=group, num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    if split_k > 1:
        sum_split_k_partials(out, split_k, bias, y, pdl)
    return y


def _split_for_shallow_tiles(n: int, tiles: int, block_n: int, shallower: int) -> int:
    """Split K for K tiles `shallower` times less deep than the default rule assumes (K or
    the group a power of 2 times an odd number: 2880 = 64 · 45 gives 64-deep tiles): a
    program's loop is then latency-bound, so the split aims at `shallower` times the
    programs (default_skinny_fp8_config's two thirds of the SMs), keeping ≥ 4 tiles a split.
    H100, g64 at 8 rows (results/s24-h100/callD.txt, µs, split 1 / 2 / 4 / 8): 5760 × 2880
    35.3 / 21.6 / 15.8 / 14.5, 2880 × 2880 33.9 / 19.4 / 12.7 / 10.4, 2880 × 5760 57.0 /
    31.8 / 22.2 / 16.4 (quant_linear 32.2, 29.2, 57.8)."""
    return default_split_k(triton.cdiv(n, block_n), tiles, shallower)


def gluon_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Gluon twin runs for x: sm_90+ CUDA, a Triton with Gluon, K a multiple of
    its 128-column sub-tile, weights read as 4-byte words, and KILN_SKINNY_INT8_GLUON not 0
    (the A/B switch)."""
    return (has_sm90(x) and weight.shape[1] % 128 == 0 and weight.data_ptr() % 4 == 0
            and env_flag("KILN_SKINNY_INT8_GLUON", default=True)
            and skinny_int8_gluon.available())


def default_gluon_split_and_tokens(m: int, n: int, k: int,
                                   grouped: bool = False) -> tuple[int, int]:
    """The Gluon twin's K split and token columns (the smallest of 8, 16, 32, 64 holding the
    rows). Up to 16 rows, K split while the programs stay at most 512 (about four an SM) and
    each keeps ≥ 4 sub-tiles (the int4 twin's rule; for int8 within 5 % of the fastest of
    splits 1, 2, 4, 8 on every Llama-3.1-8B shape at 1-16 rows, results/s19-h200-skinny-int8-
    gluon-bench.log). One row with group scales (`grouped`) splits K in at least 4 (fewer
    only where a split would keep under 4 sub-tiles: 2 at K = 1,024): their
    conversion costs about twice the per-channel one (15 instructions per four weights
    against 8); gate|up (unsplit by the rule) took 40.8 µs in 4 against 45.7 unsplit
    (results/s20-h200-callB/g8-bench-32.log), and a group-32 engine's batch 1 289.4 → 292.3
    tok/s. Forced at 2-16 rows too, the kernel alone was faster (gate|up 41.8-46.9 against
    45.6-50.5 µs) but the engine slower (batch 8 2,192 → 2,146, batch 16 4,065 → 4,004; both
    twice, s20-h200-callD), so there it is not. 17-32 rows (32 columns): the same rule, K in
    at most 4 (gate|up unsplit: 37.0-39.9 µs at 17-32 rows against 50.1-55.8 in 4, s20-h200-
    callC/wide-bench.log; batch 32 6,822 → 7,678 tok/s, callD). 33-64 rows (64 columns):
    the int4 twin's rule, K split while under 256 programs, at most 4 (the fastest of splits
    1-8 on every shape at 48 and 64 rows, callC)."""
    column_blocks = triton.cdiv(n, 64)
    tiles = k // 128
    tokens = 8
    while tokens < m:
        tokens *= 2
    if tokens == 64:
        return max(1, min(4, 256 // column_blocks, tiles // 4)), tokens
    split_k = 1
    while ((column_blocks * split_k * 2 <= 512 or (grouped and m == 1 and split_k < 4))
           and tiles // (2 * split_k) >= 4 and (tokens < 32 or split_k < 4)):
        split_k *= 2
    return split_k, tokens


def batch_invariant_config(x: torch.Tensor, weight: torch.Tensor,
                           scale: torch.Tensor) -> SkinnyFp8Config:
    """One tiling for every row count up to 16 (KILN_BATCH_INVARIANT=1, kernels/ops.py): 16
    token columns and the K split of 16 rows, on whichever kernel runs."""
    n, k = weight.shape
    if gluon_usable(x, weight):
        split_k, tokens = default_gluon_split_and_tokens(MAX_TOKENS, n, k, scale.shape[1] > 1)
        return SkinnyFp8Config(split_k=split_k, tokens=tokens)
    return default_skinny_fp8_config(MAX_TOKENS, n, k)


# One row goes to the Gluon twin for rows at least this long: on the H200 it beat int_gemv on
# Llama-3.1-8B's down (K = 14,336: 19.4 vs 21.9 µs per channel, 22.1 vs 28.3 in groups of 128)
# and lost on q|k|v, o and gate|up per channel (K = 4,096: 10.0 vs 9.0, 8.4 vs 7.3, 34.4 vs
# 31.9; results/s19-h200-skinny-int8-gluon-bench.log). Groups of 32 (GGUF Q8_0): the Gluon
# twin on every shape (11.3 vs 14.8, 9.5 vs 10.8, 45.7 vs 51.0, 23.1 vs 37.5; results/
# s20-h200-callB/g8-bench-32.log); int8-wo batch 1, Llama-3.1-8B, per channel: 335.0 → 340.1
# tok/s with the long-rows rule (two alternations, s20-h200-callB). Groups of 64 (H100,
# results/s23-h100/callB-bench-g64.log): the twin again on every shape (12.8 vs 13.8, 10.4 vs
# 10.7, 50.5 vs 51.6, 27.1 vs 33.3); batch 1 with `--group-size 64` 238.7 → 243.9 tok/s.
BATCH1_MIN_K = 8192
BATCH1_MAX_GROUP = 64


def takes_batch1(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether a one-row int8 linear is faster here than on int_gemv (KILN_SKINNY_INT8_BATCH1=0
    keeps int_gemv for every one-row linear): long rows, or groups of at most 64."""
    k = weight.shape[1]
    return ((k >= BATCH1_MIN_K or k // scale.shape[1] <= BATCH1_MAX_GROUP)
            and env_flag("KILN_SKINNY_INT8_BATCH1", default=True) and gluon_usable(x, weight))


def max_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The most rows this kernel takes for x: 64 where the Gluon twin runs, else 16."""
    return skinny_int8_gluon.MAX_TOKENS if gluon_usable(x, weight) else MAX_TOKENS


def takes(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
          bias: torch.Tensor | None) -> bool:
    """Whether the dispatcher (kernels/ops.py) sends this int8 linear here: Hopper (wgmma
    from registers), and inputs the kernel takes."""
    return has_sm90(x) and skinny_int8_unsupported_reason(x, weight, scale, bias) is None
