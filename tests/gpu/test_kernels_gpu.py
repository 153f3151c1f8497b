"""Triton kernels against their torch references at real shapes, on the GPU.

Llama-3-8B attention geometry (32 query heads, 8 KV heads, head_dim 128), block size 16,
bf16, contexts up to 8192 tokens, batches of 1 to 64 — the shapes the fast paths are for.
Importable everywhere; tests/gpu/conftest.py skips it where CUDA is absent.
"""

from __future__ import annotations

import random

import pytest
import torch

from kiln.kernels import activation, attention, norm, ops, rope
from kiln.layers.rotary import RotaryEmbedding
from tests.kernels import kernel_helpers
from tests.kernels.kernel_helpers import (
    PagedBatch,
    make_paged_batch,
    reference_attention,
    tolerance,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5
MAX_CONTEXT = 8192


def attention_tolerance(dtype: torch.dtype) -> dict:
    return kernel_helpers.attention_tolerance(dtype, "cuda")  # why these bounds: see there


def _decode_batch(batch_size: int, dtype: torch.dtype, seed: int, num_padding_rows: int = 0):
    rng = random.Random(seed)
    contexts = [rng.randint(0, MAX_CONTEXT - 1) for _ in range(batch_size)]
    contexts[0] = MAX_CONTEXT - 1  # one sequence at the full context
    return make_paged_batch([1] * batch_size, contexts, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                            BLOCK_SIZE, dtype, "cuda", num_padding_rows=num_padding_rows,
                            seed=seed)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
@pytest.mark.parametrize("window", [None, 4096])
def test_decode_attention(batch_size, window):
    batch = _decode_batch(batch_size, torch.bfloat16, seed=batch_size, num_padding_rows=3)
    out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                           batch.seq_lens, SCALE, window)
    expected = reference_attention(batch, SCALE, window)
    torch.testing.assert_close(out, expected, **attention_tolerance(torch.bfloat16))
    assert torch.all(out[-3:] == 0), "padding rows (seq_len 0) come out as zeros"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_attention_other_dtypes(dtype):
    batch = _decode_batch(16, dtype, seed=3)
    out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                           batch.seq_lens, SCALE)
    torch.testing.assert_close(out, reference_attention(batch, SCALE, None),
                               **attention_tolerance(dtype))


def test_decode_attention_replays_in_a_cuda_graph():
    """Captured once, replayed with other sequence lengths, block tables and queries written
    into the same buffers: the kernels read only device tensors, never host lists."""
    batch = _decode_batch(8, torch.bfloat16, seed=11)
    query = batch.query.clone()
    block_tables = batch.block_tables.clone()
    seq_lens = batch.seq_lens.clone()

    def run():
        return attention.paged_decode_attention(query, batch.kv_cache, block_tables, seq_lens,
                                                SCALE)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for replay in range(2):
        generator = torch.Generator(device="cuda").manual_seed(replay)
        order = torch.randperm(8, generator=torch.Generator().manual_seed(replay))
        # Shorter or equal lengths of the (permuted) sequences keep every read in written slots.
        lens = [max(1, batch.seq_lens_host[i] - 37 * (replay + 1) * j)
                for j, i in enumerate(order.tolist())]
        block_tables.copy_(batch.block_tables[order.cuda()])
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        query.copy_(torch.randn(query.shape, generator=generator, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected = attention.paged_attention_reference(
            query, batch.kv_cache, block_tables, list(range(9)), lens, SCALE)
        torch.testing.assert_close(out, expected, **attention_tolerance(torch.bfloat16))


PREFILL_MIXES = {
    # q_lens, contexts
    "one-prompt": ([4096], [0]),
    "chunk-after-long-prefix": ([512], [7680]),
    "mixed": ([2048, 1, 1, 513, 64, 1000, 1], [0, 8191, 100, 3000, 0, 7000, 0]),
    "many-small": ([17] * 48 + [1] * 16, [100 * i for i in range(64)]),
}


@pytest.mark.parametrize("window", [None, 1024])
@pytest.mark.parametrize("mix", PREFILL_MIXES, ids=list(PREFILL_MIXES))
def test_prefill_attention(mix, window):
    q_lens, contexts = PREFILL_MIXES[mix]
    batch = make_paged_batch(q_lens, contexts, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                             torch.bfloat16, "cuda")
    out = attention.paged_prefill_attention(batch.query, batch.kv_cache, batch.block_tables,
                                            batch.query_start_loc, batch.seq_lens, SCALE, window)
    torch.testing.assert_close(out, reference_attention(batch, SCALE, window),
                               **attention_tolerance(torch.bfloat16))


def test_prefill_attention_float32():
    batch = make_paged_batch([300, 1, 77], [1000, 50, 0], NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                             BLOCK_SIZE, torch.float32, "cuda")
    out = attention.paged_prefill_attention(batch.query, batch.kv_cache, batch.block_tables,
                                            batch.query_start_loc, batch.seq_lens, SCALE)
    torch.testing.assert_close(out, reference_attention(batch, SCALE, None),
                               **attention_tolerance(torch.float32))


def _spy(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 5, 1]], ids=["decode", "mixed"])
def test_ops_dispatch(q_lens, monkeypatch):
    batch = make_paged_batch(q_lens, [300, 20, 4000], NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                             BLOCK_SIZE, torch.bfloat16, "cuda")
    decode = _spy(monkeypatch, attention, "paged_decode_attention")
    prefill = _spy(monkeypatch, attention, "paged_prefill_attention")
    out = ops.paged_attention(batch.query, batch.kv_cache, batch, SCALE)
    assert (decode, prefill) == ((["paged_decode_attention"], []) if q_lens == [1, 1, 1]
                                 else ([], ["paged_prefill_attention"]))
    torch.testing.assert_close(out, reference_attention(batch, SCALE, None),
                               **attention_tolerance(torch.bfloat16))
    monkeypatch.setenv("KILN_REFERENCE_KERNELS", "1")
    forced = ops.paged_attention(batch.query, batch.kv_cache, batch, SCALE)
    assert len(decode) + len(prefill) == 1, "KILN_REFERENCE_KERNELS=1 runs the reference"
    torch.testing.assert_close(forced, reference_attention(batch, SCALE, None), atol=0, rtol=0)


