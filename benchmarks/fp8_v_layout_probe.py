"""A probe for the next change to FP8-KV decode attention: V stored dims-major in each block.

The FP8 decode kernel reads 2.97 TB/s at 448 rows of 2-4 k context, the bf16 one 4.33 TB/s
(H200, BENCHMARKS.md, eighth session). K reaches the tensor cores well: the dot q.k^T reduces
over head_dim, which the cache keeps contiguous, so each register of the operand holds two
neighbouring E4M3 bytes, loaded 32 bits at a time from shared memory and widened by one
cvt.rn.f16x2.e4m3x2. V does not: p.v reduces over the keys, which the cache keeps a whole
row (Hkv x D bytes) apart, so the kernel widens V in a plain layout and sends it through
shared memory again as float16 (_load_v_words). Two layouts of the operands that put the
keys first (the keys-major kernel, commit b7b7ec0) moved nothing.

Stored (Hkv, D, block_size) in each block instead of (block_size, Hkv, D), V's keys are
contiguous like K's dims, and both operands take K's path. Compiled for sm_90 on the CPU
(64 keys, 4 warps, 3 stages): 118 registers, 16 warps an SM, no byte loads from shared
memory (the current kernel: ~194 registers at 2 warps). This file times that kernel against
the current one on a copy of the cache whose V half is rearranged so, before the cache
layout, its writers (write_kv_cache, the fused RoPE write) and the prefill kernels change.

Decode only, no sliding window (the tiles must start on a multiple of BLOCK_N: the
vectorised loads of V rely on it). Usage:
    python3 benchmarks/fp8_v_layout_probe.py [--tilings 64,4,3 128,4,3] [--out DIR]   # GPU
    TRITON_INTERPRET=1 python3 benchmarks/fp8_v_layout_probe.py --check                 # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from kiln.kernels.attention import (
    FP8_KV_DTYPE,
    LOG2_E,
    MIN_DECODE_SPLIT_TOKENS,
    DecodeTiling,
    _decode_split,
    _online_softmax_step,
    _online_softmax_step_unmasked,
    _paged_decode_reduce_kernel,
    decode_num_splits,
    paged_attention_reference,
    paged_decode_attention,
)
from kiln.kernels.triton_utils import launchable, next_power_of_2

DEFAULT_TILING = DecodeTiling(64, 4, 3)


def to_v_dims_major(kv_cache: torch.Tensor) -> torch.Tensor:
    """A copy of a (2, blocks, block_size, Hkv, D) cache whose V half holds each block as
    (Hkv, D, block_size): same shape and bytes, V's keys contiguous."""
    out = kv_cache.clone()
    num_blocks = kv_cache.shape[1]
    out[1].view(-1).copy_(kv_cache[1].permute(0, 2, 3, 1).reshape(num_blocks, -1).view(-1))
    return out


@triton.jit
def _load_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
               block_table, pos, valid, kv_head, HEAD_DIM: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """K (BLOCK_N, D) as the cache keeps it; V (BLOCK_N, D) from its dims-major half."""
    if MASKED:
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
    slot = pos % BLOCK_SIZE
    dims = tl.arange(0, HEAD_DIM)
    k_rows = block * stride_c_block + slot * stride_c_slot + kv_head * stride_c_head
    # Each block's V: (Hkv, D, BLOCK_SIZE); tiles start on a multiple of BLOCK_N, so runs of
    # BLOCK_SIZE keys are contiguous and aligned (the hint lets the copy vectorise).
    v_keys = block * stride_c_block + kv_head * (HEAD_DIM * BLOCK_SIZE) + slot
    v_keys = tl.max_contiguous(tl.multiple_of(v_keys, BLOCK_SIZE), BLOCK_SIZE)
    k_ptrs = cache_ptr + k_rows[:, None] + dims[None, :]
    v_ptrs = cache_ptr + stride_c_kind + v_keys[:, None] + dims[None, :] * BLOCK_SIZE
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k.to(DOT_DTYPE), v.to(DOT_DTYPE)


