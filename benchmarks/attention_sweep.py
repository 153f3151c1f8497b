"""Tiles of the paged prefill and decode attention kernels on the GPU, at Llama-3.1-8B's attention shape
(32 query heads, 8 KV heads, head_dim 128, block size 16), for the prefill steps the
benchmarks make: one 8,192-token prompt (TTFT), four 2,048-token prompts (2048/2048 offline),
64 prompts of 128 (128/128 offline); and a 2048/2048-style mixed step (128 decode rows at
~3 k context + four 2,048-token prompts) through the prefill kernel alone against the
decode/prefill split; the decode kernel at 1,024 rows of ~200 context (128/128 offline),
128 rows of ~3 k (2048/2048), 448 rows of 2-4 k (2048/2048 with an FP8 KV cache: ~450
sequences fit) and one row of 8 k (batch-1), against the bytes it must read.
Usage (GPU machine):
    python3 benchmarks/attention_sweep.py [--out DIR] [--decode-only] [--kv-dtype bf16 fp8]"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from kiln.kernels import attention
from kiln.kernels.attention import DecodeTiling, PrefillTiling

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def make_batch(q_lens: list[int], contexts: list[int], kv_dtype: str = "bf16"):
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    blocks = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = 1 + sum(blocks)
    kv = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    if kv_dtype == "fp8":
        kv = attention.to_fp8_cache(kv)
    table = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 1
    for row, count in enumerate(blocks):
        table[row, :count] = torch.randperm(count, device="cuda", dtype=torch.int32) + start
        start += count
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device="cuda")
    query = torch.randn(sum(q_lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    flop = sum(4 * HEADS * HEAD_DIM * (q * c + q * (q + 1) / 2) for q, c in zip(q_lens, contexts))
    return query, kv, table, qsl, seq, flop


def time_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def sweep_decode(scale: float, kv_dtype: str = "bf16", stages=(2, 3, 4)) -> dict:
    cases = {"1024x200": [200 + i % 17 for i in range(1024)],
             "128x3000": [3000 + 8 * i for i in range(128)],
             "448x2048-4096": [2048 + (i * 2048) // 448 for i in range(448)], "1x8192": [8192]}
    tilings = [DecodeTiling(*t) for t in itertools.product([32, 64, 128], [2, 4, 8], stages)]
    # An FP8 cache stores k / k_scale and v / v_scale; 1.0 is as fast as any other scale.
    ones = torch.ones((), dtype=torch.float32, device="cuda")
    scales = {"k_scale": ones, "v_scale": ones} if kv_dtype == "fp8" else {}
    report = {}
    for name, contexts in cases.items():
        query, kv, table, qsl, seq, _ = make_batch([1] * len(contexts), contexts, kv_dtype)
        kv_bytes = sum(contexts) * 2 * KV_HEADS * HEAD_DIM * kv.element_size()
        rows = []
        for tiling in tilings:
            try:
                ms = time_ms(lambda: attention.paged_decode_attention(
                    query, kv, table, seq, scale, tiling=tiling, **scales), reps=20)
            except Exception as error:
                rows.append({"tiling": tiling._asdict(), "error": str(error)[:120]})
                continue
            rows.append({"tiling": tiling._asdict(), "ms": ms, "gb_s": kv_bytes / ms / 1e6})
        ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        default_ms = time_ms(lambda: attention.paged_decode_attention(query, kv, table, seq, scale,
                                                                      **scales), reps=20)
        report[name] = {"default_ms": default_ms, "default_gb_s": kv_bytes / default_ms / 1e6,
                        "best": ok[:5], "all": rows}
        print(f"decode {kv_dtype} {name}: default {default_ms:.3f} ms ({kv_bytes / default_ms / 1e6:.0f} GB/s);"
              " best " + "; ".join(f"{tuple(r['tiling'].values())} {r['ms']:.3f} ms "
                                   f"{r['gb_s']:.0f} GB/s" for r in ok[:4]))
        del query, kv
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--decode-only", action="store_true", help="only the decode kernel's sweep")
    parser.add_argument("--kv-dtype", nargs="+", choices=["bf16", "fp8"], default=["bf16"],
                        help="KV cache dtypes of the decode sweep")
    parser.add_argument("--fp8-dot-modes", nargs="+", choices=attention.FP8_KV_DOT_MODES,
                        default=["model"], help="KILN_FP8_KV_DOT values the fp8 sweep runs")
    args = parser.parse_args()
    scale = HEAD_DIM**-0.5
    if args.decode_only:
        report = {}
        for dtype in args.kv_dtype:
            for mode in args.fp8_dot_modes if dtype == "fp8" else ["model"]:
                os.environ["KILN_FP8_KV_DOT"] = mode  # read at each launch
                print(f"-- {dtype} KILN_FP8_KV_DOT={mode}")
                name = f"decode_{dtype}" + (f"_{mode}" if dtype == "fp8" else "")
                report[name] = sweep_decode(scale, dtype, (2, 3))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_sweep.json").write_text(json.dumps(report, indent=1))
        return
    cases = {"1x8192": ([8192], [0]), "4x2048": ([2048] * 4, [0] * 4)}
    # The first sweep (all of [64, 128] x [32, 64, 128] x [4, 8] x [2, 3, 4]) put these within
    # 5 % of the best at 8,192 and 4 x 2,048 on the H100.
    tilings = [PrefillTiling(*t) for t in [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2),
                                           (128, 32, 4, 2), (64, 64, 4, 3)]]
    report = {"default": attention.prefill_tiling(HEAD_DIM)._asdict(), "cases": {}}
    for name, (q_lens, contexts) in cases.items():
        query, kv, table, qsl, seq, flop = make_batch(q_lens, contexts)
        rows = []
        for tiling in tilings:
            try:
                ms = time_ms(lambda: attention.paged_prefill_attention(
                    query, kv, table, qsl, seq, scale, tiling=tiling))
            except Exception as error:  # out of shared memory / registers for this tile
                rows.append({"tiling": tiling._asdict(), "error": str(error)[:120]})
                continue
            rows.append({"tiling": tiling._asdict(), "ms": ms, "tflops": flop / ms / 1e9})
        ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        default_ms = time_ms(lambda: attention.paged_prefill_attention(query, kv, table, qsl, seq, scale))
        report["cases"][name] = {"default_ms": default_ms, "best": ok[:5], "all": rows}
        print(f"{name}: default {default_ms:.3f} ms ({flop / default_ms / 1e9:.0f} TFLOP/s); best "
              + "; ".join(f"{tuple(r['tiling'].values())} {r['ms']:.3f} ms {r['tflops']:.0f}" for r in ok[:4]))
        del query, kv
    # A 2048/2048 mixed step: 128 decode rows of ~3 k context first, then four 2,048 prompts.
    q_lens = [1] * 128 + [2048] * 4
    contexts = [3000 + 8 * i for i in range(128)] + [0] * 4
    query, kv, table, qsl, seq, flop = make_batch(q_lens, contexts)
    prefill_qsl = qsl[128:] - 128
    whole = time_ms(lambda: attention.paged_prefill_attention(query, kv, table, qsl, seq, scale))
    split = time_ms(lambda: attention.paged_mixed_attention(query, kv, table, seq, 128, prefill_qsl, scale))
    decode_bytes = sum(contexts[:128]) * 2 * KV_HEADS * HEAD_DIM * 2
    report["mixed_128_decode_4x2048"] = {"prefill_kernel_ms": whole, "split_ms": split,
                                         "decode_kv_bytes": decode_bytes}
    print(f"mixed 128 decode (~3k ctx) + 4x2048, one layer: prefill kernel alone {whole:.3f} ms, "
          f"decode/prefill split {split:.3f} ms (decode KV {decode_bytes / 1e9:.2f} GB)")
    del query, kv
    for dtype in args.kv_dtype:
        report["decode" if dtype == "bf16" else f"decode_{dtype}"] = sweep_decode(scale, dtype)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention_sweep.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
