"""Prefill attention at 8k-32k tokens: kiln's paged Triton kernel (several tilings) against
torch SDPA's cuDNN and flash backends in the same process, at Llama-3.1-8B's shape (32 query
heads, 8 KV heads, head_dim 128, bf16, block size 16). TFLOP/s count the causal half:
4 · H · D · Σ (q · context + q (q + 1) / 2).

Cases: one fresh prompt of L tokens (L = 8k, 16k, 32k), and the last 8,192-token chunk of a
32k prompt (24,576 cached tokens before it), where a dense route has to gather the prefix
out of the paged cache and merge a non-causal prefix part with a causal diagonal part by
their log-sum-exps (cuDNN's private op returns them).

Usage (GPU machine): python3 benchmarks/prefill_attention_vs_sdpa.py [--out DIR]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kiln.kernels import attention
from kiln.kernels.attention import PrefillTiling

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
TILINGS = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
           (64, 128, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3)]


def time_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def paged_case(q_len: int, context: int):
    seq_len = q_len + context
    num_blocks = -(-seq_len // BLOCK)
    kv = torch.randn(2, num_blocks + 1, BLOCK, KV_HEADS, HEAD_DIM, device="cuda",
                     dtype=torch.bfloat16)
    table = (torch.randperm(num_blocks, device="cuda", dtype=torch.int32) + 1)[None]
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    seq = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    query = torch.randn(q_len, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    flop = 4 * HEADS * HEAD_DIM * (q_len * context + q_len * (q_len + 1) / 2)
    return query, kv, table, qsl, seq, flop


def gather_dense(kv, table, seq_len):
    """(1, H, L, D) keys and values of one sequence out of the paged cache, KV heads
    repeated to the query heads."""
    blocks = table[0, : -(-seq_len // BLOCK)].long()
    both = kv[:, blocks].reshape(2, -1, KV_HEADS, HEAD_DIM)[:, :seq_len]
    both = both.repeat_interleave(HEADS // KV_HEADS, dim=2)  # (2, L, H, D)
    return both[0].transpose(0, 1)[None], both[1].transpose(0, 1)[None]


def cudnn_with_lse(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def merged(q, k, v, context: int, scale: float):
    """Prefix part (no mask) and diagonal part (causal), merged by log-sum-exp."""
    out_a, lse_a = cudnn_with_lse(q, k[:, :, :context], v[:, :, :context], False, scale)
    out_b, lse_b = cudnn_with_lse(q, k[:, :, context:], v[:, :, context:], True, scale)
    lse_a, lse_b = lse_a.reshape(*out_a.shape[:3], 1), lse_b.reshape(*out_b.shape[:3], 1)
    most = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - most), torch.exp(lse_b - most)
    return ((out_a.float() * weight_a + out_b.float() * weight_b) / (weight_a + weight_b)).to(q.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    scale = HEAD_DIM**-0.5
    report = {}
    for name, (q_len, context) in {"8k": (8192, 0), "16k": (16384, 0), "32k": (32768, 0),
                                   "32k_last_chunk": (8192, 24576)}.items():
        query, kv, table, qsl, seq, flop = paged_case(q_len, context)
        row = {"flop": flop, "triton": {}}
        for tiling in TILINGS:
            try:
                ms = time_ms(lambda: attention.paged_prefill_attention(
                    query, kv, table, qsl, seq, scale, tiling=PrefillTiling(*tiling)))
                row["triton"][str(tiling)] = flop / ms / 1e9
            except Exception as error:  # out of shared memory for this tile
                row["triton"][str(tiling)] = str(error)[:80]
        k, v = gather_dense(kv, table, q_len + context)
        q = query.transpose(0, 1)[None]  # (1, H, q, D): a strided view, as a route would pass
        row["gather_ms"] = time_ms(lambda: gather_dense(kv, table, q_len + context))
        reference = attention.paged_prefill_attention(query, kv, table, qsl, seq, scale)
        if context == 0:
            for backend_name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                          ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
                        ms = time_ms(fn)
                        out = fn()[0].transpose(0, 1)
                    row[backend_name] = flop / ms / 1e9
                    row[f"{backend_name}_max_err"] = float((out.float() - reference.float()).abs().max())
                except Exception as error:
                    row[backend_name] = str(error)[:120]
        try:
            if context:
                fn = lambda: merged(q, k, v, context, scale)
            else:
                fn = lambda: cudnn_with_lse(q, k, v, True, scale)[0]
            ms = time_ms(fn)
            out = fn()[0].transpose(0, 1)
            row["cudnn_lse"] = flop / ms / 1e9
            row["cudnn_lse_max_err"] = float((out.float() - reference.float()).abs().max())
        except Exception as error:
            row["cudnn_lse"] = str(error)[:120]
        report[name] = row
        best = max((v, k) for k, v in row["triton"].items() if isinstance(v, float))
        print(f"{name}: triton default {row['triton'][str(TILINGS[0])]:.0f}, best {best[0]:.0f} "
              f"{best[1]} | cudnn {row.get('cudnn')} flash {row.get('flash')} cudnn+lse "
              f"{row.get('cudnn_lse')} TFLOP/s | gather {row['gather_ms']:.2f} ms", flush=True)
        del query, kv, k, v, q
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill_attention_vs_sdpa.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
