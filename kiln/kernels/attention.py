"""Attention over the paged KV cache: the cache write and the attention itself.

KV cache layout of one layer (one tensor, allocated by the model runner):

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)
               │  │           │
               │  │           └ token slot inside the block
               │  └ physical block id (a request's block table lists its blocks in order;
               │    block 0 is a null block that CUDA-graph padding rows point at)
               └ 0 = keys, 1 = values

    slot = block_id * block_size + offset   (slot_mapping gives one per new token; -1 = padding)

Each op has a torch reference (loops over sequences; the oracle) and a Triton fast path:

- `write_kv_cache`: one program per token copies its K and V rows into their slot.
- `paged_decode_attention` (every sequence has exactly one new token): flash-decoding. Grid
  (sequence, KV head, split); a program takes all query heads of its KV head's group as one
  (group padded to 16, head_dim) tile so `tl.dot` applies, walks its split's keys through the
  block table with an online softmax, and leaves a partial output and its log-sum-exp; a small
  reduce kernel combines the splits. The split count comes from the batch shape and the SM
  count (host side); each sequence sizes its splits from its own length on the GPU, so the
  launch is CUDA-graph capturable.
- `paged_prefill_attention` (any ragged mix of new-token counts, prefix reuse, chunked
  prefill): grid (query block, query head); each program finds its sequence by a binary search
  over `query_start_loc` on the GPU, so it needs no host lists either. Its key tiles run in
  three loops: the window's edge and the causal diagonal masked, the tiles between (every row
  of the block sees them whole) without a mask.
- `paged_mixed_attention` (a mixed step the runner ordered decode-first): the decode kernel
  for the leading one-token rows, the prefill kernel for the rest, into one output.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Protocol

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_utils import (
    batch_invariant,
    pdl_prologue,
    use_pdl,
    NO_WINDOW,
    check_float,
    check_head_dim,
    check_last_dim_contiguous,
    dot_dtype,
    dot_precision,
    launchable,
    next_power_of_2,
    interpreter_active,
)
from kiln.kernels.quant_linear import to_e4m3

LOG2_E = math.log2(math.e)  # kernels use exp2: scores are pre-multiplied by log2(e)
# Whether fp8 casts are emulated (Triton's interpreter; see quant_linear.to_e4m3): fixed for
# the process, since the interpreter is chosen before triton is imported.
EMULATE_FP8_CAST = tl.constexpr(interpreter_active())
# An FP8 KV cache (`--kv-cache-dtype fp8`): E4M3 of k / k_scale and v / v_scale, per layer.
# The kernels load E4M3 straight into the dot operands (exact in bf16), fold k_scale into
# the softmax scale and multiply the output by v_scale: no extra pass, half the KV bytes.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


class PagedAttentionMetadata(Protocol):
    """The fields of the layers' AttentionMetadata that attention reads (kernels know no layer)."""

    query_start_loc: torch.Tensor  # (S+1,) int32
    seq_lens: torch.Tensor  # (S,) int32
    block_tables: torch.Tensor  # (S, max_blocks) int32
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int  # 1 for a decode-only batch
    num_decode_seqs: int  # > 0: a mixed batch whose first num_decode_seqs rows are decode
    prefill_query_start_loc: torch.Tensor | None  # (S - num_decode_seqs + 1,) int32


# ---------------------------------------------------------------------------------------------
# References


def write_kv_cache_reference(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding token, not written
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache stores key / k_scale
    v_scale: torch.Tensor | None = None,
    k_offset: torch.Tensor | None = None,  # (Hkv, D) float32: an FP8 cache stores key - k_offset
) -> None:
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])  # (2, slots, Hkv, D)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key = key[valid]
    if k_offset is not None and kv_cache.dtype == FP8_KV_DTYPE:
        key = key.float() - k_offset.float()  # in float32, as the kernels
    flat[0, slots] = to_cache(key, kv_cache.dtype, k_scale)
    value_view(kv_cache)[slots // block_size, slots % block_size] = to_cache(
        value[valid], kv_cache.dtype, v_scale)


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == FP8_KV_DTYPE


