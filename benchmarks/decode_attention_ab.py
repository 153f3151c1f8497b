"""The paged decode attention kernel of whichever kiln is first on PYTHONPATH, timed at
Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head_dim 128, 16-token blocks
unless --block-size)
on the decode batches the offline benchmarks make, for an FP8 and a bf16 cache: bytes of KV
read per second against the card's measured copy rate. Run once per tree in one device call
(the A/B: PYTHONPATH=.ab-base, then PYTHONPATH=.) and compare the JSON files; on the
128 x 3,000 case it also checks each timed kernel's output against the torch reference.
Usage (GPU machine):
    PYTHONPATH=. python3 benchmarks/decode_attention_ab.py --label new \
        [--fp8-tilings 128,2,3 64,4,2] [--block-size 32] [--out DIR]
(KILN_FP8_KV_DOT=e4m3 in the environment times the E4M3-dot kernel.) For ncu, one launch:
    ncu --clock-control none -k "regex:_paged_decode_(kernel|e4m3)" --launch-skip 2 \
        --launch-count 1 --set full -o REPORT python3 benchmarks/decode_attention_ab.py \
        --label x --cases 448x2048-4096 --kv-dtypes fp8"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import attention_sweep
from attention_sweep import HEAD_DIM, KV_HEADS, make_batch, time_ms
from kiln.kernels import attention
from kiln.kernels.attention import DecodeTiling

CASES = {  # name: length of each decode row's sequence, its new token included
    "448x2048-4096": [2048 + (i * 2048) // 448 for i in range(448)],  # 2048/2048, FP8 KV
    "128x3000": [3000 + 8 * i for i in range(128)],  # 2048/2048, bf16 KV
    "1024x200": [200 + i % 17 for i in range(1024)],  # 128/128
    "1x8192": [8192],  # batch 1
}


def make_decode_batch(seq_lens: list[int], kv_dtype: str):
    """(query, kv_cache, block_tables, seq_lens) of one decode step over these sequences."""
    query, kv, table, _, seq, _ = make_batch([1] * len(seq_lens), [n - 1 for n in seq_lens],
                                             kv_dtype)
    return query, kv, table, seq


def copy_gb_s() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="name of this tree in the output")
    parser.add_argument("--fp8-tilings", nargs="*", default=[],
                        help="extra BLOCK_N,WARPS,STAGES tilings timed on the FP8 cache")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--kv-dtypes", nargs="*", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    parser.add_argument("--block-size", type=int, default=attention_sweep.BLOCK,
                        help="tokens per cache block (an FP8 engine's default is 32)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    attention_sweep.BLOCK = args.block_size  # make_batch's block size
    scale = HEAD_DIM**-0.5
    ones = torch.ones((), dtype=torch.float32, device="cuda")
    copy = copy_gb_s()
    report = {"label": args.label, "card": torch.cuda.get_device_name(), "copy_gb_s": copy,
              "block_size": args.block_size, "kv_dot": os.environ.get("KILN_FP8_KV_DOT", ""),
              "cases": {}}
    print(f"[{args.label}] copy {copy:.0f} GB/s")
    tilings = [None] + [DecodeTiling(*map(int, t.split(","))) for t in args.fp8_tilings]
    for kv_name in args.kv_dtypes:
        scales = {"k_scale": ones, "v_scale": ones} if kv_name == "fp8" else {}
        for case in args.cases:
            contexts = CASES[case]
            query, kv, table, seq_lens = make_decode_batch(contexts, kv_name)
            kv_bytes = sum(contexts) * 2 * KV_HEADS * HEAD_DIM * kv.element_size()
            expected = None
            if case == "128x3000":  # the reference is a per-sequence loop: one case is enough
                expected = attention.paged_attention_reference(
                    query, kv, table, list(range(len(contexts) + 1)), contexts, scale, None,
                    *(scales.values() or (None, None)))
            for tiling in tilings if kv_name == "fp8" else [None]:
                name = "default" if tiling is None else ",".join(map(str, tiling))
                run = lambda: attention.paged_decode_attention(  # noqa: E731
                    query, kv, table, seq_lens, scale, tiling=tiling, **scales)
                try:
                    out = run()
                    ms = time_ms(run)
                except Exception as error:  # a tiling past the shared memory
                    print(f"[{args.label}] {kv_name} {case} {name}: {str(error)[:100]}")
                    continue
                gb_s = kv_bytes / ms / 1e6
                row = {"ms": ms, "gb_s": gb_s, "pct_of_copy": 100 * gb_s / copy}
                if expected is not None:
                    row["max_abs_err"] = (out.float() - expected.float()).abs().max().item()
                report["cases"][f"{kv_name} {case} {name}"] = row
                print(f"[{args.label}] {kv_name} {case:>14} {name:>9}: {ms:7.3f} ms "
                      f"{row['gb_s']:6.0f} GB/s ({row['pct_of_copy']:.0f} % of copy)"
                      + (f" err {row['max_abs_err']:.4f}" if expected is not None else ""))
            del query, kv
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"decode_attention_ab-{args.label}.json"
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
