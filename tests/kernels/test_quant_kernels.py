"""The quantised-linear Triton kernel (fp8 W8A8, int8 and int4 weight-only), the per-token FP8
activation quantiser and the FP8 KV cache paths of the cache-write, RoPE and attention
kernels, each against its torch reference (CPU interpreter here; the GPU at real shapes in
tests/gpu/test_quant_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl

from kiln.kernels import attention, ops, quant_linear, rope as rope_kernels
from kiln.kernels.quant_linear import (
    KIND_FP8,
    KIND_INT4,
    KIND_INT8,
    QuantGemmConfig,
    dequantize_int4,
    dequantize_int8,
    fp8_linear_reference,
    quantize_fp8_per_token_reference,
    weight_only_linear_reference,
)
from kiln.quant.quantize import quantize_fp8_per_channel, quantize_int4, quantize_int8
from tests.kernels.kernel_helpers import (
    attention_tolerance,
    make_paged_batch,
    reference_attention,
    with_decode_split,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
FP8 = torch.float8_e4m3fn

# M = 1 (the CUDA-core GEMV), 5 (tl.dot, M padded to 16), 37 (GEMM tiles over M, here small
# ones so the interpreter's grid stays small); N = 48 leaves a partial column block.
ROWS = [1, 5, 37]
SMALL_GEMM = QuantGemmConfig(16, 32, 64, 4)


def _config(m: int) -> QuantGemmConfig | None:
    return SMALL_GEMM if m > 16 else None


def _inputs(m: int, n: int = 48, k: int = 256, dtype=torch.bfloat16, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype).to(device)
    weight = torch.randn(n, k, generator=generator) * 0.05
    bias = (torch.randn(n, generator=generator) * 0.1).to(dtype).to(device)
    return x, weight, bias


def _assert_close_to(out: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """Largest difference within `relative` of the output's scale (the two round their bf16
    outputs, and the fp8 cases their E4M3 activations, independently)."""
    difference = (out.float() - expected.float()).abs().max().item()
    assert difference <= relative * expected.float().abs().max().item(), difference


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group_size", [-1, 16, 64])  # 16: GGUF Q6_K
def test_int8_kernel_matches_reference(m, group_size, device, poison_outputs):
    x, weight, bias = _inputs(m, device=device)
    q, scale = quantize_int8(weight, weight.shape[1] if group_size == -1 else group_size)
    q, scale = q.to(device), scale.to(device)
    out = quant_linear.quant_linear(x, KIND_INT8, q, scale, bias=bias, config=_config(m))
    expected = weight_only_linear_reference(x, dequantize_int8(q, scale), bias)
    _assert_close_to(out, expected, 2**-7)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group_size,zero_point", [(64, True), (128, False), (256, True)])
def test_int4_kernel_matches_reference(m, group_size, zero_point, device, poison_outputs):
    x, weight, bias = _inputs(m, device=device, seed=1)
    packed, scale, zero = (t.to(device) for t in quantize_int4(weight, group_size, zero_point))
    out = quant_linear.quant_linear(x, KIND_INT4, packed, scale, zero, bias=bias,
                                    config=_config(m))
    expected = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero), bias)
    _assert_close_to(out, expected, 2**-7)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("static", [False, True])
def test_fp8_kernel_matches_reference(m, static, device, poison_outputs):
    x, weight, bias = _inputs(m, device=device, seed=2)
    q, scale = (t.to(device) for t in quantize_fp8_per_channel(weight))
    input_scale = torch.tensor([0.02], device=device) if static else None
    out = quant_linear.quant_linear(x, KIND_FP8, q, scale, None, input_scale, bias,
                                    config=_config(m))
    expected = fp8_linear_reference(x, q, scale, input_scale, bias)
    # An activation on an E4M3 rounding tie may land one step apart (x / x_scale is
    # computed in another order), on top of the output's bf16 rounding.
    _assert_close_to(out, expected, 2**-5)


def test_per_token_fp8_quantisation_matches_reference(device):
    x, _, _ = _inputs(6, k=200, device=device, seed=3)
    x[2] = 0  # a row of zeros: scale clamps, q stays 0
    for static in (None, torch.tensor([0.01], device=device)):
        q, scale = quant_linear.quantize_fp8_per_token(x, static)
        q_ref, scale_ref = quantize_fp8_per_token_reference(x, static)
        torch.testing.assert_close(scale, scale_ref)
        step = q_ref.float().abs() * 2**-3 + 2**-9  # one E4M3 step (3 mantissa bits)
        assert ((q.float() - q_ref.float()).abs() <= step).all()


def test_quantised_weights_reconstruct_the_weight():
    _, weight, _ = _inputs(1, n=32, k=256, seed=4)
    q, scale = quantize_int8(weight, 256)
    assert (dequantize_int8(q, scale) - weight).abs().max() <= scale.float().max() / 2 + 1e-6
    packed, scale4, zero = quantize_int4(weight, 64)
    error = (dequantize_int4(packed, scale4, zero) - weight).abs().max()
    assert error <= scale4.float().max() / 2 + 1e-6
    q8, scale8 = quantize_fp8_per_channel(weight)
    relative = (q8.float() * scale8[:, None] - weight).abs() / weight.abs().clamp(min=1e-3)
    assert relative.max() <= 2**-4 + 1e-6  # E4M3: 3 mantissa bits, half a step


def test_kernel_rejects_a_group_that_leaves_no_tile(device):
    x, weight, _ = _inputs(1, k=96, device=device)
    q, scale = quantize_int8(weight, 96)
    q, scale = q.to(device), scale.to(device)
    out = quant_linear.quant_linear(x, KIND_INT8, q, scale)  # 96 = 32 · 3: tiles of 32
    torch.testing.assert_close(out.float(), weight_only_linear_reference(
        x, dequantize_int8(q, scale)).float(), atol=0.02, rtol=0.02)
    with pytest.raises(ValueError, match="power-of-2 tile"):
        bad = torch.zeros(48, 24, dtype=torch.int8, device=device)
        quant_linear.quant_linear(torch.zeros(1, 24, device=device), KIND_INT8, bad,
                                  torch.ones(48, 1, dtype=torch.float16, device=device))


# ---- FP8 KV cache ---------------------------------------------------------------------------

K_SCALE, V_SCALE = 0.5, 0.25


def _fp8_batch(q_lens, contexts, device, num_padding_rows=0, num_heads=4, block_size=16):
    batch = make_paged_batch(q_lens, contexts, num_heads, 2, 64, block_size, torch.bfloat16,
                             device, num_padding_rows=num_padding_rows)
    k_scale = torch.tensor(K_SCALE, device=device)
    v_scale = torch.tensor(V_SCALE, device=device)
    cache = batch.kv_cache.float()
    cache[0] /= K_SCALE
    cache[1] /= V_SCALE
    batch.kv_cache = attention.to_fp8_cache(cache)  # NaN slots stay NaN
    return batch, k_scale, v_scale


def _reference(batch, scale, k_scale, v_scale):
    return attention.paged_attention_reference(
        batch.query, batch.kv_cache, batch.block_tables, batch.query_start_loc_host,
        batch.seq_lens_host, scale, None, k_scale, v_scale)


@pytest.mark.parametrize("dot_mode", ["", "model", "fp16"])
def test_fp8_decode_attention_matches_reference(dot_mode, device, poison_outputs, monkeypatch):
    # Each way the decode kernel can turn E4M3 tiles into dot operands (KILN_FP8_KV_DOT; on
    # the CPU both keep float32 dots, and "fp16" its own tiling with V read as 16-bit words).
    monkeypatch.setenv("KILN_FP8_KV_DOT", dot_mode)
    batch, k_scale, v_scale = _fp8_batch([1, 1, 1, 1], [40, 7, 150, 127], device,
                                       num_padding_rows=1)  # 128 keys: whole tiles only
    out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                           batch.seq_lens, 0.125, num_splits=2,
                                           k_scale=k_scale, v_scale=v_scale)
    expected = _reference(batch, 0.125, k_scale, v_scale)
    torch.testing.assert_close(out, expected, **attention_tolerance(torch.bfloat16, out.device.type))


@pytest.mark.parametrize("window, block_size", [(50, 16), (70, 8), (300, 32), (None, 128)])
def test_fp8_decode_with_windows_and_block_sizes(window, block_size, device, poison_outputs):
    # V dims-major: key tiles start on multiples of the tile, so a window's start cuts the
    # first tile (masked); block sizes below, at and above the 64-key tile.
    batch, k_scale, v_scale = _fp8_batch([1, 1, 1], [300, 16, 555], device, num_padding_rows=1,
                                         num_heads=8, block_size=block_size)
    expected = attention.paged_attention_reference(
        batch.query, batch.kv_cache, batch.block_tables, batch.query_start_loc_host,
        batch.seq_lens_host, 0.125, window, k_scale, v_scale)
    for num_splits in (None, 4):
        out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                               batch.seq_lens, 0.125, window,
                                               num_splits=num_splits, k_scale=k_scale,
                                               v_scale=v_scale)
        torch.testing.assert_close(out, expected,
                                   **attention_tolerance(torch.bfloat16, out.device.type))


@pytest.mark.parametrize("window, block_size", [(None, 16), (50, 16), (300, 32), (None, 128)])
def test_fp8_decode_in_e4m3_dots_stays_within_e4m3_rounding(window, block_size, device,
                                                           poison_outputs, monkeypatch):
    # KILN_FP8_KV_DOT=e4m3's kernel (chosen only for 16-bit queries on a GPU; forced here):
    # the query and p rounded to E4M3 leave the output within a few % of the float32
    # reference, never exact (so the E4M3 path ran), with windows, splits and block sizes.
    monkeypatch.setattr(attention, "_decode_dot", lambda query, cache: (tl.float8e4nv, True))
    batch, k_scale, v_scale = _fp8_batch([1, 1, 1], [300, 16, 555], device, num_padding_rows=1,
                                         num_heads=8, block_size=block_size)
    expected = attention.paged_attention_reference(
        batch.query, batch.kv_cache, batch.block_tables, batch.query_start_loc_host,
        batch.seq_lens_host, 0.125, window, k_scale, v_scale)[:3].float()
    for num_splits in (None, 4):
        out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                               batch.seq_lens, 0.125, window,
                                               num_splits=num_splits, k_scale=k_scale,
                                               v_scale=v_scale)[:3].float()
        error = ((out - expected).norm() / expected.norm()).item()
        assert 1e-3 < error < 5e-2, (num_splits, error)


def test_fp8_decode_in_e4m3_dots_splits_the_query_so_peaked_attention_stays_close(
        device, poison_outputs, monkeypatch):
    # Scores 8x larger than above: each row's attention sits on a few keys, so the scores'
    # error (the query's rounding) dominates p's. The kernel's query is its E4M3 rounding
    # plus the rounding of the rest (two dots): 0.008 from the reference; rounded once, as
    # XQA does, it was 0.070 (measured here on this batch).
    monkeypatch.setattr(attention, "_decode_dot", lambda query, cache: (tl.float8e4nv, True))
    batch, k_scale, v_scale = _fp8_batch([1, 1, 1], [300, 16, 555], device, num_padding_rows=1,
                                         num_heads=8, block_size=32)
    batch.query.mul_(8)
    expected = _reference(batch, 0.125, k_scale, v_scale)[:3].float()
    out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                           batch.seq_lens, 0.125, k_scale=k_scale,
                                           v_scale=v_scale)[:3].float()
    error = ((out - expected).norm() / expected.norm()).item()
    assert 1e-3 < error < 2e-2, error


def test_value_view_refuses_a_non_contiguous_fp8_cache(device):
    # Its V is laid out per block (Hkv, D, block_size): a strided slice cannot be read as one.
    cache = attention.to_fp8_cache(torch.randn(2, 4, 16, 2, 8, device=device))
    assert attention.value_view(cache).shape == (4, 16, 2, 8)
    with pytest.raises(ValueError, match="an FP8 KV cache must be contiguous"):
        attention.value_view(cache[:, :, :8])


def test_fp8_decode_dot_mode_rejects_an_unknown_value(device, monkeypatch):
    monkeypatch.setenv("KILN_FP8_KV_DOT", "fp8")
    batch, k_scale, v_scale = _fp8_batch([1], [4], device)
    with pytest.raises(ValueError, match="KILN_FP8_KV_DOT must be one of fp16, model, e4m3 "
                                         r"\(or unset\); got 'fp8'"):
        attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                         batch.seq_lens, 0.125, k_scale=k_scale, v_scale=v_scale)


def test_fp8_prefill_and_mixed_attention_match_reference(device, poison_outputs):
    batch, k_scale, v_scale = _fp8_batch([1, 1, 20, 5], [30, 3, 10, 0], device)
    expected = _reference(batch, 0.125, k_scale, v_scale)
    out = attention.paged_prefill_attention(batch.query, batch.kv_cache, batch.block_tables,
                                            batch.query_start_loc, batch.seq_lens, 0.125,
                                            k_scale=k_scale, v_scale=v_scale)
    tolerance = attention_tolerance(torch.bfloat16, out.device.type)
    torch.testing.assert_close(out, expected, **tolerance)
    batch = with_decode_split(batch)
    out = ops.paged_attention(batch.query, batch.kv_cache, batch, 0.125, None, k_scale, v_scale) \
        if device == "cuda" else attention.paged_mixed_attention(
            batch.query, batch.kv_cache, batch.block_tables, batch.seq_lens,
            batch.num_decode_seqs, batch.prefill_query_start_loc, 0.125,
            k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, expected, **tolerance)


def _dequantised(cache: torch.Tensor) -> torch.Tensor:
    out = cache.float()
    out[0] *= K_SCALE
    out[1] *= V_SCALE
    return out


def test_fp8_cache_write_and_rope_write_match_reference(device):
    batch, k_scale, v_scale = _fp8_batch([3, 1, 4], [0, 5, 2], device, num_padding_rows=1)
    empty = torch.zeros_like(batch.kv_cache)
    fast, reference = empty.clone(), empty.clone()
    attention.write_kv_cache(batch.key, batch.value, fast, batch.slot_mapping, k_scale, v_scale)
    attention.write_kv_cache_reference(batch.key, batch.value, reference, batch.slot_mapping,
                                       k_scale, v_scale)
    # One E4M3 step apart at most (the interpreter's fp32 → fp8 cast rounds some ties up).
    step = _dequantised(reference).abs() * 2**-3 + 2**-9
    assert ((_dequantised(fast) - _dequantised(reference)).abs() <= step).all()

    cos_sin = torch.randn(256, 64, generator=torch.Generator().manual_seed(5)).to(device)
    fast, reference = empty.clone(), empty.clone()
    q_fast = rope_kernels.rope_and_write_kv_cache(batch.positions, batch.query, batch.key,
                                                  batch.value, cos_sin, fast, batch.slot_mapping,
                                                  k_scale, v_scale)
    q_ref = rope_kernels.rope_and_write_kv_cache_reference(
        batch.positions, batch.query, batch.key, batch.value, cos_sin, reference,
        batch.slot_mapping, k_scale, v_scale)
    torch.testing.assert_close(q_fast.float(), q_ref.float(), atol=1e-2, rtol=2**-7)
    step = _dequantised(reference).abs() * 2**-3 + 2**-7
    assert ((_dequantised(fast) - _dequantised(reference)).abs() <= step).all()
    assert _dequantised(reference).abs().sum() > 0  # something was written


def test_fp8_cache_writes_subtract_the_key_offset(device):
    # Keys with a large constant channel (as real models' keys have): the writes store
    # E4M3 of (k - k_offset) / k_scale, the Triton kernels as the reference, the values
    # untouched; the rope write with partial rotary too (the pass-through dims shift).
    batch, k_scale, v_scale = _fp8_batch([3, 1, 4], [0, 5, 2], device, num_padding_rows=1)
    generator = torch.Generator().manual_seed(7)
    offset = torch.randn(2, 64, generator=generator).to(device)
    key = batch.key.clone()
    key[:, :, 5] += 20.0  # the constant channel the offset removes
    offset[:, 5] += 20.0
    empty = torch.zeros_like(batch.kv_cache)
    plain, centred, fast = empty.clone(), empty.clone(), empty.clone()
    attention.write_kv_cache_reference(key, batch.value, plain, batch.slot_mapping, k_scale,
                                       v_scale)
    attention.write_kv_cache_reference(key, batch.value, centred, batch.slot_mapping, k_scale,
                                       v_scale, offset)
    attention.write_kv_cache(key, batch.value, fast, batch.slot_mapping, k_scale, v_scale, offset)
    valid = batch.slot_mapping >= 0
    flat = centred.view(2, -1, 2, 64)
    expected = ((key[valid].float() - offset) / K_SCALE).clamp(-448, 448).to(FP8)
    assert torch.equal(flat[0, batch.slot_mapping[valid]].float(), expected.float())
    assert torch.equal(centred[1].float(), plain[1].float())
    step = _dequantised(centred).abs() * 2**-3 + 2**-9
    assert ((_dequantised(fast) - _dequantised(centred)).abs() <= step).all()

    cos_sin = torch.randn(256, 48, generator=generator).to(device)  # rotary_dim 48 of 64
    fast, reference = empty.clone(), empty.clone()
    rope_kernels.rope_and_write_kv_cache(batch.positions, batch.query, key, batch.value, cos_sin,
                                         fast, batch.slot_mapping, k_scale, v_scale, offset)
    rope_kernels.rope_and_write_kv_cache_reference(batch.positions, batch.query, key, batch.value,
                                                   cos_sin, reference, batch.slot_mapping,
                                                   k_scale, v_scale, offset)
    step = _dequantised(reference).abs() * 2**-3 + 2**-7
    assert ((_dequantised(fast) - _dequantised(reference)).abs() <= step).all()
    assert not torch.equal(reference[0].float(), plain[0].float())
    with pytest.raises(ValueError, match=r"k_offset must be a contiguous float32 \(2, 64\)"):
        attention.write_kv_cache(key, batch.value, fast, batch.slot_mapping, k_scale, v_scale,
                                 offset[:1])


def test_centred_keys_give_the_same_attention_closer(device):
    # Softmax is unchanged when every key moves by one vector, so attention over a cache of
    # k - offset is attention over k; with a large constant channel, E4M3 of the centred keys
    # loses less of what varies, and the output is closer to the exact one.
    batch, _, v_scale = _fp8_batch([1, 1, 1], [40, 7, 150], device)
    exact = make_paged_batch([1, 1, 1], [40, 7, 150], 4, 2, 64, 16, torch.bfloat16, device)
    cache = exact.kv_cache.float()
    cache[0, ..., 3] += 30.0  # every key's channel 3: a constant part much larger than the rest
    exact_out = attention.paged_attention_reference(
        exact.query, cache, exact.block_tables, exact.query_start_loc_host, exact.seq_lens_host,
        0.125)
    offset = torch.zeros(2, 64, device=device)
    offset[:, 3] = 30.0
    errors = {}
    for name, k_offset in (("plain", None), ("centred", offset)):
        keys = cache[0] - (k_offset if k_offset is not None else 0.0)
        # (the batch's unwritten slots hold NaN: never read, kept out of the amax)
        k_scale = torch.tensor(float(keys.nan_to_num().abs().amax()) / 448, device=device)
        fp8 = cache.clone()
        fp8[0] = keys / k_scale
        fp8[1] = cache[1] / v_scale
        out = attention.paged_attention_reference(
            exact.query, attention.to_fp8_cache(fp8), exact.block_tables, exact.query_start_loc_host,
            exact.seq_lens_host, 0.125, None, k_scale, v_scale)
        errors[name] = float((out.float() - exact_out.float()).norm() / exact_out.float().norm())
    assert errors["centred"] < 0.6 * errors["plain"], errors  # (V's rounding is in both)


def test_fp8_cache_needs_its_scales(device):
    batch, _, _ = _fp8_batch([1], [4], device)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        attention.write_kv_cache(batch.key, batch.value, batch.kv_cache, batch.slot_mapping)


# ---- the dequantise kernel (int formats above their Triton GEMM's rows) ----------------------


@pytest.mark.parametrize("kind", [KIND_INT8, KIND_INT4])
@pytest.mark.parametrize("group", [16, 64, 512])  # 512: one group a row; 16: Q6_K
@pytest.mark.parametrize("block_n,block_k", [(32, 256), (16, 128), (64, 512)])
def test_dequantize_kernel_matches_reference(kind, group, block_n, block_k, device):
    # 40 rows: a partial tile of rows; K = 512: tiles of 128-512 columns, within a group or not
    _, weight, _ = _inputs(1, n=40, k=512, seed=8)
    if kind == KIND_INT8:
        tensors = [t.to(device) for t in quantize_int8(weight, group)] + [None]
        expected = dequantize_int8(*tensors[:2])
    else:
        tensors = [t.to(device) for t in quantize_int4(weight, group)]
        expected = dequantize_int4(*tensors)
    out = quant_linear.dequantize(kind, *tensors, torch.float32, block_n=block_n,
                                  block_k=block_k)
    torch.testing.assert_close(out, expected)
    # in bfloat16 (what the prefill path writes): the float32 value within a bfloat16 step
    # (the CPU interpreter truncates to bfloat16 where the GPU rounds)
    out = quant_linear.dequantize(kind, *tensors, torch.bfloat16, block_n=block_n,
                                  block_k=block_k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-7)