def value_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache's V half as (num_blocks, block_size, Hkv, D). An FP8 cache stores each
    block's V as (Hkv, D, block_size): a key's bytes are then as far apart as a value's are
    near, so decode's p.v operand (reduced over keys) loads and widens like q.k^T's (reduced
    over dims), two neighbouring E4M3 bytes per register, with no transpose through shared
    memory (BENCHMARKS.md, eighth session). The view reads and writes that layout in place."""
    if not is_fp8_cache(kv_cache):
        return kv_cache[1]
    if not kv_cache.is_contiguous():
        raise ValueError("an FP8 KV cache must be contiguous (its V is laid out per block)")
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    return kv_cache[1].as_strided(
        (num_blocks, block_size, num_kv_heads, head_dim),
        (block_size * num_kv_heads * head_dim, 1, head_dim * block_size, block_size))


def to_fp8_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """An FP8 cache holding the values of a (2, num_blocks, block_size, Hkv, D) cache in the
    16-bit layout (already divided by any scales), V rearranged as value_view lays it out:
    how tests and benchmarks build one without writing it token by token."""
    out = torch.empty(kv_cache.shape, dtype=FP8_KV_DTYPE, device=kv_cache.device)
    out[0] = to_cache(kv_cache[0], FP8_KV_DTYPE, None)
    value_view(out).copy_(to_cache(kv_cache[1], FP8_KV_DTYPE, None))
    return out


def value_run(kv_cache: torch.Tensor, block_n: int) -> int:
    """V_RUN of a kernel whose key tiles start on multiples of block_n: how many keys of an
    FP8 cache's V sit contiguous and aligned from each multiple of it (0: no claim)."""
    block_size = kv_cache.shape[2]
    if not is_fp8_cache(kv_cache) or block_size & (block_size - 1):
        return 0
    return min(block_size, block_n)


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x as the cache stores it: E4M3 of x / scale (saturating) for an FP8 cache; a plain
    cast otherwise (scales apply to FP8 only). Rounded to x's dtype first, as the kernels."""
    if dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    scale = scale.float() if scale is not None else 1.0
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def from_cache(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A cache slice back in float32: times its scale for an FP8 cache."""
    if x.dtype != FP8_KV_DTYPE or scale is None:
        return x.float()
    return x.float() * scale.float()


def context_kv(
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    seq: int,
    seq_len: int,
    num_heads: int,  # query heads: each KV head repeated for its group
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values (seq_len, num_heads, D) float32
    """Sequence `seq`'s cached keys and values, gathered from its blocks and scaled back."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_seq_blocks = -(-seq_len // block_size)
    blocks = block_tables[seq, :num_seq_blocks].long()
    keys = kv_cache[0, blocks].reshape(num_seq_blocks * block_size, num_kv_heads, head_dim)
    values = value_view(kv_cache)[blocks].reshape(keys.shape)
    group = num_heads // num_kv_heads
    return (from_cache(keys[:seq_len], k_scale).repeat_interleave(group, dim=1),
            from_cache(values[:seq_len], v_scale).repeat_interleave(group, dim=1))


def paged_attention_reference(
    query: torch.Tensor,  # (T, Hq, D) all scheduled tokens of all sequences, concatenated
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), already holding this step's KV
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    query_start_loc: list[int],  # S+1 offsets into the T axis
    seq_lens: list[int],  # S: tokens with KV (cached + this step's) per sequence
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache holds key / k_scale
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Causal attention of each sequence's new tokens over its whole cached context.

    A sequence's queries are its last `q_len` positions; query i (absolute position
    `seq_len - q_len + i`) sees keys at positions p with p <= its own and, with a sliding
    window W, p > own - W (the Hugging Face convention: W keys including itself).
    """
    out = torch.empty_like(query)
    for seq, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[seq], query_start_loc[seq + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k, v = context_kv(kv_cache, block_tables, seq, seq_len, query.shape[1], k_scale, v_scale)
        q = query[start:end].float()  # (q_len, Hq, D)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # (Hq, q_len, L)
        device = query.device
        q_pos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(1)  # (q_len, 1)
        k_pos = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, L)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# KV-cache write


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, stride_kt, stride_kh,  # (T, Hkv, D)
    value_ptr, stride_vt, stride_vh,  # (T, Hkv, D)
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
    slot_mapping_ptr,  # (T,) int64
    k_scale_ptr, v_scale_ptr,  # () float32, read when FP8
    k_offset_ptr,  # (Hkv, D) float32, read when FP8 and CENTRE_KEYS
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, FP8: tl.constexpr,
    CENTRE_KEYS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # a padding token: nothing to write
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot
           + heads * stride_c_head + dims)
    if CENTRE_KEYS:
        key = key.to(tl.float32) - tl.load(k_offset_ptr + heads * HEAD_DIM + dims, mask=mask,
                                           other=0.0)
    tl.store(dst, quantize_for_cache(key, k_scale_ptr, cache_ptr, FP8), mask=mask)
    v_dst = cache_ptr + stride_c_kind + value_offsets(
        slot // BLOCK_SIZE, slot % BLOCK_SIZE, heads, dims, stride_c_block, stride_c_slot,
        stride_c_head, HEAD_DIM, BLOCK_SIZE, FP8)
    tl.store(v_dst, quantize_for_cache(value, v_scale_ptr, cache_ptr, FP8), mask=mask)


@triton.jit
def quantize_for_cache(x, scale_ptr, cache_ptr, FP8: tl.constexpr):
    """x in the cache's dtype: E4M3 of x / scale, saturating, for an FP8 cache (the caller
    has subtracted a key offset already, in float32)."""
    if FP8:
        x = tl.div_rn(x.to(tl.float32), tl.load(scale_ptr))
        # On the CPU interpreter (its pointers are numpy-backed) round in fp32 first.
        return to_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0), EMULATE_FP8_CAST)
    return x.to(cache_ptr.dtype.element_ty)


def write_kv_cache(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding token, not written
    k_scale: torch.Tensor | None = None,  # () float32 on the cache's device; FP8 caches
    v_scale: torch.Tensor | None = None,
    k_offset: torch.Tensor | None = None,  # (Hkv, D) float32; FP8 caches store key - k_offset
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    for name, tensor in (("key", key), ("value", value), ("kv_cache", kv_cache)):
        check_last_dim_contiguous(name, tensor)
    if num_tokens == 0:
        return
    offset, centre = key_offset_arg(kv_cache, k_offset, num_kv_heads, head_dim)
    launchable(_write_kv_cache_kernel, key)[(num_tokens,)](
        key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1),
        kv_cache, *kv_cache.stride()[:4],
        slot_mapping, *kv_scale_args(kv_cache, k_scale, v_scale), offset,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        HEADS_PAD=next_power_of_2(num_kv_heads), DIM_PAD=next_power_of_2(head_dim),
        FP8=is_fp8_cache(kv_cache), CENTRE_KEYS=centre,
        num_warps=1 if num_kv_heads * head_dim <= 1024 else 4,
    )


def key_offset_arg(kv_cache: torch.Tensor, k_offset: torch.Tensor | None, num_kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, bool]:
    """(the key-offset pointer a cache write reads, whether it subtracts it): an FP8 cache
    with an offset only; any tensor otherwise."""
    if k_offset is None or not is_fp8_cache(kv_cache):
        return kv_cache, False
    if k_offset.shape != (num_kv_heads, head_dim) or k_offset.dtype != torch.float32 \
            or not k_offset.is_contiguous():
        raise ValueError(f"k_offset must be a contiguous float32 ({num_kv_heads}, {head_dim}) "
                         f"tensor (KV heads, head_dim); got {k_offset.dtype} "
                         f"{tuple(k_offset.shape)}")
    return k_offset, True


def kv_scale_args(kv_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a kernel reads for an FP8 cache (any tensor when it reads none)."""
    if not is_fp8_cache(kv_cache):
        return kv_cache, kv_cache
    if k_scale is None or v_scale is None:
        raise ValueError("an FP8 KV cache needs k_scale and v_scale")
    return k_scale, v_scale


# ---------------------------------------------------------------------------------------------
# Decode: flash-decoding over the block table

