"""Long prefill chunks through a dense attention library kernel (cuDNN's, via torch), with the
cached prefix gathered out of the paged cache.

On the H200 at 8k-32k tokens cuDNN's causal attention runs 590-645 TFLOP/s where kiln's paged
Triton kernel runs 320-390 (benchmarks/prefill_attention_vs_sdpa.py, BENCHMARKS.md): at 32k+
tokens attention is most of a prefill, so chunks that are long enough take this route.

One sequence's chunk of q new tokens after c cached ones attends over keys [0, c + q): the
keys [0, c) are seen whole by every query (no mask), the keys [c, c + q) causally (the
square's lower triangle). Each part is one or more dense calls over key pieces of at most
KEY_PIECE tokens that return their output and log-sum-exp; the parts merge exactly:

    out = Σ_i exp(lse_i − m) out_i / Σ_i exp(lse_i − m),   m = max_i lse_i

Keys and values are gathered from the cache per piece, so the transient memory is one
piece's, not the whole context's (a 131,072-token context would be 2 GiB per layer at once).
cuDNN takes grouped-query attention as it is (fewer KV heads than query heads) where torch's
build allows it (`cudnn_native_gqa`, probed once against the repeated call): the gather then
moves the cache's 8 KV heads, not 32 repeated ones. At 8k tokens the repeat was 27 % of the
route's time on the H200 (0.25 ms for ~235 MB moved); otherwise the heads are repeated.

`attend_with_lse` is the one GPU-library call; tests swap in `attend_with_lse_reference`
(float64 math) to check the pieces and the merge on the CPU.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

# Chunks shorter than this keep the paged kernel: below ~1k tokens the Triton kernel is close
# to the library (and a step that short may be replaying a prefill CUDA graph, whose
# kernels must not depend on host lists).
DENSE_PREFILL_MIN_TOKENS = 1024
# Keys per dense call: bounds the gathered K/V (2 x 32 heads x 128 x bf16 = 16 KiB a token,
# 512 MiB a piece of 32k at Llama-3-8B's shape).
KEY_PIECE = 32768

AttendWithLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float],
                         tuple[torch.Tensor, torch.Tensor]]


def attend_with_lse(query, key, value, causal: bool, scale: float):
    """(1, H, q, D) each → output (1, H, q, D) and log-sum-exp (1, H, q) float32 (natural
    log), through cuDNN's fused attention (torch's private op: the public SDPA returns no
    log-sum-exp). causal: the top-left-aligned triangle, for a square q == k."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(out.shape[:3])