def _with_fresh_cache(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    written = torch.full_like(batch.kv_cache, float("nan"))
    return written, written.clone()


def test_write_kv_cache():
    batch = make_paged_batch([2048, 1, 300], [0, 5000, 100], NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                             BLOCK_SIZE, torch.bfloat16, "cuda", num_padding_rows=5)
    written, expected = _with_fresh_cache(batch)
    attention.write_kv_cache(batch.key, batch.value, written, batch.slot_mapping)
    attention.write_kv_cache_reference(batch.key, batch.value, expected, batch.slot_mapping)
    assert torch.equal(written.isnan(), expected.isnan())
    assert torch.equal(written.nan_to_num(), expected.nan_to_num())


def _cos_sin() -> torch.Tensor:
    return RotaryEmbedding(HEAD_DIM, MAX_CONTEXT, 500000.0).cos_sin_cache.cuda()


def test_rope_and_write_kv_cache():
    batch = make_paged_batch([2048, 1, 300], [0, 5000, 100], NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                             BLOCK_SIZE, torch.bfloat16, "cuda", num_padding_rows=5)
    written, expected = _with_fresh_cache(batch)
    q_out = rope.rope_and_write_kv_cache(batch.positions, batch.query, batch.key, batch.value,
                                         _cos_sin(), written, batch.slot_mapping)
    q_expected = rope.rope_and_write_kv_cache_reference(
        batch.positions, batch.query, batch.key, batch.value, _cos_sin(), expected,
        batch.slot_mapping)
    # fp32 rotation on both sides; the GPU may fuse a multiply-add: 1 ulp after rounding.
    torch.testing.assert_close(q_out, q_expected, **tolerance(torch.bfloat16))
    assert torch.equal(written.isnan(), expected.isnan())
    torch.testing.assert_close(written.nan_to_num(), expected.nan_to_num(),
                               **tolerance(torch.bfloat16))


def test_rope_on_qkv_views():
    qkv = torch.randn(1000, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16,
                      device="cuda")
    query = qkv[:, : NUM_HEADS * HEAD_DIM].view(1000, NUM_HEADS, HEAD_DIM)
    key = qkv[:, NUM_HEADS * HEAD_DIM : (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM].view(
        1000, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, MAX_CONTEXT, (1000,), device="cuda")
    q_out, k_out = rope.rope(positions, query, key, _cos_sin())
    q_expected, k_expected = rope.rope_reference(positions, query, key, _cos_sin())
    torch.testing.assert_close(q_out, q_expected, **tolerance(torch.bfloat16))
    torch.testing.assert_close(k_out, k_expected, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("num_tokens", [1, 64, 8192])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(num_tokens, with_residual):
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, 4096, dtype=torch.bfloat16, device="cuda") * 3
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(4096, dtype=torch.bfloat16, device="cuda") * 0.1 + 1
    out, new_residual = norm.rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = norm.rms_norm_reference(x, weight, 1e-5, residual)
    if with_residual:  # both round the fp32 sum to nearest: identical
        assert torch.equal(new_residual, expected_residual)
    # Normalise (fp32 sums in another order), round, multiply by the weight, round: 2 ulps.
    torch.testing.assert_close(out, expected, **tolerance(torch.bfloat16, ulps=2))


def test_rms_norm_per_head_qk_norm():
    qkv = torch.randn(4096, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16,
                      device="cuda")
    query = qkv[:, : NUM_HEADS * HEAD_DIM].view(4096, NUM_HEADS, HEAD_DIM)
    weight = torch.randn(HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    out, _ = norm.rms_norm(query, weight, 1e-6)
    expected, _ = norm.rms_norm_reference(query, weight, 1e-6)
    torch.testing.assert_close(out, expected, **tolerance(torch.bfloat16, ulps=2))


@pytest.mark.parametrize("num_tokens", [1, 256])
def test_silu_and_mul(num_tokens):
    x = torch.randn(num_tokens, 2 * 14336, dtype=torch.bfloat16, device="cuda") * 4
    # silu rounded, then the product rounded; exp may differ in its last fp32 bit: 2 ulps.
    torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_reference(x),
                               **tolerance(torch.bfloat16, ulps=2))