# Splits per sequence are fixed on the host (a CUDA graph bakes in its grid); each sequence
# then cuts its own visible keys into that many equal splits on the GPU, so a short context
# still spreads over the SMs and a long one never needs more than MAX_DECODE_SPLITS partials.
MAX_DECODE_SPLITS = 64
# A split's fixed cost (loading q, writing a (group, D) fp32 partial that the reduce reads
# back) is ~5% of reading 128 tokens of K and V at head_dim 128; below that, fewer splits.
MIN_DECODE_SPLIT_TOKENS = 128
# Programs per SM the splits aim for: two waves keep every SM busy through the tail.
DECODE_PROGRAMS_PER_SM = 2


class DecodeTiling(NamedTuple):
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


class PrefillTiling(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def prefill_tiling(head_dim: int) -> PrefillTiling:
    """The prefill kernel's tiles: 64 query rows x 64 keys (32 past head_dim 128), 4 warps,
    2 stages. On the H100 benchmarks/attention_sweep.py found no tiling >= 5 % faster at 8 k
    or 4 x 2 k tokens (BENCHMARKS.md)."""
    return PrefillTiling(64, 64 if head_dim <= 128 else 32, 4, 2)


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence so that (sequences x KV heads x splits) fills the GPU at least
    twice, rounded up to a power of 2: 64 at batch 1 with 8 KV heads on 132 SMs, 1 (no
    reduce) from batch 33 up. The split count is a compile-time constant of the kernel, and
    the decode rows of a mixed step come in any number: powers of 2 keep the variants to the
    seven that CUDA-graph capture (batch 1, 2, 4, 8, 16, 24, 32, ...) already compiles, so no
    step compiles a kernel mid-run (a second or more, inside someone's latency)."""
    if batch_invariant():  # a sequence's splits from its own length only
        return MAX_DECODE_SPLITS
    target = DECODE_PROGRAMS_PER_SM * _multiprocessor_count(device)
    splits = triton.next_power_of_2(triton.cdiv(target, num_seqs * num_kv_heads))
    return max(1, min(MAX_DECODE_SPLITS, splits))


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one after another: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def value_offsets(block, slot, heads, dims, stride_c_block, stride_c_slot, stride_c_head,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIMS_MAJOR: tl.constexpr):
    """Offsets of V elements in the cache's V half (broadcast over block/slot, heads, dims):
    (block_size, Hkv, D) per block, or (Hkv, D, block_size) for an FP8 cache (DIMS_MAJOR),
    whose keys are then contiguous like a key's dims (value_view, DESIGN.md)."""
    if DIMS_MAJOR:
        return block * stride_c_block + (heads * HEAD_DIM + dims) * BLOCK_SIZE + slot
    return block * stride_c_block + slot * stride_c_slot + heads * stride_c_head + dims


@triton.jit
def _kv_tile_pointers(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                      block, slot,  # (BLOCK_N,) each key's cache block (int64) and slot in it
                      kv_head, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      V_DIMS_MAJOR: tl.constexpr, V_RUN: tl.constexpr):
    """Pointers to a tile's K and V, (BLOCK_N, D) each."""
    dims = tl.arange(0, HEAD_DIM)
    rows = block * stride_c_block + slot * stride_c_slot + kv_head * stride_c_head
    k_ptrs = cache_ptr + rows[:, None] + dims[None, :]
    if V_DIMS_MAJOR:
        keys = block * stride_c_block + kv_head * (HEAD_DIM * BLOCK_SIZE) + slot
        if V_RUN > 0:  # runs of V_RUN keys, contiguous and aligned: the copy vectorises
            keys = tl.max_contiguous(tl.multiple_of(keys, V_RUN), V_RUN)
        v_ptrs = cache_ptr + stride_c_kind + keys[:, None] + dims[None, :] * BLOCK_SIZE
    else:
        v_ptrs = k_ptrs + stride_c_kind
    return k_ptrs, v_ptrs


@triton.jit
def _load_kv_pair(k_ptrs, v_ptrs, valid, MASKED: tl.constexpr):
    """K and V at the pointers; keys not `valid` read as zeros when MASKED."""
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _load_kv_tile(
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
    block_table,  # this sequence's row of the block table
    pos, valid,  # (BLOCK_N,) key positions and which of them to read
    kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    MASKED: tl.constexpr = True,  # False: every position is valid (a whole tile before kv_hi)
    V_DIMS_MAJOR: tl.constexpr = False,  # an FP8 cache: V stored (Hkv, D, block_size)
    V_RUN: tl.constexpr = 0,  # > 0: pos[0] is a multiple of V_RUN, which divides BLOCK_SIZE
):
    """K and V of the tokens at `pos`, found through the block table: (BLOCK_N, D) each."""
    if MASKED:
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
    slot = pos % BLOCK_SIZE
    k_ptrs, v_ptrs = _kv_tile_pointers(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                       stride_c_head, block, slot, kv_head, HEAD_DIM,
                                       BLOCK_SIZE, V_DIMS_MAJOR, V_RUN)
    k, v = _load_kv_pair(k_ptrs, v_ptrs, valid, MASKED)
    return k.to(DOT_DTYPE), v.to(DOT_DTYPE)


@triton.jit
def _load_aligned_kv_tile(
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
    block_table,  # this sequence's row of the block table
    tile,  # the tile's first key position: a multiple of BLOCK_N
    kv_lo, kv_hi,  # keys outside [kv_lo, kv_hi) read as zeros (when MASKED)
    kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, V_DIMS_MAJOR: tl.constexpr, V_RUN: tl.constexpr,
):
    """_load_kv_tile for a tile that starts on a multiple of BLOCK_N: one block-table entry
    is read per cache block the tile covers, not one per key, and spread to the keys in
    registers (FP8 cache, 448 rows of 2-4 k, H200, separate calls: 0.957 -> 0.921 ms a layer
    in E4M3 dots, 1.055 -> 1.001 in float16). (BLOCK_N, D) each, in the cache's dtype."""
    NUM_ENTRIES: tl.constexpr = BLOCK_N // BLOCK_SIZE if BLOCK_N > BLOCK_SIZE else 1
    entries = tl.arange(0, NUM_ENTRIES)
    pos = tile + tl.arange(0, BLOCK_N)
    if MASKED:
        block = tl.load(block_table + tile // BLOCK_SIZE + entries,
                        mask=tile + entries * BLOCK_SIZE < kv_hi, other=0)
    else:
        block = tl.load(block_table + tile // BLOCK_SIZE + entries)
    if NUM_ENTRIES > 1:  # each key picks its block's entry
        owner = (pos - tile) // BLOCK_SIZE
        block = tl.sum(tl.where(owner[:, None] == entries[None, :], block[None, :], 0), 1)
    block = block.to(tl.int64)
    slot = pos % BLOCK_SIZE
    k_ptrs, v_ptrs = _kv_tile_pointers(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                       stride_c_head, block, slot, kv_head, HEAD_DIM,
                                       BLOCK_SIZE, V_DIMS_MAJOR, V_RUN)
    return _load_kv_pair(k_ptrs, v_ptrs, (pos >= kv_lo) & (pos < kv_hi), MASKED)


@triton.jit
def _online_softmax_step(
    q, k, v,  # (M, D), (BLOCK_N, D), (BLOCK_N, D) in DOT_DTYPE
    visible,  # (M, BLOCK_N) which query row may see which key
    m, l, acc,  # (M,) running max of log2-scaled scores, (M,) running sum, (M, D) output
    qk_scale,  # softmax scale * log2(e): exp2 of scaled scores is exp of the scores
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Folds one key tile into each query row's running softmax; returns the new (m, l, acc)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    # A row that has seen no visible key yet (causal edge, window start, padding) is still at
    # -inf; subtracting 0 instead keeps exp2 from producing NaN, and its p stays 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _online_softmax_step_unmasked(q, k, v, m, l, acc, qk_scale,
                                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """_online_softmax_step for a tile every query row sees whole: no mask, and no -inf
    guard, since every row's new max is a finite score (the old -inf max gives alpha 0)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _decode_split(seq_len, window, NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """(first visible key, first tile, tokens per split, splits with work) of a sequence
    whose one query sits at position seq_len - 1 and sees keys p > seq_len - 1 - window.
    The splits cut [first tile, seq_len) into whole key tiles from a multiple of BLOCK_N, so
    every tile starts aligned (V_RUN); keys before the window's start are masked."""
    kv_start = tl.maximum(seq_len - window, 0)
    tile_start = kv_start // BLOCK_N * BLOCK_N
    span = tl.maximum(seq_len - tile_start, 1)  # an empty sequence still runs split 0
    split_size = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole key tiles
    split_size = tl.maximum(split_size, MIN_SPLIT)
    return kv_start, tile_start, split_size, tl.cdiv(span, split_size)


@triton.jit
def _decode_program(seq_lens_ptr, window, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """(KV head, sequence, split, first visible key, the split's first and end key, splits
    with work) of this decode program. KV heads vary fastest in the grid: programs that run
    together read the same blocks' heads, neighbours in memory (2 % faster on a bf16 cache,
    2-6 % on an FP8 one, H200). One axis for both: the grid's y axis stops at 65,535
    sequences, x at 2^31 - 1."""
    NUM_KV_HEADS: tl.constexpr = NUM_HEADS // GROUP
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    seq = (tl.program_id(0) // NUM_KV_HEADS).to(tl.int64)
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_start, tile_start, split_size, num_active = _decode_split(seq_len, window, NUM_SPLITS,
                                                                 MIN_SPLIT, BLOCK_N)
    kv_lo = tile_start + split * split_size  # a multiple of BLOCK_N
    kv_hi = tl.minimum(kv_lo + split_size, seq_len)
    return kv_head, seq, split, kv_start, kv_lo, kv_hi, num_active


@triton.jit
def _group_heads(kv_head, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """(GROUP_PAD,) query heads of this KV head's group, and which of them are real."""
    members = tl.arange(0, GROUP_PAD)
    return kv_head * GROUP + members, members < GROUP


@triton.jit
def _decode_whole_tiles(kv_start, kv_lo, kv_hi, BLOCK_N: tl.constexpr):
    """[first, end) of a split's whole key tiles, run without masks (a mask costs a select
    per load and per score); the tile the window's start cuts (split 0 only, before them)
    and the partial last one (after) run masked, both after the pipelined loop: the cut tile
    before it took 36 more registers a thread on sm_90 (164 against 121 at 64 keys and 4
    warps; one loop for both masked tiles, 146)."""
    full_lo = tl.where(kv_start > kv_lo, kv_lo + BLOCK_N, kv_lo)
    full_hi = full_lo + tl.maximum(kv_hi - full_lo, 0) // BLOCK_N * BLOCK_N
    return full_lo, full_hi


@triton.jit
def _store_decode_output(
    acc, l, m,  # (GROUP_PAD, D) weighted sum, (GROUP_PAD,) its softmax sum and max (log2)
    out_scale, seq, split, heads, head_mask, dims,
    out_ptr, stride_ot, stride_oh, part_out_ptr, part_lse_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """A decode program's output: normalised (no key, as for seq_len 0: zeros, like the
    reference) and scaled; into `out` when unsplit, else with its log2-sum-exp2 into the
    split buffers."""
    out = acc / tl.where(l > 0, l, 1.0)[:, None] * out_scale
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split  # (GROUP_PAD,)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=head_mask[:, None])
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=head_mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr, stride_qt, stride_qh,  # (S, Hq, D): the one new token of each sequence
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
    block_tables_ptr, stride_bt,  # (S, max_blocks) int32
    seq_lens_ptr,  # (S,) int32
    out_ptr, stride_ot, stride_oh,  # (S, Hq, D): written here when NUM_SPLITS == 1
    part_out_ptr,  # (S, Hq, NUM_SPLITS, D) float32: each split's normalised output
    part_lse_ptr,  # (S, Hq, NUM_SPLITS) float32: each split's log2-sum-exp2 of scores
    qk_scale, window,
    k_scale_ptr, v_scale_ptr,  # () float32, read when FP8
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    FP8: tl.constexpr, Q_TO_F16: tl.constexpr,
    V_RUN: tl.constexpr,  # see _load_kv_tile: key tiles start on multiples of BLOCK_N
):
    pdl_prologue(USE_PDL)
    kv_head, seq, split, kv_start, kv_lo, kv_hi, num_active = _decode_program(
        seq_lens_ptr, window, NUM_HEADS, GROUP, NUM_SPLITS, MIN_SPLIT, BLOCK_N)
    if split >= num_active:
        return

    heads, head_mask = _group_heads(kv_head, GROUP, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None], other=0.0)  # (GROUP_PAD, D)
    if Q_TO_F16:  # a bf16 query in float16 dots: saturate rather than overflow to inf
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    q = q.to(DOT_DTYPE)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt
    if FP8:  # the cache holds k / k_scale: fold k_scale into the scores' scale
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    full_lo, full_hi = _decode_whole_tiles(kv_start, kv_lo, kv_hi, BLOCK_N)
    for tile in range(full_lo, full_hi, BLOCK_N):
        k, v = _load_aligned_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                     stride_c_head, block_table, tile, kv_lo, kv_hi, kv_head,
                                     HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, FP8, V_RUN)
        k, v = k.to(DOT_DTYPE), v.to(DOT_DTYPE)
        m, l, acc = _online_softmax_step_unmasked(q, k, v, m, l, acc, qk_scale, DOT_DTYPE,
                                                  PRECISION)
    for tile in range(kv_lo, full_lo, BLOCK_N):  # the window's cut tile (at most one)
        pos = tile + tl.arange(0, BLOCK_N)
        valid = (pos >= kv_start) & (pos < kv_hi)
        k, v = _load_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                             block_table, pos, valid, kv_head, HEAD_DIM, BLOCK_SIZE, DOT_DTYPE,
                             True, FP8, V_RUN)
        m, l, acc = _online_softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale,
                                         DOT_DTYPE, PRECISION)
    for tile in range(tl.maximum(full_hi, full_lo), kv_hi, BLOCK_N):  # the partial last one
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < kv_hi
        k, v = _load_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                             block_table, pos, valid, kv_head, HEAD_DIM, BLOCK_SIZE, DOT_DTYPE,
                             True, FP8, V_RUN)
        m, l, acc = _online_softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale,
                                         DOT_DTYPE, PRECISION)

    out_scale = tl.load(v_scale_ptr) if FP8 else 1.0
    _store_decode_output(acc, l, m, out_scale, seq, split, heads, head_mask, dims, out_ptr,
                         stride_ot, stride_oh, part_out_ptr, part_lse_ptr, NUM_HEADS, HEAD_DIM,
                         NUM_SPLITS)


@triton.jit
def _e4m3_keys_major_step(
    qt, qt_rest, k, v,  # (D, G) twice, (BLOCK_N, D), (BLOCK_N, D) E4M3
    valid,  # (BLOCK_N,) which keys to count when MASKED (None otherwise)
    m, l_parts, acc,  # (G,) running max, (BLOCK_N, G) per-key running sums, (D, G) output
    scores_scale,  # (1, G): softmax scale * log2(e) * k_scale * each head's query scale
    MASKED: tl.constexpr, P_SCALE: tl.constexpr,
):
    """One key tile with E4M3 dots and the keys as the dots' rows: scores k . q^T (BLOCK_N,
    G) and the output v^T . p (D, G), so a tile's 64 keys fill Hopper's warpgroup MMA (M 64),
    which takes E4M3 operands straight from shared memory: nothing is converted. The query
    is two E4M3 terms (qt + qt_rest, see _paged_decode_e4m3_kernel): two dots into one
    accumulator."""
    scores = tl.dot(k, qt_rest, tl.dot(k, qt)) * scores_scale
    if MASKED:
        scores = tl.where(valid[:, None], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 0))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[None, :])
    l_parts = l_parts * alpha[None, :] + p
    acc = acc * alpha[None, :] + tl.dot(tl.trans(v), to_e4m3(p * P_SCALE, EMULATE_FP8_CAST))
    return m_new, l_parts, acc


