"""The one dispatcher for every op: the model code calls these, never an implementation.

Each op runs its Triton fast path when its tensors are on CUDA, and its torch reference
otherwise (the CPU) or when `KILN_REFERENCE_KERNELS=1` forces the references everywhere,
which is how `kiln verify` diffs fast against reference layer by layer. The references are the
oracle the kernel tests compare against.
"""

from __future__ import annotations

import os

import torch

from kiln.kernels import (
    activation,
    attention,
    dense_prefill,
    gemv,
    int_gemm,
    int_gemv,
    norm,
    quant_linear,
    rope as rope_kernels,
    skinny_fp8,
    skinny_int4,
    skinny_int8,
)
from kiln.kernels.activation import gelu_tanh_reference, silu_and_mul_reference
from kiln.kernels.attention import (
    PagedAttentionMetadata,
    paged_attention_reference,
    write_kv_cache_reference,
)
from kiln.kernels.norm import layer_norm_reference, rms_norm_reference
from kiln.kernels.triton_utils import batch_invariant, env_flag, has_sm90
from kiln.kernels.rope import rope_and_write_kv_cache_reference, rope_reference


def use_reference_kernels() -> bool:
    """True when KILN_REFERENCE_KERNELS=1. Read at every call, so a test or `kiln verify` can
    flip it between calls (as the A/B switches KILN_BATCH_INVARIANT and KILN_FP8_SKINNY)."""
    return os.environ.get("KILN_REFERENCE_KERNELS") == "1"


