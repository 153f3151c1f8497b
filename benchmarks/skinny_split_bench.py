"""Split-K combining modes of the skinny FP8 GEMM (kernels/skinny_fp8.py) at the default
tiling, on the Llama-3.1-8B linears it splits (o, down) and a q|k|v shard of tp = 2: µs per
call in a CUDA graph of 50 calls, weights rotating through copies larger than L2.
Usage (GPU): python benchmarks/skinny_split_bench.py [--out DIR]"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from kiln.kernels.skinny_fp8 import default_skinny_fp8_config, skinny_fp8_linear
from kiln.quant.quantize import quantize_fp8_per_channel
from quant_bench import timed  # this folder is on sys.path when a script here runs

SHAPES = {"o": (4096, 4096), "down": (4096, 14336), "qkv_tp2": (3072, 4096)}
COPIES = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = [quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * 0.02)
                   for _ in range(COPIES)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            base = default_skinny_fp8_config(m, n, k)
            results = {}
            for mode in ("reduce", "serial", "atomic"):
                config = replace(base, split_k_mode=mode)
                turn = [0]

                def call(config=config):
                    turn[0] = (turn[0] + 1) % COPIES
                    return skinny_fp8_linear(x, *weights[turn[0]], config=config)

                results[mode] = call()
                us = timed(call, 50)
                rows.append({"shape": name, "n": n, "k": k, "m": m, "split_k": base.split_k,
                             "mode": mode, "us": round(us, 2),
                             "gb_s": round(n * k / us / 1e3, 1)})
            same = torch.equal(results["reduce"], results["serial"])
            print(f"{name:8} M={m:2} split {base.split_k}: " + "  ".join(
                f"{r['mode']} {r['us']:6.2f} µs" for r in rows[-3:])
                + f"  serial == reduce: {same}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "skinny_split_bench.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