@triton.jit
def _paged_decode_e4m3_kernel(
    q_ptr, stride_qt, stride_qh, cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
    stride_c_head, block_tables_ptr, stride_bt, seq_lens_ptr, out_ptr, stride_ot, stride_oh,
    part_out_ptr, part_lse_ptr, qk_scale, window, k_scale_ptr, v_scale_ptr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
    V_RUN: tl.constexpr, P_SCALE: tl.constexpr,
):
    """_paged_decode_kernel (same arguments, same outputs) on an FP8 cache with E4M3 dots:
    each query head scaled into E4M3's range (its scale folded into its scores) and split
    into its E4M3 rounding plus the E4M3 rounding of what that left (~2^-8 of the query's
    error instead of ~2^-4), p scaled by P_SCALE and cast to E4M3. TensorRT-LLM's XQA on
    sm_90 rounds the query once; on SmolLM2 that one rounding (emulated on the CPU) raised
    the FP8 cache's KL from the bf16 build by 70 % and the split by 8 %; p's rounding
    costs ~6 % (benchmarks/BENCHMARKS.md, tenth session)."""
    pdl_prologue(USE_PDL)
    kv_head, seq, split, kv_start, kv_lo, kv_hi, num_active = _decode_program(
        seq_lens_ptr, window, NUM_HEADS, GROUP, NUM_SPLITS, MIN_SPLIT, BLOCK_N)
    if split >= num_active:
        return

    heads, head_mask = _group_heads(kv_head, GROUP, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    qt = tl.load(q_ptr + seq * stride_qt + heads[None, :] * stride_qh + dims[:, None],
                 mask=head_mask[None, :], other=0.0).to(tl.float32)  # (D, GROUP_PAD)
    q_amax = tl.max(tl.abs(qt), 0)
    q_col_scale = tl.where(q_amax > 0, q_amax / 448.0, 1.0)  # FP8_MAX
    qt = qt / q_col_scale[None, :]
    qt_first = to_e4m3(qt, EMULATE_FP8_CAST)
    # The remainder is at most 2^-4 of its element: below 2^-6 it is subnormal, off by at
    # most 2^-10 of the head's largest element (448), which no score notices.
    qt_rest = to_e4m3(qt - qt_first.to(tl.float32), EMULATE_FP8_CAST)
    scores_scale = (qk_scale * tl.load(k_scale_ptr) * q_col_scale)[None, :]

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_parts = tl.zeros([BLOCK_N, GROUP_PAD], tl.float32)
    acc = tl.zeros([HEAD_DIM, GROUP_PAD], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt
    full_lo, full_hi = _decode_whole_tiles(kv_start, kv_lo, kv_hi, BLOCK_N)
    for tile in range(full_lo, full_hi, BLOCK_N):
        k, v = _load_aligned_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                     stride_c_head, block_table, tile, kv_lo, kv_hi, kv_head,
                                     HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, True, V_RUN)
        m, l_parts, acc = _e4m3_keys_major_step(qt_first, qt_rest, k, v, None, m, l_parts, acc,
                                                scores_scale, False, P_SCALE)
    for tile in range(kv_lo, full_lo, BLOCK_N):  # the window's cut tile (at most one)
        pos = tile + tl.arange(0, BLOCK_N)
        valid = (pos >= kv_start) & (pos < kv_hi)
        k, v = _load_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                             block_table, pos, valid, kv_head, HEAD_DIM, BLOCK_SIZE,
                             tl.float8e4nv, True, True, V_RUN)
        m, l_parts, acc = _e4m3_keys_major_step(qt_first, qt_rest, k, v, valid, m, l_parts, acc,
                                                scores_scale, True, P_SCALE)
    for tile in range(tl.maximum(full_hi, full_lo), kv_hi, BLOCK_N):  # the partial last one
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < kv_hi
        k, v = _load_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                             block_table, pos, valid, kv_head, HEAD_DIM, BLOCK_SIZE,
                             tl.float8e4nv, True, True, V_RUN)
        m, l_parts, acc = _e4m3_keys_major_step(qt_first, qt_rest, k, v, valid, m, l_parts, acc,
                                                scores_scale, True, P_SCALE)

    _store_decode_output(tl.trans(acc), tl.sum(l_parts, 0), m, tl.load(v_scale_ptr) / P_SCALE,
                         seq, split, heads, head_mask, dims, out_ptr, stride_ot, stride_oh,
                         part_out_ptr, part_lse_ptr, NUM_HEADS, HEAD_DIM, NUM_SPLITS)