def use_fast_kernels(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` takes its fast path: CUDA, references not forced. The one
    switch for every op here and for the layers that call kernels directly
    (kiln/quant/fused_activation.py)."""
    return tensor.is_cuda and not use_reference_kernels()


_fast = use_fast_kernels


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, K) @ weight (N, K)^T + bias. One row on CUDA (batch-1 decode) takes the Triton
    skinny GEMM, launched with PDL so it streams weights while the previous kernel finishes:
    cuBLAS reaches 2.1–2.8 TB/s there against 2.6–3.1 for it (decode_chain_bench on the H100).
    At 2–16 rows cuBLAS measured as fast or faster, so it keeps those. KILN_BATCH_INVARIANT=1
    (triton_utils.batch_invariant): 1–16 rows all take the skinny GEMM's tensor-core tiles,
    so a row's result does not depend on how many rows its step has."""
    if _fast(x) and x.dim() == 2 and x.shape[0] <= gemv.MAX_ROWS and gemv.gemv_supported(x, weight):
        if batch_invariant():
            return gemv.skinny_linear(x, weight, bias, pdl=True, tensor_cores=True,
                                      config=gemv.BATCH_INVARIANT_CONFIG)
        if x.shape[0] == 1:
            config = gemv.decode_config(weight.shape[0], weight.shape[1])
            return gemv.skinny_linear(x, weight, bias, pdl=True, config=config)
    return torch.nn.functional.linear(x, weight, bias)


def rms_norm(
    x: torch.Tensor,  # (T, H) or (T, heads, D)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # like x
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual) * weight, x + residual), or (norm(x) * weight, None)."""
    if _fast(x):
        return norm.rms_norm(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)


layer_norm = layer_norm_reference
gelu_tanh = gelu_tanh_reference


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # (T, 2I) [gate | up] → (T, I)
    if _fast(x):
        return activation.silu_and_mul(x)
    return silu_and_mul_reference(x)


def rope(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32
) -> tuple[torch.Tensor, torch.Tensor]:
    if _fast(query):
        return rope_kernels.rope(positions, query, key, cos_sin_cache)
    return rope_reference(positions, query, key, cos_sin_cache)


def write_kv_cache(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache stores key / k_scale
    v_scale: torch.Tensor | None = None,
    k_offset: torch.Tensor | None = None,  # (Hkv, D) float32: an FP8 cache stores key - k_offset
) -> None:
    if _fast(key):
        attention.write_kv_cache(key, value, kv_cache, slot_mapping, k_scale, v_scale, k_offset)
    else:
        write_kv_cache_reference(key, value, kv_cache, slot_mapping, k_scale, v_scale, k_offset)


def rope_and_write_kv_cache(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64; -1 = padding
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache stores key / k_scale
    v_scale: torch.Tensor | None = None,
    k_offset: torch.Tensor | None = None,  # (Hkv, D) float32: an FP8 cache stores key - k_offset
) -> torch.Tensor:  # (T, Hq, D) rotated query; rotated key and value are now in the cache
    if _fast(query):
        return rope_kernels.rope_and_write_kv_cache(
            positions, query, key, value, cos_sin_cache, kv_cache, slot_mapping, k_scale, v_scale,
            k_offset,
        )
    return rope_and_write_kv_cache_reference(
        positions, query, key, value, cos_sin_cache, kv_cache, slot_mapping, k_scale, v_scale,
        k_offset,
    )


def paged_attention(
    query: torch.Tensor,  # (T, Hq, D)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), holding this step's KV
    metadata: PagedAttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # () float32: an FP8 cache holds key / k_scale
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Causal attention of every new token over its sequence's cached context.

    On CUDA a batch where every sequence has exactly one new token takes the split-K decode
    kernel (it reads only device tensors: CUDA-graph capturable); a mixed batch ordered
    decode-first (metadata.num_decode_seqs > 0) takes the decode kernel for its decode rows
    and the prefill kernel for the rest; a step of prompt chunks all at least
    DENSE_PREFILL_MIN_TOKENS long takes cuDNN's dense attention over the gathered context
    (dense_prefill.py: ~1.6x the paged kernel's TFLOP/s at 8k-32k on the H200); any other mix
    takes the prefill kernel.
    """
    if not _fast(query):
        return paged_attention_reference(
            query, kv_cache, metadata.block_tables, metadata.query_start_loc_host,
            metadata.seq_lens_host, scale, sliding_window, k_scale, v_scale,
        )
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if _all_single_token(query, metadata):
        return attention.paged_decode_attention(
            query, kv_cache, metadata.block_tables, metadata.seq_lens, scale, sliding_window,
            **scales,
        )
    num_decode = metadata.num_decode_seqs
    if not num_decode and metadata.max_query_len >= dense_prefill.DENSE_PREFILL_MIN_TOKENS:
        starts = metadata.query_start_loc_host
        query_lens = [end - start for start, end in zip(starts, starts[1:])]
        if dense_prefill.use_dense_prefill(query, kv_cache, query_lens, sliding_window):
            return dense_prefill.dense_prefill_attention(
                query, kv_cache, metadata.block_tables, starts, metadata.seq_lens_host, scale)
    if num_decode and metadata.prefill_query_start_loc is not None:
        return attention.paged_mixed_attention(
            query, kv_cache, metadata.block_tables, metadata.seq_lens, num_decode,
            metadata.prefill_query_start_loc, scale, sliding_window, **scales,
        )
    return attention.paged_prefill_attention(
        query, kv_cache, metadata.block_tables, metadata.query_start_loc, metadata.seq_lens,
        scale, sliding_window, **scales,
    )


def _all_single_token(query: torch.Tensor, metadata: PagedAttentionMetadata) -> bool:
    # As many tokens as sequences (tensor shapes, padded rows included) and no sequence with
    # more than one: then every sequence has exactly one.
    return query.shape[0] == metadata.seq_lens.shape[0] and metadata.max_query_len <= 1


def fp8_linear(
    x: torch.Tensor,  # (T, K); E4M3 with x_scale
    weight: torch.Tensor,  # (N, K) E4M3
    weight_scale: torch.Tensor,  # (N,) float32
    input_scale: torch.Tensor | None,  # (1,) float32 static scale; None: per token
    bias: torch.Tensor | None,
    *,
    x_scale: torch.Tensor | None = None,  # (T, 1) float32: x is quantised already
    out_dtype: torch.dtype | None = None,  # with x_scale: the dtype x was quantised from
) -> torch.Tensor:  # (T, N)
    """W8A8 FP8. On CUDA: up to 16 rows on Hopper the swap-AB tensor-core GEMM
    (skinny_fp8.py; elsewhere quant_linear's kernel, which quantises x in registers); more
    rows quantise x per token (Triton) and multiply with torch._scaled_mm.
    With x_scale, x comes quantised by the kernel that produced it (kernels/fused_quant.py)
    and neither path quantises: the GEMM reads E4M3 x, _scaled_mm takes it as it is."""
    prequantized = x_scale is not None
    dtype = out_dtype if prequantized else x.dtype  # y's
    if not (_fast(x) and x.dim() == 2 and dtype == torch.bfloat16):
        if prequantized:
            return quant_linear.fp8_linear_prequantized_reference(x, x_scale, weight,
                                                                  weight_scale, bias, out_dtype)
        return quant_linear.fp8_linear_reference(x, weight, weight_scale, input_scale, bias)
    if prequantized:
        input_scale = None  # the producer applied it (static) or computed x_scale (dynamic)
    else:
        x = x.contiguous()
    # One row on the CUDA cores, two weights a packed float16 FMA (kernels/int_gemv.py), for
    # the A/B against skinny_fp8 (KILN_FP8_GEMV=1; off: no faster end to end on the H100).
    if x.shape[0] == 1 and env_flag("KILN_FP8_GEMV", default=False):
        x_q, scale = ((x, x_scale) if prequantized
                      else quant_linear.quantize_fp8_per_token(x, input_scale))
        if int_gemv.fp8_gemv_unsupported_reason(x_q, scale, weight, weight_scale) is None:
            return int_gemv.launch_fp8_gemv(x_q, scale, weight, weight_scale, bias, dtype)
    if _skinny_fp8_shapes(x, weight):
        return skinny_fp8.skinny_fp8_linear(x, weight, weight_scale, input_scale, bias,
                                            x_scale=x_scale, out_dtype=out_dtype)
    if x.shape[0] <= quant_linear.MAX_GEMV_ROWS or not _scaled_mm_shapes(x, weight):
        return quant_linear.quant_linear(x, quant_linear.KIND_FP8, weight, weight_scale, None,
                                         input_scale, bias, x_scale=x_scale, out_dtype=out_dtype)
    if not prequantized:
        x, x_scale = quant_linear.quantize_fp8_per_token(x, input_scale)
    y = torch._scaled_mm(x, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                         out_dtype=dtype)
    return y if bias is None else y + bias


def _skinny_fp8_shapes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Decode rows (≤ 16) on Hopper: the tensor-core skinny GEMM (kernels/skinny_fp8.py,
    wgmma: sm_90); Ada, or KILN_FP8_SKINNY=0 (the A/B switch), keeps quant_linear's CUDA-core
    path. H200, random Llama-3.1-8B fp8, batch 1: 176.5 → 264.3 tok/s (BENCHMARKS.md)."""
    return (x.shape[0] <= skinny_fp8.MAX_TOKENS and env_flag("KILN_FP8_SKINNY", default=True)
            and x.shape[1] % skinny_fp8.MIN_BLOCK_K == 0 and weight.is_contiguous()
            and has_sm90(x))


def _scaled_mm_shapes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0


def _weight_only(x: torch.Tensor, kind: int, weight: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, bias: torch.Tensor | None,
                 integer_zeros: bool = False) -> torch.Tensor:
    x = x.contiguous()
    rows = x.shape[0]
    if batch_invariant() and rows <= BATCH_INVARIANT_ROWS:
        return _weight_only_batch_invariant(x, kind, weight, scale, zero, bias, integer_zeros)
    # Decode int4 of 2-16 rows (groups of 128k, integer zero points) goes to the tensor
    # cores, unpacked by LOP3 (kernels/skinny_int4.py and its Gluon twin: 3-8x quant_linear's
    # kernel on the H200); one row too where the Gluon twin beat int_gemv (large matrices on
    # sm_90, skinny_int4.takes_batch1). KILN_SKINNY_INT4=0 (the A/B switch) keeps the
    # kernels below.
    if (kind == quant_linear.KIND_INT4 and integer_zeros and rows <= skinny_int4.max_rows(x)
            and env_flag("KILN_SKINNY_INT4", default=True)
            and (rows > 1 or skinny_int4.takes_batch1(x, weight.shape[0], x.shape[1]))
            and skinny_int4.skinny_int4_unsupported_reason(x, weight, scale, zero) is None):
        return skinny_int4.launch_skinny_int4(x, weight, scale, zero, bias)
    # Decode int8 of 2-16 rows goes to the tensor cores (kernels/skinny_int8.py: skinny_fp8's
    # GEMM with int8 weights, or its Gluon twin on sm_90, which also takes group scales and
    # 17-64 rows), one row too where the Gluon twin beat int_gemv (long rows,
    # skinny_int8.takes_batch1); KILN_SKINNY_INT8=0 (the A/B switch) keeps the kernels below.
    if (kind == quant_linear.KIND_INT8 and rows <= skinny_int8.max_rows(x, weight)
            and (rows > 1 or skinny_int8.takes_batch1(x, weight, scale))
            and env_flag("KILN_SKINNY_INT8", default=True)
            and skinny_int8.takes(x, weight, scale, bias)):
        return skinny_int8.launch_skinny_int8(x, weight, scale, bias)
    # Up to 128 rows the skinny kernels did not take (65-128: short prefills, mixed steps; or
    # 17-64 where a Gluon twin does not run): one GEMM reading the int8 / int4 weights once
    # (kernels/int_gemm.py; int4 only where measured faster) instead of dequantising all of
    # them; KILN_INT_GEMM=0 keeps the dequantise path. One row stays on int_gemv, 2-16 on
    # quant_linear, below.
    int4 = kind == quant_linear.KIND_INT4
    gemm_zero = zero if int4 else None
    if rows > quant_linear.MAX_GEMV_ROWS and (not int4 or integer_zeros):
        config = int_gemm.chosen_config(x, weight, scale, gemm_zero, bias)
        if config is not None:
            return int_gemm.launch_int_gemm(x, weight, scale, gemm_zero, bias, config=config)
    # Batch 1 unpacks int weights with bit operations (kernels/int_gemv.py) instead of
    # conversions; KILN_INT_GEMV=0 (the A/B switch) keeps quant_linear's kernel.
    if (rows == 1 and env_flag("KILN_INT_GEMV", default=True)
            and int_gemv.int_gemv_unsupported_reason(x, weight, scale, zero is not None) is None):
        return int_gemv.launch_int_gemv(x, weight, scale, zero, bias)
    if rows <= quant_linear.MAX_GEMV_ROWS:
        return quant_linear.quant_linear(x, kind, weight, scale, zero, bias=bias)
    # Above 16 rows, dequantise to x's dtype and multiply on cuBLAS. H200, Llama-3.1-8B
    # shapes, one call (results/s18-h200-dequantize-bench.json): a layer's four int8 linears
    # took 67 / 60 / 42 % of quant_linear's Triton GEMM time at 32 / 128 / 512 rows (only
    # gate|up at 32 rows was faster there: 89 vs 150 µs); the dequantise kernel streams at
    # 3.2-4.2 TB/s.
    dense = quant_linear.dequantize(kind, weight, scale, zero, x.dtype)
    return torch.nn.functional.linear(x, dense, bias)


# Rows that KILN_BATCH_INVARIANT=1 computes on one fixed tiling whatever their count (the
# decode and verify steps': gemv.MAX_ROWS for bf16, the skinny kernels' 16 token columns).
BATCH_INVARIANT_ROWS = 16


def _weight_only_batch_invariant(x: torch.Tensor, kind: int, weight: torch.Tensor,
                                 scale: torch.Tensor, zero: torch.Tensor | None,
                                 bias: torch.Tensor | None, integer_zeros: bool) -> torch.Tensor:
    """KILN_BATCH_INVARIANT=1, 1-16 rows: every row count on the same kernel and tiling (16
    token columns, the K split of 16 rows), so a row's bits do not depend on the other rows
    of its step (a verify step's rows equal the batch-1 steps'): the skinny tensor-core kernels
    where they take the linear, else quant_linear's kernel at its 16-row tiling for one row
    too (never int_gemv, which only takes one)."""
    n, k = weight.shape[0], x.shape[1]
    if (kind == quant_linear.KIND_INT4 and integer_zeros
            and skinny_int4.skinny_int4_unsupported_reason(x, weight, scale, zero) is None):
        config = skinny_int4.default_skinny_int4_config(BATCH_INVARIANT_ROWS, n, k,
                                                        skinny_int4.gluon_usable(x))
        return skinny_int4.launch_skinny_int4(x, weight, scale, zero, bias, config=config)
    if kind == quant_linear.KIND_INT8 and skinny_int8.takes(x, weight, scale, bias):
        config = skinny_int8.batch_invariant_config(x, weight, scale)
        return skinny_int8.skinny_int8_linear(x, weight, scale, bias, config=config)
    config = quant_linear.default_quant_config(BATCH_INVARIANT_ROWS, n)  # one row too
    return quant_linear.quant_linear(x, kind, weight, scale, zero, bias=bias, config=config)


def int8_weight_only_linear(
    x: torch.Tensor,  # (T, K)
    weight: torch.Tensor,  # (N, K) int8
    scale: torch.Tensor,  # (N, K / G) float16
    bias: torch.Tensor | None,
) -> torch.Tensor:  # (T, N)
    if _fast(x) and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16):
        return _weight_only(x, quant_linear.KIND_INT8, weight, scale, None, bias)
    w = quant_linear.dequantize_int8(weight, scale)
    return quant_linear.weight_only_linear_reference(x, w, bias)


def int4_weight_only_linear(
    x: torch.Tensor,  # (T, K)
    qweight: torch.Tensor,  # (N, K / 2) uint8
    scale: torch.Tensor,  # (N, K / G) float16
    zero: torch.Tensor,  # (N, K / G) float16
    bias: torch.Tensor | None,
    *,
    integer_zeros: bool = False,  # every zero point a whole number (the caller checked once)
) -> torch.Tensor:  # (T, N)
    if _fast(x) and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16):
        return _weight_only(x, quant_linear.KIND_INT4, qweight, scale, zero, bias,
                            integer_zeros)
    w = quant_linear.dequantize_int4(qweight, scale, zero)
    return quant_linear.weight_only_linear_reference(x, w, bias)