def attend_with_lse_reference(query, key, value, causal: bool, scale: float):
    """attend_with_lse in float64 on any device (the CPU tests' stand-in); key and value may
    have fewer heads than query (grouped-query attention)."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query.double(), key.double()) * scale
    if causal:
        q_len, k_len = scores.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), value.double())
    return out.to(query.dtype), lse.float()


@functools.cache
def dense_route_available(device_index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether cuDNN's attention runs for this dtype and head size on this GPU (a tiny
    call, once per combination); False sends every chunk to the paged kernel."""
    try:
        probe = torch.randn(1, 2, 16, head_dim, device=f"cuda:{device_index}", dtype=dtype)
        attend_with_lse(probe, probe, probe, True, 1.0)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def cudnn_native_gqa(device_index: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether cuDNN's attention takes fewer KV heads than query heads and gives the same
    output as with the KV heads repeated (a tiny call, once per combination). False: the
    route repeats the heads."""
    generator = torch.Generator(device=f"cuda:{device_index}").manual_seed(0)
    query, key, value = (torch.randn(1, heads, 64, head_dim, device=f"cuda:{device_index}",
                                     dtype=dtype, generator=generator) for heads in (4, 2, 2))
    try:
        native = attend_with_lse(query, key, value, True, 1.0)
    except (RuntimeError, NotImplementedError):
        # A torch / cuDNN build that refuses unequal head counts raises here: that is the
        # answer the probe asks for (repeat the heads), not an error to report.
        return False
    repeated = attend_with_lse(query, key.repeat_interleave(2, dim=1),
                               value.repeat_interleave(2, dim=1), True, 1.0)
    return all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
               for a, b in zip(native, repeated))


def use_dense_prefill(query: torch.Tensor, kv_cache: torch.Tensor, query_lens: list[int],
                      sliding_window: int | None) -> bool:
    """The dense route applies: CUDA, a bf16/fp16 cache of the query's dtype (not FP8), no
    sliding window, not inside CUDA-graph capture, and every sequence's chunk at least
    DENSE_PREFILL_MIN_TOKENS long (a step mixing short and long chunks keeps the kernel)."""
    if not query.is_cuda or sliding_window is not None or kv_cache.dtype != query.dtype:
        return False
    if query.dtype not in (torch.bfloat16, torch.float16) or query.shape[-1] > 128:
        return False
    if not query_lens or min(query_lens) < DENSE_PREFILL_MIN_TOKENS:
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    return dense_route_available(query.device.index or 0, query.dtype, query.shape[-1])


def gather_keys_values(kv_cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int,
                       num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions [start, end) of one sequence: (1, num_heads, n, D) each,
    the cache's KV heads repeated to num_heads (the cache's own count: no repeat)."""
    block_size = kv_cache.shape[2]
    first, last = start // block_size, -(-end // block_size)
    blocks = block_table[first:last].long()
    both = kv_cache[:, blocks].flatten(1, 2)  # (2, n_blocks * block_size, Hkv, D)
    offset = start - first * block_size
    both = both[:, offset : offset + end - start]
    if num_heads != kv_cache.shape[3]:
        both = both.repeat_interleave(num_heads // kv_cache.shape[3], dim=2)  # (2, n, Hq, D)
    return both[0].transpose(0, 1)[None], both[1].transpose(0, 1)[None]


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Outputs of attention over disjoint key sets, each with its log-sum-exp, as one softmax
    over their union (float32 weights; the output in the parts' dtype)."""
    if len(parts) == 1:
        return parts[0][0]
    most = functools.reduce(torch.maximum, [lse for _, lse in parts])
    total = torch.zeros_like(parts[0][0], dtype=torch.float32)
    weight_sum = torch.zeros_like(most)
    for out, lse in parts:
        weight = torch.exp(lse - most)
        total += out.float() * weight[..., None]
        weight_sum += weight
    return (total / weight_sum[..., None]).to(parts[0][0].dtype)


def dense_prefill_attention(
    query: torch.Tensor,  # (T, Hq, D): every sequence's chunk, concatenated
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), holding this step's KV
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    query_start_loc: list[int],  # S + 1 host offsets
    seq_lens: list[int],  # S host lengths (cached + this step's)
    scale: float,
    attend: AttendWithLse = attend_with_lse,
    native_gqa: bool | None = None,  # None: cudnn_native_gqa's answer for this GPU
) -> torch.Tensor:  # (T, Hq, D)
    if native_gqa is None:
        native_gqa = cudnn_native_gqa(query.device.index or 0, query.dtype, query.shape[-1])
    # Heads the gathered keys and values have: the cache's own when the call takes them.
    num_heads = kv_cache.shape[3] if native_gqa else query.shape[1]
    out = torch.empty_like(query)
    for seq, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[seq], query_start_loc[seq + 1]
        q_len = end - start
        if q_len == 0:
            continue
        context = seq_len - q_len
        q = query[start:end].transpose(0, 1)[None]  # (1, Hq, q, D)
        table = block_tables[seq]
        parts = []
        for piece in range(0, context, KEY_PIECE):  # the cached prefix: no mask
            k, v = gather_keys_values(kv_cache, table, piece, min(piece + KEY_PIECE, context),
                                      num_heads)
            parts.append(attend(q, k, v, False, scale))
        # The chunk's own keys: the causal square, in pieces of query rows whose keys end at
        # the row's own position. Rows [r, r + n) see keys [context, context + r + n): the
        # part before r is seen whole (no mask), the n x n diagonal causally.
        rows_out = []
        for row in range(0, q_len, KEY_PIECE):
            rows = min(KEY_PIECE, q_len - row)
            q_rows = q[:, :, row : row + rows]
            row_parts = [(o[:, :, row : row + rows], l[:, :, row : row + rows]) for o, l in parts]
            for piece in range(0, row, KEY_PIECE):
                k, v = gather_keys_values(kv_cache, table, context + piece,
                                          context + min(piece + KEY_PIECE, row), num_heads)
                row_parts.append(attend(q_rows, k, v, False, scale))
            k, v = gather_keys_values(kv_cache, table, context + row, context + row + rows,
                                      num_heads)
            row_parts.append(attend(q_rows, k, v, True, scale))
            rows_out.append(merge(row_parts))
        whole = rows_out[0] if len(rows_out) == 1 else torch.cat(rows_out, dim=2)
        out[start:end] = whole[0].transpose(0, 1)
    return out