@triton.jit
def _decode_v_dims_major_kernel(
    q_ptr, stride_qt, stride_qh, cache_ptr, stride_c_kind, stride_c_block, stride_c_slot,
    stride_c_head, block_tables_ptr, stride_bt, seq_lens_ptr, out_ptr, stride_ot, stride_oh,
    part_out_ptr, part_lse_ptr, qk_scale, k_scale_ptr, v_scale_ptr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, Q_TO_F16: tl.constexpr,
):
    """_paged_decode_kernel for an FP8 cache with dims-major V, without a window."""
    NUM_KV_HEADS: tl.constexpr = NUM_HEADS // GROUP
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    seq = (tl.program_id(0) // NUM_KV_HEADS).to(tl.int64)
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    _, split_size, num_active = _decode_split(seq_len, 1 << 30, NUM_SPLITS, MIN_SPLIT, BLOCK_N)
    if split >= num_active:
        return
    kv_lo = split * split_size  # a multiple of BLOCK_N: split_size is
    kv_hi = tl.minimum(kv_lo + split_size, seq_len)
    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None], other=0.0)
    if Q_TO_F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    q = q.to(DOT_DTYPE)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt
    qk_scale = qk_scale * tl.load(k_scale_ptr)
    full_hi = kv_lo + (kv_hi - kv_lo) // BLOCK_N * BLOCK_N
    for tile in range(kv_lo, full_hi, BLOCK_N):
        pos = tl.multiple_of(tile, BLOCK_N) + tl.arange(0, BLOCK_N)
        k, v = _load_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                          block_table, pos, pos < kv_hi, kv_head, HEAD_DIM, BLOCK_SIZE,
                          DOT_DTYPE, False)
        m, l, acc = _online_softmax_step_unmasked(q, k, v, m, l, acc, qk_scale, DOT_DTYPE,
                                                  PRECISION)
    for tile in range(full_hi, kv_hi, BLOCK_N):  # at most one
        pos = tl.multiple_of(tile, BLOCK_N) + tl.arange(0, BLOCK_N)
        valid = pos < kv_hi
        k, v = _load_tile(cache_ptr, stride_c_kind, stride_c_block, stride_c_slot, stride_c_head,
                          block_table, pos, valid, kv_head, HEAD_DIM, BLOCK_SIZE, DOT_DTYPE,
                          True)
        m, l, acc = _online_softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale,
                                         DOT_DTYPE, PRECISION)
    out = acc / tl.where(l > 0, l, 1.0)[:, None] * tl.load(v_scale_ptr)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=head_mask[:, None])
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=head_mask)