@triton.jit
def _paged_decode_reduce_kernel(
    part_out_ptr, part_lse_ptr,  # as written by _paged_decode_kernel
    seq_lens_ptr,
    out_ptr, stride_ot, stride_oh,  # (S, Hq, D)
    window,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    _, _, _, num_active = _decode_split(seq_len, window, NUM_SPLITS, MIN_SPLIT, BLOCK_N)
    splits = tl.arange(0, SPLITS_PAD)
    active = splits < num_active  # the splits that ran; the rest of the buffer is stale
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=active, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # (SPLITS_PAD,)
    dims = tl.arange(0, HEAD_DIM)
    partial = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                      mask=active[:, None], other=0.0)  # (SPLITS_PAD, D)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * partial, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def _check_attention_inputs(query: torch.Tensor, kv_cache: torch.Tensor) -> None:
    check_float("query", query)
    if not is_fp8_cache(kv_cache):
        check_float("kv_cache", kv_cache)
    check_last_dim_contiguous("query", query)
    check_last_dim_contiguous("kv_cache", kv_cache)
    check_head_dim(query.shape[2])
    if query.shape[1] % kv_cache.shape[3]:
        raise ValueError(
            f"{query.shape[1]} query heads is not a multiple of {kv_cache.shape[3]} KV heads"
        )


