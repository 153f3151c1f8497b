"""Quantised linear kernels at Llama-3.1-8B shapes on the GPU against their torch references
(fp8 W8A8 through the Triton GEMV and torch._scaled_mm, int8/int4 weight-only through the
Triton kernel), CUDA-graph replay of each, and the FP8 KV cache in decode attention.
Importable everywhere; tests/gpu/conftest.py skips it where CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import attention, ops, quant_linear
from kiln.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    fp8_linear_reference,
    weight_only_linear_reference,
)
from kiln.quant.quantize import quantize_fp8_per_channel, quantize_int4, quantize_int8

# (N, K): o, gate|up halves, down, q|k|v.
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]
# int4 / int8: 17-64 on the Gluon kernels, 65-128 on int_gemm, more dequantised
ROWS = [1, 4, 16, 17, 32, 48, 64, 96, 128, 512, 4096]


@pytest.fixture(autouse=True)
def exact_fp32_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def quantised():
    cache = {}

    def get(scheme: str, n: int, k: int):
        key = (scheme, n, k)
        if key not in cache:
            generator = torch.Generator(device="cuda").manual_seed(n + k)
            weight = torch.randn(n, k, device="cuda", generator=generator) * 0.02
            if scheme == "fp8":
                cache[key] = quantize_fp8_per_channel(weight)
            elif scheme == "int8":
                cache[key] = quantize_int8(weight, k)
            elif scheme == "int8_g32":  # GGUF Q8_0's groups
                cache[key] = quantize_int8(weight, 32)
            elif scheme == "int8_g16":  # GGUF Q6_K's groups (skinny_int8 refuses them)
                cache[key] = quantize_int8(weight, 16)
            else:
                cache[key] = quantize_int4(weight, 128)
        return cache[key]

    return get


def _x(m: int, k: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(m)
    return torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)


def _relative(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_fp8_linear_matches_reference(quantised, n, k, m):
    weight, scale = quantised("fp8", n, k)
    x = _x(m, k)
    out = ops.fp8_linear(x, weight, scale, None, None)
    expected = fp8_linear_reference(x, weight, scale)
    # bf16 output rounding (and, at M > 16, _scaled_mm's own accumulation order).
    assert _relative(out, expected) < 5e-3


@pytest.mark.parametrize("scheme", ["int8", "int8_g32", "int8_g16", "int4"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_weight_only_linear_matches_reference(quantised, scheme, n, k, m):
    x = _x(m, k)
    if scheme.startswith("int8"):
        weight, scale = quantised(scheme, n, k)
        out = ops.int8_weight_only_linear(x, weight, scale, None)
        dequantised = dequantize_int8(weight, scale)
    else:
        packed, scale, zero = quantised("int4", n, k)
        # integer_zeros: 2-16 rows on the tensor-core kernel (kernels/skinny_int4.py)
        out = ops.int4_weight_only_linear(x, packed, scale, zero, None, integer_zeros=True)
        dequantised = dequantize_int4(packed, scale, zero)
    expected = weight_only_linear_reference(x, dequantised)
    # M > 1 rounds the dequantised weight to bf16 for tl.dot: a bf16 ulp per weight.
    assert _relative(out, expected) < 5e-3


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("m", [1, 2, 16, 17, 64, 65, 128])
def test_grouped_int8_where_the_gluon_twin_does_not_run(group, m):
    """SmolLM2's shapes (K = 576 and 1,536 against N = 1,536 and 576): K = 576 is not a
    multiple of 128, so its grouped int8 linears take the Triton kernels (skinny_int8 at 2-16
    rows, int_gemm at 17-128) rather than the Gluon twin."""
    for n, k in ((1536, 576), (576, 1536)):
        generator = torch.Generator(device="cuda").manual_seed(n + m)
        weight, scale = quantize_int8(
            torch.randn(n, k, device="cuda", generator=generator) * 0.02, group)
        x = _x(m, k)
        out = ops.int8_weight_only_linear(x, weight, scale, None)
        expected = weight_only_linear_reference(x, dequantize_int8(weight, scale))
        assert _relative(out, expected) < 5e-3, (n, k)


def test_static_fp8_and_per_token_quantiser(quantised):
    weight, scale = quantised("fp8", 4096, 4096)
    for m in (1, 64):
        x = _x(m, 4096)
        static = torch.tensor([0.02], device="cuda")
        assert _relative(ops.fp8_linear(x, weight, scale, static, None),
                         fp8_linear_reference(x, weight, scale, static)) < 5e-3
    q, x_scale = quant_linear.quantize_fp8_per_token(x)
    q_ref, scale_ref = quant_linear.quantize_fp8_per_token_reference(x)
    torch.testing.assert_close(x_scale, scale_ref)
    assert (q.float() == q_ref.float()).float().mean() > 0.999  # rounding ties aside


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int8_g32", "int8_g16", "int4"])
# 24, 48: _scaled_mm, the Gluon int4 / int8 kernels; 96: int_gemm (fp8: _scaled_mm)
@pytest.mark.parametrize("rows", [4, 24, 48, 96])
def test_quantised_linear_replays_in_a_cuda_graph(quantised, scheme, rows):
    tensors = quantised(scheme, 4096, 4096)
    x = torch.zeros(rows, 4096, device="cuda", dtype=torch.bfloat16)

    def run():
        if scheme == "fp8":
            return ops.fp8_linear(x, *tensors, None, None)
        if scheme.startswith("int8"):
            return ops.int8_weight_only_linear(x, *tensors, None)
        return ops.int4_weight_only_linear(x, *tensors, None, integer_zeros=True)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(_x(rows, 4096))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, run())


def _fp8_kv_batch_at_8b_shapes(block_size: int = 16):
    from tests.kernels.kernel_helpers import make_paged_batch

    batch = make_paged_batch([1] * 8, [300, 2000, 17, 900, 4000, 64, 1, 1500], 32, 8, 128,
                             block_size, torch.bfloat16, "cuda")
    k_scale = torch.tensor(0.05, device="cuda")
    v_scale = torch.tensor(0.04, device="cuda")
    cache = batch.kv_cache.float()
    cache[0] /= k_scale
    cache[1] /= v_scale
    return batch, attention.to_fp8_cache(cache), k_scale, v_scale


def _fp8_decode_and_reference(batch, cache, k_scale, v_scale, window=None):
    out = attention.paged_decode_attention(batch.query, cache, batch.block_tables,
                                           batch.seq_lens, 0.088, window, k_scale=k_scale,
                                           v_scale=v_scale)
    expected = attention.paged_attention_reference(
        batch.query, cache, batch.block_tables, batch.query_start_loc_host, batch.seq_lens_host,
        0.088, window, k_scale, v_scale)
    return out, expected


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dot_mode", ["model", "fp16"])
def test_fp8_kv_cache_decode_attention_at_8b_shapes(dot_mode, block_size, monkeypatch):
    monkeypatch.setenv("KILN_FP8_KV_DOT", dot_mode)
    out, expected = _fp8_decode_and_reference(*_fp8_kv_batch_at_8b_shapes(block_size))
    assert _relative(out, expected) < 1e-2


@pytest.mark.parametrize("block_size,window", [(16, None), (32, None), (64, None), (32, 1000)])
def test_fp8_kv_cache_e4m3_dots_stay_within_e4m3_precision_at_8b_shapes(block_size, window,
                                                                       monkeypatch):
    # E4M3 dots (the query and p rounded to E4M3, wgmma on sm_90): within E4M3's rounding of
    # the float32 reference, and no closer than the float16 dots (so the E4M3 kernel ran).
    batch, cache, k_scale, v_scale = _fp8_kv_batch_at_8b_shapes(block_size)
    monkeypatch.setenv("KILN_FP8_KV_DOT", "fp16")
    fp16, expected = _fp8_decode_and_reference(batch, cache, k_scale, v_scale, window)
    monkeypatch.setenv("KILN_FP8_KV_DOT", "e4m3")
    e4m3, _ = _fp8_decode_and_reference(batch, cache, k_scale, v_scale, window)
    assert torch.isfinite(e4m3).all()
    assert _relative(e4m3, expected) < 4e-2
    assert _relative(e4m3, expected) > _relative(fp16, expected)


def test_fp8_kv_cache_float16_dots_saturate_a_query_past_float16s_range(monkeypatch):
    # A bfloat16 query of 1e5 (past float16's 65,504) in the default float16 dots: its head
    # still gets a finite output (the query saturates, not inf), every other head the
    # reference's.
    monkeypatch.delenv("KILN_FP8_KV_DOT", raising=False)
    batch, cache, k_scale, v_scale = _fp8_kv_batch_at_8b_shapes()
    batch.query[0, 0] = 1e5
    out, expected = _fp8_decode_and_reference(batch, cache, k_scale, v_scale)
    assert torch.isfinite(out).all()
    assert _relative(out[1:], expected[1:]) < 1e-2
    assert _relative(out[0, 1:], expected[0, 1:]) < 1e-2


def test_fp8_cache_writes_centre_keys_at_8b_shapes():
    # The RoPE + cache write and the plain cache write subtract the key offset like their
    # references (one E4M3 step apart at most), at 8 KV heads x 128, bf16 inputs.
    from kiln.kernels import rope
    from tests.kernels.kernel_helpers import make_paged_batch

    batch = make_paged_batch([5, 1, 30], [0, 40, 9], 32, 8, 128, 16, torch.bfloat16, "cuda")
    generator = torch.Generator(device="cuda").manual_seed(3)
    offset = torch.randn(8, 128, device="cuda", generator=generator) * 4
    k_scale = torch.tensor(0.05, device="cuda")
    v_scale = torch.tensor(0.04, device="cuda")
    cache = torch.zeros_like(batch.kv_cache, dtype=torch.float8_e4m3fn)
    cos_sin = torch.randn(4096, 128, device="cuda", generator=generator)
    for write in ("plain", "rope"):
        fast, reference = cache.clone(), cache.clone()
        if write == "plain":
            attention.write_kv_cache(batch.key, batch.value, fast, batch.slot_mapping, k_scale,
                                     v_scale, offset)
            attention.write_kv_cache_reference(batch.key, batch.value, reference,
                                               batch.slot_mapping, k_scale, v_scale, offset)
        else:
            rope.rope_and_write_kv_cache(batch.positions, batch.query, batch.key, batch.value,
                                         cos_sin, fast, batch.slot_mapping, k_scale, v_scale,
                                         offset)
            rope.rope_and_write_kv_cache_reference(batch.positions, batch.query, batch.key,
                                                   batch.value, cos_sin, reference,
                                                   batch.slot_mapping, k_scale, v_scale, offset)
        # Compared as the keys and values they stand for: one E4M3 step of the stored value,
        # plus one bf16 step of the key before centring (the kernel's and torch's fp32
        # rotations can round it to neighbouring bf16 values).
        scales = torch.stack([k_scale, v_scale]).view(2, 1, 1, 1, 1)
        shift = torch.stack([offset, torch.zeros_like(offset)]).view(2, 1, 1, 8, 128)
        stored = reference.float()
        keys_fast = fast.float() * scales + shift
        keys_reference = stored * scales + shift
        tolerance = stored.abs() * scales * 2**-3 + keys_reference.abs() * 2**-7 + 1e-3
        assert ((keys_fast - keys_reference).abs() <= tolerance).all(), write
        assert stored.abs().sum() > 0
