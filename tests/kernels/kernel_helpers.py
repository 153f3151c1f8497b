"""Shared by the kernel tests (CPU interpreter and GPU): comparison tolerances, random
weight-only linear inputs, and a random ragged batch over a paged KV cache.

In that batch every cache slot that holds no token of a sequence is NaN: a kernel that reads
past a sequence's end, or outside its block table, turns its output NaN instead of passing by
luck.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kiln.kernels.attention import paged_attention_reference


@dataclass
class PagedBatch:
    """The tensors of one forward pass; also usable as the kernels' PagedAttentionMetadata."""

    query: torch.Tensor  # (T, Hq, D)
    key: torch.Tensor  # (T, Hkv, D) this step's new keys; the cache already holds them
    value: torch.Tensor  # (T, Hkv, D)
    kv_cache: torch.Tensor  # (2, num_blocks, block_size, Hkv, D); block 0 is the null block
    block_tables: torch.Tensor  # (S, max_blocks) int32
    query_start_loc: torch.Tensor  # (S+1,) int32
    seq_lens: torch.Tensor  # (S,) int32
    slot_mapping: torch.Tensor  # (T,) int64, -1 for padding rows
    positions: torch.Tensor  # (T,) int64
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    num_decode_seqs: int = 0  # set by with_decode_split: a mixed batch ordered decode-first
    prefill_query_start_loc: torch.Tensor | None = None


def with_decode_split(batch: PagedBatch) -> PagedBatch:
    """The batch as the runner hands a mixed step to attention: its leading one-token rows
    marked as decode rows, the rest's query_start_loc rebased to start at 0."""
    q_lens = [b - a for a, b in zip(batch.query_start_loc_host, batch.query_start_loc_host[1:])]
    num_decode = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    batch.num_decode_seqs = num_decode
    batch.prefill_query_start_loc = batch.query_start_loc[num_decode:] - num_decode
    return batch