# How decode turns an FP8 KV cache's E4M3 tiles into dot operands (KILN_FP8_KV_DOT, the A/B
# switch): "fp16" (default) = float16 dots, one conversion instruction per element pair;
# "e4m3" = E4M3 dots (_paged_decode_e4m3_kernel: the query scaled to E4M3 per head and split
# into two E4M3 terms, p to E4M3 after E4M3_P_SCALE, no K or V element converted;
# TensorRT-LLM's XQA does the same on sm_90 with the query rounded once, which on SmolLM2
# cost +1.07 % perplexity against "fp16"'s +0.61 % and the split's +0.75 %, H200; the split
# reads 0.77 ms a layer at 448 rows x 2-4 k against 0.75 rounded once and 0.84 "fp16"), not
# the default for those 0.14 points; "model" = the query's dtype and the 16-bit caches'
# tiling, as before both (sm_90 converts E4M3 pairs to float16 only, so bfloat16 takes a
# second conversion). float16 holds every E4M3 value exactly and p in [0, 1] with more
# mantissa than bfloat16; a bfloat16 query past float16's range saturates (Q_TO_F16).
FP8_KV_DOT_MODES = ("fp16", "model", "e4m3")
# The "e4m3" mode: p is scaled by this before its cast to E4M3, so probabilities down to
# ~1e-5 of a row's largest stay normal numbers (exact: a power of 2).
E4M3_P_SCALE = 256.0
# Keys per tile, warps, stages of both FP8 modes. V is stored dims-major (value_view), so
# both operands load and widen like K, and a tile's V is read in runs of a block's keys:
# at 448 rows of 2-4 k context (H200, benchmarks/results/s14-h200-*) "fp16" reads 1.01 /
# 0.85 / 0.82 ms a layer at 16 / 32 / 64-token blocks and "e4m3" 0.92 / 0.74 / 0.71 ms
# (main's key-major V: 0.96-0.99 ms at any block size); 16-byte runs (16-token blocks) cost
# the copy twice its L2 sectors (ncu), hence FP8_KV_DEFAULT_BLOCK_SIZE.
FP8_DECODE_TILING = (64, 4, 3)


def _decode_dot(query: torch.Tensor, kv_cache: torch.Tensor):
    """(dot dtype, FP8 tiling?) of the decode kernel for this query and cache; float32
    queries (and the interpreter) keep float32 dots."""
    if not is_fp8_cache(kv_cache):
        return dot_dtype(query), False
    mode = os.environ.get("KILN_FP8_KV_DOT", "") or "fp16"
    if mode not in FP8_KV_DOT_MODES:
        raise ValueError(f"KILN_FP8_KV_DOT must be one of {', '.join(FP8_KV_DOT_MODES)} (or "
                         f"unset); got {mode!r}")
    if mode == "model" or dot_dtype(query) == tl.float32:
        return dot_dtype(query), mode == "fp16"
    if mode == "e4m3":
        return tl.float8e4nv, True
    return tl.float16, True


