"""Paged attention and KV-cache write kernels against their torch references."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import attention, ops
from tests.kernels.kernel_helpers import (
    attention_tolerance,
    make_paged_batch,
    reference_attention,
    with_decode_split,
)

# The interpreter turns a loop bound loaded from memory into an int through a 1-element array,
# which numpy deprecates; nothing of ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# (dtype, num_heads, num_kv_heads, head_dim, block_size, sliding_window): GQA ratios 1, 2 and 4,
# block sizes below, at and above the 64-token key tile, windows narrower than one split and
# spanning several.
DECODE_CASES = [
    (torch.float32, 2, 2, 64, 16, None),
    (torch.bfloat16, 8, 2, 64, 16, 50),
    (torch.float16, 4, 2, 64, 8, None),
    (torch.bfloat16, 4, 2, 128, 32, 300),
    (torch.float32, 8, 2, 64, 128, 70),
]


def _case_id(dtype, num_heads, num_kv_heads, head_dim, block_size, window, *q_lens) -> str:
    name = f"{str(dtype)[6:]}-{num_heads}q{num_kv_heads}kv-d{head_dim}-bs{block_size}-w{window}"
    return name + (f"-q{q_lens[0]}" if q_lens else "")


def _compare(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out, expected, **attention_tolerance(dtype, out.device.type))


@pytest.mark.parametrize("num_splits", [None, 8], ids=["default-splits", "8-splits"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: _case_id(*c))
def test_decode_matches_reference(case, num_splits, device, poison_outputs):
    dtype, num_heads, num_kv_heads, head_dim, block_size, window = case
    # Contexts that end mid-block, fit one split and need several; one padding row (seq_len 0,
    # null block, slot -1) as a CUDA-graph batch has.
    batch = make_paged_batch([1, 1, 1], [300, 16, 555], num_heads, num_kv_heads, head_dim,
                             block_size, dtype, device, num_padding_rows=1)
    scale = head_dim**-0.5
    out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                           batch.seq_lens, scale, window, num_splits=num_splits)
    expected = reference_attention(batch, scale, window)
    _compare(out, expected, dtype)
    assert torch.all(out[-1] == 0), "a padding row (seq_len 0) attends to nothing: zeros"


def test_decode_with_one_split_writes_the_output_directly(device, poison_outputs):
    batch = make_paged_batch([1, 1, 1], [4, 30, 600], 8, 4, 64, 16, torch.bfloat16, device)
    out = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                           batch.seq_lens, 0.125, None, num_splits=1)
    _compare(out, reference_attention(batch, 0.125, None), torch.bfloat16)


def test_decode_num_splits_fills_the_gpu_in_powers_of_two(monkeypatch):
    monkeypatch.setattr(attention, "_multiprocessor_count", lambda device: 132)  # an H100
    cuda = torch.device("cuda")
    assert attention.decode_num_splits(1, 8, cuda) == 64  # 33 → 64: powers of 2 only
    assert attention.decode_num_splits(8, 8, cuda) == 8  # 5 → 8
    assert attention.decode_num_splits(33, 8, cuda) == 1  # no reduce from batch 33 up
    assert attention.decode_num_splits(1, 1, cuda) == attention.MAX_DECODE_SPLITS
    # Every batch size gets one of the split counts the graph capture sizes compile.
    from kiln.runtime.cuda_graphs import capture_sizes

    captured = {attention.decode_num_splits(n, 8, cuda) for n in capture_sizes(1024)}
    assert {attention.decode_num_splits(n, 8, cuda) for n in range(1, 1025)} <= captured


# (dtype, num_heads, num_kv_heads, head_dim, block_size, window, q_lens, contexts)
PREFILL_CASES = [
    # Fresh prompts, chunked-prefill continuations and decode rows mixed; query blocks of 64
    # split across sequences; a sequence with no new token.
    (torch.float32, 2, 2, 64, 16, None, [70, 1, 5, 0, 130], [0, 40, 100, 9, 20]),
    (torch.bfloat16, 8, 2, 64, 8, 32, [70, 1, 5, 130], [0, 40, 100, 20]),
    (torch.float16, 4, 2, 128, 32, None, [1, 64, 65, 1], [200, 0, 3, 0]),
    (torch.bfloat16, 4, 1, 64, 16, 1, [20, 1, 66], [0, 7, 30]),  # window 1: only itself
    (torch.float32, 8, 2, 64, 16, 100, [1, 1, 1, 1], [300, 16, 555, 0]),  # decode-only batch
    (torch.bfloat16, 4, 4, 64, 64, None, [128], [0]),  # exactly two query blocks
    # Long cached prefixes: key tiles every row sees whole (the unmasked loop) between the
    # window edge and the diagonal.
    (torch.bfloat16, 4, 2, 64, 16, 150, [130, 70], [200, 64]),
    (torch.float32, 2, 1, 64, 16, None, [100], [300]),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: _case_id(*c))
def test_prefill_matches_reference(case, device, poison_outputs):
    dtype, num_heads, num_kv_heads, head_dim, block_size, window, q_lens, contexts = case
    batch = make_paged_batch(q_lens, contexts, num_heads, num_kv_heads, head_dim, block_size,
                             dtype, device)
    scale = head_dim**-0.5
    out = attention.paged_prefill_attention(batch.query, batch.kv_cache, batch.block_tables,
                                            batch.query_start_loc, batch.seq_lens, scale, window)
    _compare(out, reference_attention(batch, scale, window), dtype)


# (dtype, num_heads, num_kv_heads, head_dim, block_size, window, q_lens, contexts): decode rows
# first (long and short contexts, one past a window), then prefill chunks with and without a
# cached prefix, one-token chunks among them; all-decode and no-decode edges.
MIXED_CASES = [
    (torch.float32, 4, 2, 64, 16, None, [1, 1, 1, 70, 5, 1, 130], [300, 16, 0, 0, 100, 9, 20]),
    (torch.bfloat16, 8, 2, 64, 8, 32, [1, 1, 70, 1], [555, 40, 20, 3]),
    (torch.float16, 4, 4, 128, 32, None, [1, 64], [200, 0]),
    (torch.bfloat16, 4, 1, 64, 16, None, [1, 1, 1], [30, 64, 2]),  # decode rows only
    (torch.float32, 2, 2, 64, 16, None, [20, 1], [0, 7]),  # no leading decode row
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: _case_id(*c))
def test_mixed_step_decode_rows_then_prefill_matches_reference(case, device, poison_outputs):
    dtype, num_heads, num_kv_heads, head_dim, block_size, window, q_lens, contexts = case
    batch = with_decode_split(make_paged_batch(q_lens, contexts, num_heads, num_kv_heads,
                                               head_dim, block_size, dtype, device))
    scale = head_dim**-0.5
    out = attention.paged_mixed_attention(
        batch.query, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.num_decode_seqs,
        batch.prefill_query_start_loc, scale, window)
    _compare(out, reference_attention(batch, scale, window), dtype)


def test_mixed_step_rejects_a_split_that_does_not_match_the_batch(device):
    batch = with_decode_split(make_paged_batch([1, 3], [4, 0], 2, 2, 64, 16, torch.float32,
                                               device))
    with pytest.raises(ValueError, match="num_decode_seqs 3 outside"):
        attention.paged_mixed_attention(batch.query, batch.kv_cache, batch.block_tables,
                                        batch.seq_lens, 3, batch.prefill_query_start_loc, 1.0)
    with pytest.raises(ValueError, match="prefill_query_start_loc has 3 entries; 2 expected"):
        attention.paged_mixed_attention(batch.query, batch.kv_cache, batch.block_tables,
                                        batch.seq_lens, 1, batch.query_start_loc, 1.0)


def test_attention_rejects_an_output_that_does_not_match_the_query(device):
    batch = make_paged_batch([1, 1], [4, 9], 2, 2, 64, 16, torch.float32, device)
    wrong_shape = torch.empty(3, 2, 64, device=device)
    with pytest.raises(ValueError, match=r"out \(3, 2, 64\) torch.float32 .* does not match the "
                                         r"query \(2, 2, 64\)"):
        attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                         batch.seq_lens, 1.0, out=wrong_shape)
    wrong_dtype = torch.empty(2, 2, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="torch.float16 .* does not match"):
        attention.paged_prefill_attention(batch.query, batch.kv_cache, batch.block_tables,
                                          batch.query_start_loc, batch.seq_lens, 1.0,
                                          out=wrong_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_matches_reference(dtype, device):
    batch = make_paged_batch([3, 1, 4], [0, 5, 2], 4, 2, 64, 8, dtype, device, num_padding_rows=2)
    written = torch.full_like(batch.kv_cache, float("nan"))  # untouched slots must stay NaN
    expected = written.clone()
    attention.write_kv_cache(batch.key, batch.value, written, batch.slot_mapping)
    attention.write_kv_cache_reference(batch.key, batch.value, expected, batch.slot_mapping)
    assert torch.equal(written.isnan(), expected.isnan())
    assert torch.equal(written.nan_to_num(), expected.nan_to_num())  # a copy: bit-exact


def test_write_kv_cache_takes_strided_views(device):
    # k and v as the layers pass them: column slices of one fused qkv projection.
    qkv = torch.randn(5, (4 + 2 + 2) * 64, device=device)
    key = qkv[:, 4 * 64 : 6 * 64].view(5, 2, 64)
    value = qkv[:, 6 * 64 :].view(5, 2, 64)
    slots = torch.tensor([0, 9, -1, 17, 3], device=device)
    written = torch.zeros(2, 4, 8, 2, 64, device=device)
    expected = written.clone()
    attention.write_kv_cache(key, value, written, slots)
    attention.write_kv_cache_reference(key, value, expected, slots)
    assert torch.equal(written, expected)


def test_attention_rejects_head_dims_the_kernels_cannot_tile(device):
    batch = make_paged_batch([1], [5], 2, 2, 48, 16, torch.float32, device)
    with pytest.raises(ValueError, match="power-of-2 head_dim"):
        attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                         batch.seq_lens, 1.0)


def test_ops_attention_runs_the_reference_off_cuda_and_picks_decode_only_for_one_token_each():
    batch = make_paged_batch([3, 1], [2, 6], 4, 2, 64, 8, torch.float32)
    out = ops.paged_attention(batch.query, batch.kv_cache, batch, 0.125, None)
    torch.testing.assert_close(out, reference_attention(batch, 0.125, None), atol=0, rtol=0)
    assert not ops._all_single_token(batch.query, batch)
    decode = make_paged_batch([1, 1], [2, 6], 4, 2, 64, 8, torch.float32)
    assert ops._all_single_token(decode.query, decode)


def test_reference_switch_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("KILN_REFERENCE_KERNELS", "1")
    assert ops.use_reference_kernels()
    monkeypatch.setenv("KILN_REFERENCE_KERNELS", "0")
    assert not ops.use_reference_kernels()