def make_paged_batch(
    q_lens: list[int],
    contexts: list[int],  # tokens cached before this step's, per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    num_padding_rows: int = 0,  # CUDA-graph padding: 1 token, seq_len 0, null block, slot -1
    spare_block_columns: int = 2,  # block table wider than needed, like a persistent one
    seed: int = 0,
) -> PagedBatch:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    seq_lens = [c + q for c, q in zip(contexts, q_lens)] + [0] * num_padding_rows
    q_lens = list(q_lens) + [1] * num_padding_rows
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_needed) + 3  # the null block, then a few never used
    # Shuffled physical blocks: the block table, not block order, decides what is read.
    physical = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    block_tables = torch.zeros(len(seq_lens), max(blocks_needed) + spare_block_columns,
                               dtype=torch.int64)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                       device=device)
    flat = cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slots, positions = [], []
    used = 0
    for seq, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        ids = physical[used : used + blocks_needed[seq]]
        used += blocks_needed[seq]
        block_tables[seq, : len(ids)] = ids
        pos = torch.arange(seq_len)
        seq_slots = (ids[pos // block_size] * block_size + pos % block_size).to(device)
        flat[:, seq_slots] = randn(2, seq_len, num_kv_heads, head_dim)
        if seq_len == 0:  # a padding row
            slots.append(torch.tensor([-1], device=device))
            positions.append(torch.zeros(1, dtype=torch.int64))
        else:
            slots.append(seq_slots[seq_len - q_len :])
            positions.append(pos[seq_len - q_len :])
    cache = cache.to(dtype)
    flat = cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slot_mapping = torch.cat(slots).to(torch.int64)
    valid = slot_mapping >= 0
    key = randn(len(slot_mapping), num_kv_heads, head_dim).to(dtype)
    value = randn(len(slot_mapping), num_kv_heads, head_dim).to(dtype)
    key[valid] = flat[0, slot_mapping[valid]]
    value[valid] = flat[1, slot_mapping[valid]]
    query_start_loc = [0]
    for q_len in q_lens:
        query_start_loc.append(query_start_loc[-1] + q_len)
    return PagedBatch(
        query=randn(query_start_loc[-1], num_heads, head_dim).to(dtype),
        key=key,
        value=value,
        kv_cache=cache,
        block_tables=block_tables.to(device=device, dtype=torch.int32),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=slot_mapping,
        positions=torch.cat(positions).to(device),
        query_start_loc_host=query_start_loc,
        seq_lens_host=seq_lens,
        max_query_len=max(q_lens, default=0),
    )


def reference_attention(
    batch: PagedBatch, scale: float, sliding_window: int | None
) -> torch.Tensor:
    return paged_attention_reference(
        batch.query, batch.kv_cache, batch.block_tables, batch.query_start_loc_host,
        batch.seq_lens_host, scale, sliding_window,
    )


# Tolerances when a kernel and its reference compute the same thing in the same precision and
# differ only in fp32 operation order and in the final rounding to the output dtype. The
# interpreter truncates fp32 → bf16/fp16 where torch rounds to nearest, so one output ulp of
# difference is expected: rtol = 1 ulp at the bottom of a binade (2^-7 for bf16, 2^-10 for
# fp16) covers it. Pass ulps=2 where a kernel rounds twice, as its reference does (the norm's
# normalise-then-weight, silu-then-multiply). fp32 results agree to a few fp32 ulps.
def tolerance(dtype: torch.dtype, ulps: int = 1) -> dict:
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    return {"atol": 1e-5, "rtol": ulps * ulp}


def attention_tolerance(dtype: torch.dtype, device: str) -> dict:
    """Under the interpreter both sides compute attention in fp32: `tolerance`. On the GPU the
    second dot takes the softmax weights p rounded to the 16-bit input type (the tensor cores'
    operand type) while the reference keeps them in fp32: each p is off by at most 2^-9
    relative (bf16), so an output moves by at most 2^-9 · max|v| ≈ 0.01 for standard-normal
    values (|v| < 5), plus one output ulp (rtol 2^-7). fp32 on the GPU uses exact fp32 products
    (no TF32): only the summation order over up to 8k keys differs."""
    if device == "cpu":
        return tolerance(dtype)
    if dtype == torch.float32:
        return {"atol": 1e-4, "rtol": 1e-4}
    return {"atol": 1e-2, "rtol": 2.0**-7}


def weight_only_inputs(m: int, n: int, k: int, dtype=torch.bfloat16, seed: int = 0):
    """x (m, k), a float32 weight (n, k) to quantise and a bias (n,), seeded."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator) * 0.05
    bias = (torch.randn(n, generator=generator) * 0.1).to(dtype)
    return x, weight, bias


def max_relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """max |out − expected| over max |expected|."""
    return ((out.float() - expected.float()).abs().max()
            / expected.float().abs().max()).item()


def assert_rows_do_not_depend_on_the_batch(monkeypatch, module, launcher: str, linear,
                                           x: torch.Tensor) -> list:
    """KILN_BATCH_INVARIANT=1 on the interpreter standing in for CUDA: a quantised linear's
    rows 0..15 computed alone equal the same rows among 2, 5 and 16, int_gemv never runs, and
    module.launcher is called with one config for all 19 calls (returned)."""
    from kiln.kernels import int_gemv, ops

    monkeypatch.setenv("KILN_BATCH_INVARIANT", "1")
    monkeypatch.setattr(ops, "_fast", lambda tensor: True)
    monkeypatch.setattr(int_gemv, "launch_int_gemv", lambda *a, **kw: pytest.fail("int_gemv"))
    configs = []
    real = getattr(module, launcher)
    monkeypatch.setattr(module, launcher, lambda *a, config=None, **kw: configs.append(config)
                        or real(*a, config=config, **kw))
    alone = torch.cat([linear(x[i:i + 1]) for i in range(16)])
    for rows in (2, 5, 16):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows
    assert len(configs) == 19 and len(set(configs)) == 1
    return configs