def decode_tiling(head_dim: int, fp8_tiling: bool = False) -> DecodeTiling:
    """The decode kernel's tiles: 64 keys (32 past head_dim 128), 4 warps, 2 stages for 16-bit
    caches (benchmarks/attention_sweep.py: at batch, within 6 % of the best tiling on the
    H200); FP8_DECODE_TILING for an FP8 cache in float16 or E4M3 dots (half the keys past
    head_dim 128: not measured there)."""
    if fp8_tiling:
        block_n, num_warps, num_stages = FP8_DECODE_TILING
        return DecodeTiling(block_n if head_dim <= 128 else block_n // 2, num_warps, num_stages)
    return DecodeTiling(64 if head_dim <= 128 else 32, 4, 2)


def paged_decode_attention(
    query: torch.Tensor,  # (S, Hq, D): exactly one new token per sequence
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), holding this step's KV
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32, on the GPU; never read on the host
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,  # splits per sequence; default: decode_num_splits
    out: torch.Tensor | None = None,  # (S, Hq, D) to write into (a view of a larger output)
    tiling: DecodeTiling | None = None,  # default: DecodeTiling for the head_dim
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache holds key / k_scale
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # (S, Hq, D)
    _check_attention_inputs(query, kv_cache)
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"decode takes one token per sequence: {num_seqs} tokens, "
                         f"{seq_lens.shape[0]} sequences")
    out = _output_like(query, out)
    if num_seqs == 0:
        return out
    num_splits = num_splits or decode_num_splits(num_seqs, num_kv_heads, query.device)
    dot, fp8_tiling = _decode_dot(query, kv_cache)
    block_n, num_warps, num_stages = tiling or decode_tiling(head_dim, fp8_tiling)
    window = sliding_window or NO_WINDOW
    group = num_heads // num_kv_heads
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits,
                               dtype=torch.float32, device=query.device)
    else:  # the split kernel writes `out` itself; these are never touched
        part_out = part_lse = out
    pdl = use_pdl(query)
    args = (query, query.stride(0), query.stride(1),
            kv_cache, *kv_cache.stride()[:4],
            block_tables, block_tables.stride(0),
            seq_lens,
            out, out.stride(0), out.stride(1),
            part_out, part_lse,
            scale * LOG2_E, window, *kv_scale_args(kv_cache, k_scale, v_scale))
    shape = dict(NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
                 HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n,
                 NUM_SPLITS=num_splits, MIN_SPLIT=MIN_DECODE_SPLIT_TOKENS,
                 V_RUN=value_run(kv_cache, block_n), USE_PDL=pdl, launch_pdl=pdl,
                 num_warps=num_warps, num_stages=num_stages)
    grid = (num_seqs * num_kv_heads, num_splits)
    if dot == tl.float8e4nv:
        launchable(_paged_decode_e4m3_kernel, query)[grid](*args, **shape,
                                                           P_SCALE=E4M3_P_SCALE)
    else:
        launchable(_paged_decode_kernel, query)[grid](
            *args, **shape, DOT_DTYPE=dot, PRECISION=dot_precision(query),
            FP8=is_fp8_cache(kv_cache),
            Q_TO_F16=dot == tl.float16 and query.dtype != torch.float16,
        )
    if num_splits > 1:
        launchable(_paged_decode_reduce_kernel, query)[(num_seqs, num_heads)](
            part_out, part_lse, seq_lens,
            out, out.stride(0), out.stride(1),
            window,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_N=block_n,
            NUM_SPLITS=num_splits, MIN_SPLIT=MIN_DECODE_SPLIT_TOKENS,
            SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=4, USE_PDL=pdl, launch_pdl=pdl,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Prefill / extend: ragged new tokens over cached context


@triton.jit
def _prefill_tile(
    q, q_pos, tile, kv_lo, kv_hi, window, m, l, acc, qk_scale,
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
    block_table, kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
    FP8: tl.constexpr, V_RUN: tl.constexpr,
):
    """One key tile of a prefill query block; MASKED False: every row sees every key."""
    pos = tile + tl.arange(0, BLOCK_N)
    if MASKED:
        in_range = (pos >= kv_lo) & (pos < kv_hi)
    else:
        in_range = pos < kv_hi  # always true: kept as the loads' mask
    k, v = _load_kv_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                         block_table, pos, in_range, kv_head, HEAD_DIM, BLOCK_SIZE, DOT_DTYPE,
                         True, FP8, V_RUN)
    if MASKED:
        visible = (in_range[None, :] & (pos[None, :] <= q_pos[:, None])
                   & (pos[None, :] > q_pos[:, None] - window))  # (BLOCK_M, BLOCK_N)
        return _online_softmax_step(q, k, v, visible, m, l, acc, qk_scale, DOT_DTYPE, PRECISION)
    return _online_softmax_step_unmasked(q, k, v, m, l, acc, qk_scale, DOT_DTYPE, PRECISION)


# Per-step values stay runtime arguments rather than specialisations: the sequence count,
# and pointers a mixed step slices at a row offset (seq_lens[D:], block_tables[D:]), whose
# 16-byte alignment would otherwise pick a kernel variant, compiled mid-run on first sight.
@triton.jit(do_not_specialize=["num_seqs", "seq_lens_ptr", "block_tables_ptr",
                               "query_start_loc_ptr"])