def decode_v_dims_major(query, kv_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                        tiling: DecodeTiling = DEFAULT_TILING, num_splits: int | None = None):
    """Decode attention over a to_v_dims_major cache: (S, Hq, D), like paged_decode_attention."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if kv_cache.dtype != FP8_KV_DTYPE or tiling.block_n % block_size:
        raise ValueError("an FP8 cache and key tiles of whole blocks")
    num_splits = num_splits or decode_num_splits(num_seqs, num_kv_heads, query.device)
    float32 = query.dtype == torch.float32 or query.device.type != "cuda"
    dot = tl.float32 if float32 else tl.float16
    out = torch.empty_like(query)
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                           device=query.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                           device=query.device)
    launchable(_decode_v_dims_major_kernel, query)[(num_seqs * num_kv_heads, num_splits)](
        query, query.stride(0), query.stride(1), kv_cache, *kv_cache.stride()[:4],
        block_tables, block_tables.stride(0), seq_lens, out, out.stride(0), out.stride(1),
        part_out, part_lse, scale * LOG2_E, k_scale, v_scale,
        NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads,
        GROUP_PAD=max(16, next_power_of_2(num_heads // num_kv_heads)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=tiling.block_n, NUM_SPLITS=num_splits,
        MIN_SPLIT=MIN_DECODE_SPLIT_TOKENS, DOT_DTYPE=dot,
        PRECISION="ieee" if float32 else "tf32", Q_TO_F16=not float32,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )
    if num_splits > 1:
        launchable(_paged_decode_reduce_kernel, query)[(num_seqs, num_heads)](
            part_out, part_lse, seq_lens, out, out.stride(0), out.stride(1), 1 << 30,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_N=tiling.block_n,
            NUM_SPLITS=num_splits, MIN_SPLIT=MIN_DECODE_SPLIT_TOKENS,
            SPLITS_PAD=next_power_of_2(num_splits), num_warps=4, USE_PDL=False, launch_pdl=False)
    return out


def check(device: str = "cpu") -> float:
    """The probe against the torch reference on the original cache, at small shapes (on the
    CPU through the interpreter, float32 dots): the largest absolute error."""
    generator = torch.Generator().manual_seed(0)
    contexts, heads, kv_heads, head_dim, block_size = [70, 16, 130, 1], 8, 2, 64, 16
    blocks = [-(-n // block_size) for n in contexts]
    kv = (torch.randn(2, 1 + sum(blocks), block_size, kv_heads, head_dim, generator=generator)
          * 2).to(FP8_KV_DTYPE).to(device)
    table = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
    start = 1
    for row, count in enumerate(blocks):
        table[row, :count] = torch.randperm(count, generator=generator).to(torch.int32) + start
        start += count
    table = table.to(device)
    query = torch.randn(len(contexts), heads, head_dim, generator=generator).to(device)
    k_scale, v_scale = torch.tensor(0.5, device=device), torch.tensor(1.5, device=device)
    expected = paged_attention_reference(query, kv, table, list(range(len(contexts) + 1)),
                                         contexts, 0.125, None, k_scale, v_scale)
    seq_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    worst = 0.0
    for num_splits in (1, 2):
        out = decode_v_dims_major(query, to_v_dims_major(kv), table, seq_lens, 0.125, k_scale,
                                  v_scale, DecodeTiling(32, 4, 1), num_splits)
        worst = max(worst, (out - expected).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="CPU: compare with the reference")
    parser.add_argument("--tilings", nargs="*", default=["64,4,3", "128,4,3", "64,4,2", "64,8,3"],
                        help="BLOCK_N,WARPS,STAGES tilings of the probe to time")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if args.check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--check runs under TRITON_INTERPRET=1")
        worst = check()
        print(f"max abs error against the reference: {worst:.2e}")
        sys.exit(0 if worst < 1e-4 else 1)
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_attention_ab import CASES, copy_gb_s, make_decode_batch  # noqa: E402
    from attention_sweep import HEAD_DIM, KV_HEADS, time_ms  # noqa: E402

    scale, ones = HEAD_DIM**-0.5, torch.ones((), dtype=torch.float32, device="cuda")
    copy = copy_gb_s()
    report = {"card": torch.cuda.get_device_name(), "copy_gb_s": copy, "cases": {}}
    print(f"copy {copy:.0f} GB/s")
    for case in ("448x2048-4096", "128x3000", "1x8192"):
        contexts = CASES[case]
        query, kv, table, seq_lens = make_decode_batch(contexts, "fp8")
        kv_vt = to_v_dims_major(kv)
        kv_bytes = sum(contexts) * 2 * KV_HEADS * HEAD_DIM
        expected = paged_decode_attention(query, kv, table, seq_lens, scale, k_scale=ones,
                                          v_scale=ones)
        runs = {"current": lambda: paged_decode_attention(query, kv, table, seq_lens, scale,
                                                          k_scale=ones, v_scale=ones)}
        for text in args.tilings:
            tiling = DecodeTiling(*map(int, text.split(",")))
            runs[f"v-dims-major {text}"] = (
                lambda tiling=tiling: decode_v_dims_major(query, kv_vt, table, seq_lens, scale,
                                                          ones, ones, tiling))
        for name, run in runs.items():
            try:
                error = (run().float() - expected.float()).abs().max().item()
                ms = time_ms(run, reps=20)
            except Exception as failure:  # a tiling past the shared memory
                print(f"{case} {name}: {str(failure)[:100]}")
                continue
            gb_s = kv_bytes / ms / 1e6
            report["cases"][f"{case} {name}"] = {"ms": ms, "gb_s": gb_s,
                                                 "max_abs_diff_vs_current": error}
            print(f"{case:>14} {name:>22}: {ms:7.3f} ms {gb_s:6.0f} GB/s "
                  f"({100 * gb_s / copy:.0f} % of copy), |diff| {error:.4f}")
        del query, kv, kv_vt
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_v_layout_probe.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
