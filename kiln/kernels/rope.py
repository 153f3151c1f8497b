"""Rotary position embedding (NeoX / Hugging Face "rotate_half" layout): torch reference, and a
Triton kernel that rotates q and k and can write the rotated k (with v) straight into the
paged KV cache, so k never makes a round trip through memory before the cache write.

    rotate_half layout, rotary_dim R, per head:  x = [x1 (R/2) | x2 (R/2) | rest (D - R)]
    out = [x1 cos - x2 sin | x2 cos + x1 sin | rest]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.attention import (
    is_fp8_cache,
    key_offset_arg,
    kv_scale_args,
    quantize_for_cache,
    value_offsets,
    write_kv_cache_reference,
)
from kiln.kernels.triton_utils import (
    pdl_prologue,
    use_pdl,
    check_float,
    check_last_dim_contiguous,
    launchable,
    next_power_of_2,
)


def rope_reference(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32: [cos | sin] halves
) -> tuple[torch.Tensor, torch.Tensor]:
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # (T, rotary_dim/2) each
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)  # (T, 1, rotary_dim)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        half = rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated_half * sin
        return torch.cat([out.to(x.dtype), rest], dim=-1)

    return rotate(query), rotate(key)


def rope_and_write_kv_cache_reference(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding token, not written
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache stores key / k_scale
    v_scale: torch.Tensor | None = None,
    k_offset: torch.Tensor | None = None,  # (Hkv, D) float32: an FP8 cache stores key - k_offset
) -> torch.Tensor:  # (T, Hq, D) the rotated query
    query, key = rope_reference(positions, query, key, cos_sin_cache)
    write_kv_cache_reference(key, value, kv_cache, slot_mapping, k_scale, v_scale, k_offset)
    return query


@triton.jit
def _rotate_heads(
    src, stride_src_head,  # one token's heads: (heads, D) rows
    dst, stride_dst_head,
    cos, sin,  # (1, HALF_PAD) float32
    scale_ptr,  # () float32: an FP8 destination (the cache) stores x / scale
    offset_ptr,  # (heads, HEAD_DIM) float32: with CENTRE, the cache stores (x - offset) / scale
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr,
    FP8: tl.constexpr, CENTRE: tl.constexpr = False,
):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    half_dims = tl.arange(0, HALF_PAD)[None, :]
    half = ROTARY_DIM // 2
    mask = (heads < NUM_HEADS) & (half_dims < half)
    src_rows = src + heads * stride_src_head
    dst_rows = dst + heads * stride_dst_head
    x1 = tl.load(src_rows + half_dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_rows + half + half_dims, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the input dtype first, then to the destination's (the cache may differ), as
    # the reference's rope-then-write does.
    x_dtype = src.dtype.element_ty
    first = (x1 * cos - x2 * sin).to(x_dtype)
    second = (x2 * cos + x1 * sin).to(x_dtype)
    if CENTRE:
        offsets = offset_ptr + heads * HEAD_DIM
        first = first.to(tl.float32) - tl.load(offsets + half_dims, mask=mask, other=0.0)
        second = second.to(tl.float32) - tl.load(offsets + half + half_dims, mask=mask, other=0.0)
    tl.store(dst_rows + half_dims, quantize_for_cache(first, scale_ptr, dst, FP8), mask=mask)
    tl.store(dst_rows + half + half_dims, quantize_for_cache(second, scale_ptr, dst, FP8),
             mask=mask)
    if REST_PAD > 0:  # partial rotary: the dims past ROTARY_DIM pass through
        rest_dims = ROTARY_DIM + tl.arange(0, REST_PAD)[None, :]
        rest_mask = (heads < NUM_HEADS) & (rest_dims < HEAD_DIM)
        rest = tl.load(src_rows + rest_dims, mask=rest_mask)
        if CENTRE:
            rest = rest.to(tl.float32) - tl.load(offset_ptr + heads * HEAD_DIM + rest_dims,
                                                 mask=rest_mask, other=0.0)
        tl.store(dst_rows + rest_dims, quantize_for_cache(rest, scale_ptr, dst, FP8),
                 mask=rest_mask)


@triton.jit
def _rope_kernel(
    positions_ptr,  # (T,) int64
    cos_sin_ptr, stride_cs,  # (max_positions, ROTARY_DIM) float32: [cos | sin]
    q_ptr, stride_qt, stride_qh,  # (T, Hq, D)
    k_ptr, stride_kt, stride_kh,  # (T, Hkv, D)
    q_out_ptr, stride_qot, stride_qoh,  # (T, Hq, D)
    k_out_ptr, stride_kot, stride_koh,  # (T, Hkv, D), when not WRITE_CACHE
    v_ptr, stride_vt, stride_vh,  # (T, Hkv, D), when WRITE_CACHE
    cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,  # when WRITE_CACHE
    slot_mapping_ptr,  # (T,) int64, when WRITE_CACHE
    k_scale_ptr, v_scale_ptr,  # () float32, when FP8
    k_offset_ptr,  # (Hkv, D) float32, when CENTRE_KEYS
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr, WRITE_CACHE: tl.constexpr,
    USE_PDL: tl.constexpr, FP8: tl.constexpr, CENTRE_KEYS: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)  # one program per token, all its heads
    position = tl.load(positions_ptr + token)
    half_dims = tl.arange(0, HALF_PAD)[None, :]
    cos_sin = cos_sin_ptr + position * stride_cs + half_dims
    cos = tl.load(cos_sin, mask=half_dims < ROTARY_DIM // 2, other=1.0)
    sin = tl.load(cos_sin + ROTARY_DIM // 2, mask=half_dims < ROTARY_DIM // 2, other=0.0)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, q_out_ptr + token * stride_qot,
                  stride_qoh, cos, sin, k_scale_ptr, k_offset_ptr,
                  NUM_HEADS, HEADS_PAD, HEAD_DIM, ROTARY_DIM, HALF_PAD, REST_PAD, False)
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + token)
        if slot >= 0:  # -1: a padding token, nothing to write
            dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_c_block
                   + (slot % BLOCK_SIZE) * stride_c_slot)
            _rotate_heads(k_ptr + token * stride_kt, stride_kh, dst, stride_c_head, cos, sin,
                          k_scale_ptr, k_offset_ptr, NUM_KV_HEADS, KV_HEADS_PAD, HEAD_DIM,
                          ROTARY_DIM, HALF_PAD, REST_PAD, FP8, CENTRE_KEYS)
            heads = tl.arange(0, KV_HEADS_PAD)[:, None]
            dims = tl.arange(0, DIM_PAD)[None, :]
            mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
            value = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
            v_dst = cache_ptr + stride_c_kind + value_offsets(
                slot // BLOCK_SIZE, slot % BLOCK_SIZE, heads, dims, stride_c_block,
                stride_c_slot, stride_c_head, HEAD_DIM, BLOCK_SIZE, FP8)
            tl.store(v_dst, quantize_for_cache(value, v_scale_ptr, cache_ptr, FP8), mask=mask)
    else:
        _rotate_heads(k_ptr + token * stride_kt, stride_kh, k_out_ptr + token * stride_kot,
                      stride_koh, cos, sin, k_scale_ptr, k_offset_ptr,
                      NUM_KV_HEADS, KV_HEADS_PAD, HEAD_DIM, ROTARY_DIM, HALF_PAD, REST_PAD, False)


def _launch_rope(positions, query, key, cos_sin_cache, value, kv_cache, slot_mapping,
                 k_scale=None, v_scale=None, k_offset=None):
    """Rotated query, and either the rotated key (no cache given) or None after a cache write."""
    for name, tensor in (("query", query), ("key", key)):
        check_float(name, tensor)
        check_last_dim_contiguous(name, tensor)
    if query.dtype != key.dtype or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"query ({query.dtype}) and key ({key.dtype}) must share a dtype and the "
                         f"cos/sin cache must be float32 (got {cos_sin_cache.dtype})")
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
    check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    write_cache = kv_cache is not None
    if write_cache:
        check_last_dim_contiguous("value", value)
        check_last_dim_contiguous("kv_cache", kv_cache)
        k_out = None
        k_out_args = (q_out, 0, 0)  # unread
        offset, centre = key_offset_arg(kv_cache, k_offset, key.shape[1], key.shape[2])
        cache_args = (value, value.stride(0), value.stride(1), kv_cache, *kv_cache.stride()[:4],
                      slot_mapping, *kv_scale_args(kv_cache, k_scale, v_scale), offset)
        block_size = kv_cache.shape[2]
        fp8 = is_fp8_cache(kv_cache)
    else:
        k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
        k_out_args = (k_out, k_out.stride(0), k_out.stride(1))
        cache_args = (key, 0, 0, key, 0, 0, 0, 0, positions, key, key, key)  # unread
        block_size = 1
        fp8 = centre = False
    if num_tokens == 0:
        return q_out, k_out
    half = rotary_dim // 2
    pdl = use_pdl(query)
    launchable(_rope_kernel, query)[(num_tokens,)](
        positions, cos_sin_cache, cos_sin_cache.stride(0),
        query, query.stride(0), query.stride(1),
        key, key.stride(0), key.stride(1),
        q_out, q_out.stride(0), q_out.stride(1),
        *k_out_args,
        *cache_args,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim, BLOCK_SIZE=block_size,
        HEADS_PAD=next_power_of_2(num_heads), KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim), HALF_PAD=next_power_of_2(half),
        REST_PAD=next_power_of_2(head_dim - rotary_dim) if rotary_dim < head_dim else 0,
        WRITE_CACHE=write_cache,
        num_warps=4 if num_heads * head_dim >= 2048 else 1,
        USE_PDL=pdl, launch_pdl=pdl, FP8=fp8, CENTRE_KEYS=centre,
    )
    return q_out, k_out


def rope(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rope_reference`: new rotated (query, key)."""
    return _launch_rope(positions, query, key, cos_sin_cache, None, None, None)


def rope_and_write_kv_cache(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding token, not written
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache stores key / k_scale
    v_scale: torch.Tensor | None = None,
    k_offset: torch.Tensor | None = None,  # (Hkv, D) float32: an FP8 cache stores key - k_offset
) -> torch.Tensor:  # (T, Hq, D) the rotated query
    """Triton twin of `rope_and_write_kv_cache_reference`."""
    query, _ = _launch_rope(positions, query, key, cos_sin_cache, value, kv_cache, slot_mapping,
                            k_scale, v_scale, k_offset)
    return query