def _paged_prefill_kernel(
    q_ptr, stride_qt, stride_qh,  # (T, Hq, D)
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
    block_tables_ptr, stride_bt,  # (S, max_blocks) int32
    query_start_loc_ptr,  # (S+1,) int32
    seq_lens_ptr,  # (S,) int32
    out_ptr, stride_ot, stride_oh,  # (T, Hq, D)
    qk_scale, window, num_seqs,
    k_scale_ptr, v_scale_ptr,  # () float32, read when FP8
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
    V_RUN: tl.constexpr,  # see _load_kv_tile: key tiles start on multiples of BLOCK_N
):
    # Sequence s owns programs [first(s), first(s+1)) with first(s) = query_start_loc[s] //
    # BLOCK_M + s: strictly increasing, and at least cdiv(q_len, BLOCK_M) programs apart, so a
    # grid of T // BLOCK_M + S covers every query block; programs past a sequence's end exit.
    program = tl.program_id(0)
    head = tl.program_id(1)
    left: tl.int32 = 0
    right: tl.int32 = num_seqs
    while left < right:  # binary search for the first s with first(s) > program
        mid = (left + right) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= program:
            left = mid + 1
        else:
            right = mid
    seq = (left - 1).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = program - (q_start // BLOCK_M + seq)
    if q_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens cached before this step's

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) index among the new tokens
    row_mask = rows < q_len
    q_pos = context + rows  # absolute positions
    dims = tl.arange(0, HEAD_DIM)
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, D)

    # Keys this block can see: from the first row's window start to the last row's position.
    kv_lo = tl.maximum(context + q_block * BLOCK_M - window + 1, 0)
    kv_hi = context + tl.minimum(q_len, (q_block + 1) * BLOCK_M)
    # Key tiles every row of the block sees whole (at or before the first row's position,
    # after the last row's window start) skip the mask: [full_lo, full_hi), whole tiles.
    # The masked tiles before (window edge) and after (the causal diagonal) are few.
    first_q_pos = context + q_block * BLOCK_M
    last_q_pos = kv_hi - 1
    tile_lo = kv_lo // BLOCK_N * BLOCK_N
    full_lo = tl.maximum(tl.cdiv(tl.maximum(last_q_pos - window + 1, 0), BLOCK_N) * BLOCK_N,
                         tile_lo)
    full_hi = tl.maximum((first_q_pos + 1) // BLOCK_N * BLOCK_N, full_lo)
    kv_head = head // GROUP
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt
    if FP8:  # the cache holds k / k_scale: fold k_scale into the scores' scale
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    for tile in range(tile_lo, tl.minimum(full_lo, kv_hi), BLOCK_N):  # window edge: masked
        m, l, acc = _prefill_tile(q, q_pos, tile, kv_lo, kv_hi, window, m, l, acc, qk_scale,
                                  cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                  stride_c_head, block_table, kv_head, HEAD_DIM, BLOCK_SIZE,
                                  BLOCK_N, DOT_DTYPE, PRECISION, True, FP8, V_RUN)
    for tile in range(full_lo, full_hi, BLOCK_N):  # seen whole by every row: no mask
        m, l, acc = _prefill_tile(q, q_pos, tile, kv_lo, kv_hi, window, m, l, acc, qk_scale,
                                  cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                  stride_c_head, block_table, kv_head, HEAD_DIM, BLOCK_SIZE,
                                  BLOCK_N, DOT_DTYPE, PRECISION, False, FP8, V_RUN)
    for tile in range(tl.maximum(full_hi, full_lo), kv_hi, BLOCK_N):  # the diagonal: masked
        m, l, acc = _prefill_tile(q, q_pos, tile, kv_lo, kv_hi, window, m, l, acc, qk_scale,
                                  cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
                                  stride_c_head, block_table, kv_head, HEAD_DIM, BLOCK_SIZE,
                                  BLOCK_N, DOT_DTYPE, PRECISION, True, FP8, V_RUN)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr)
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill_attention(
    query: torch.Tensor,  # (T, Hq, D) all new tokens, concatenated
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), holding this step's KV
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    query_start_loc: torch.Tensor,  # (S+1,) int32
    seq_lens: torch.Tensor,  # (S,) int32
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # (T, Hq, D) to write into (a view of a larger output)
    tiling: PrefillTiling | None = None,  # default: prefill_tiling(head_dim)
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache holds key / k_scale
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    _check_attention_inputs(query, kv_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    out = _output_like(query, out)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, num_warps, num_stages = tiling or prefill_tiling(head_dim)
    grid = (num_tokens // block_m + num_seqs, num_heads)
    launchable(_paged_prefill_kernel, query)[grid](
        query, query.stride(0), query.stride(1),
        kv_cache, *kv_cache.stride()[:4],
        block_tables, block_tables.stride(0),
        query_start_loc, seq_lens,
        out, out.stride(0), out.stride(1),
        scale * LOG2_E, sliding_window or NO_WINDOW, num_seqs,
        *kv_scale_args(kv_cache, k_scale, v_scale),
        GROUP=num_heads // kv_cache.shape[3], HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype(query), PRECISION=dot_precision(query), FP8=is_fp8_cache(kv_cache),
        V_RUN=value_run(kv_cache, block_n), num_warps=num_warps, num_stages=num_stages,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Mixed steps: decode rows first, then prefill / extend rows


def paged_mixed_attention(
    query: torch.Tensor,  # (T, Hq, D): D decode tokens (one per sequence), then the rest
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), holding this step's KV
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32
    num_decode_seqs: int,  # D: sequences [0, D) have exactly one new token each
    prefill_query_start_loc: torch.Tensor,  # (S - D + 1,) int32: query_start_loc[D:] - D
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache holds key / k_scale
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """A step that mixes decode tokens with prefill chunks, ordered decode-first by the
    runner. The prefill kernel would give each decode token a whole query block per query
    head and walk its context without splitting: at 2048/2048 a mixed step's ~125 decode
    rows of ~3 k context cost more than its 8 k prefill tokens' attention. Here the decode
    rows take the split-K decode kernel (one program per KV head group) and only the rest
    the prefill kernel, both writing into one output."""
    num_decode = num_decode_seqs
    if not 0 <= num_decode <= seq_lens.shape[0]:
        raise ValueError(f"num_decode_seqs {num_decode} outside [0, {seq_lens.shape[0]}]")
    if prefill_query_start_loc.shape[0] != seq_lens.shape[0] - num_decode + 1:
        raise ValueError(
            f"prefill_query_start_loc has {prefill_query_start_loc.shape[0]} entries; "
            f"{seq_lens.shape[0] - num_decode + 1} expected for {seq_lens.shape[0]} sequences "
            f"of which {num_decode} decode"
        )
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_decode:
        paged_decode_attention(query[:num_decode], kv_cache, block_tables[:num_decode],
                               seq_lens[:num_decode], scale, sliding_window,
                               out=out[:num_decode], k_scale=k_scale, v_scale=v_scale)
    if num_decode < seq_lens.shape[0]:
        paged_prefill_attention(query[num_decode:], kv_cache, block_tables[num_decode:],
                                prefill_query_start_loc, seq_lens[num_decode:], scale,
                                sliding_window, out=out[num_decode:], k_scale=k_scale,
                                v_scale=v_scale)
    return out


def _output_like(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} does not match "
                         f"the query {tuple(query.shape)} {query.dtype} on {query.device}")
    check_last_dim_contiguous("out", out)
    return out
