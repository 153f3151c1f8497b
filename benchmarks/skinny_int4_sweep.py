"""The decode W4A16 tensor-core GEMM (kernels/skinny_int4.py) on the GPU at Llama-3.1-8B
shapes: µs per call and weight GB/s (packed weight + scales + zeros over the time) for each
tiling of a grid, at M = 1, 4, 16, against the kernels it replaces (int_gemv at M = 1,
quant_linear's tl.dot kernel above) and bf16 (ops.linear). Every timed output is checked
against the torch reference first. Weights rotate through copies so that L2 holds none.

Usage: python benchmarks/skinny_int4_sweep.py --out DIR [--rows 1 4 16] [--budget-s 240]
           [--grid wgmma|mma8|wide|gluon]
Writes DIR/skinny_int4_sweep-GRID.json and prints the best tiling per shape and M.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from quant_bench import timed as graph_timed  # benchmarks/ is the script's directory

from kiln.kernels import int_gemv, ops, quant_linear
from kiln.kernels.quant_linear import dequantize_int4, weight_only_linear_reference
from kiln.kernels.skinny_int4 import (
    SkinnyInt4Config,
    default_skinny_int4_config,
    launch_skinny_int4,
)
from kiln.quant.quantize import quantize_int4

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
COPIES = 6


def grid(name: str) -> list[SkinnyInt4Config]:
    if name == "gluon":  # kernels/skinny_int4_gluon.py: 64-row programs; tokens, split, stages
        return [SkinnyInt4Config(tokens=tokens, split_k=split_k, gluon=True, stages=stages)
                for stages, tokens, split_k in itertools.product((0, 2, 3, 4, 6), (8, 16),
                                                                 (1, 2, 4, 8))]
    if name == "mma8":  # 8 token columns (M ≤ 8): mma.sync, programs of 1-4 warps
        return [SkinnyInt4Config(block_n, 1, tokens=8, split_k=split_k, num_warps=warps,
                                 num_stages=stages, gluon=False)
                for block_n, warps, stages, split_k in itertools.product(
                    (16, 32, 64), (1, 2, 4), (3, 4), (1, 2, 4, 8))
                if block_n >= 16 * warps]
    if name == "wide":  # 128-row programs of two warpgroups sharing each x tile
        return [SkinnyInt4Config(128, subtiles, split_k=split_k, num_warps=8,
                                 num_stages=stages, gluon=False)
                for subtiles, stages, split_k in itertools.product((1, 2), (2, 3, 4),
                                                                    (1, 2, 4, 8))]
    configs = []
    for block_n, subtiles, stages, paired in itertools.product((64, 128), (1, 2, 4), (3, 4, 6),
                                                                (True, False)):
        if not paired and (stages != 4 or subtiles != 2):
            continue  # the unpaired order only at one tiling per block_n: the A/B
        for split_k in (1, 2, 4, 8):
            configs.append(SkinnyInt4Config(block_n, subtiles, split_k=split_k,
                                            num_stages=stages, paired=paired, gluon=False))
    return configs


def label(config: SkinnyInt4Config) -> str:
    if config.gluon:
        return f"gluon k{config.split_k} t{config.tokens} st{config.stages}"
    return (f"n{config.block_n} s{config.subtiles} k{config.split_k} st{config.num_stages}"
            + (f" t{config.tokens}" if config.tokens != 16 else "")
            + (f" w{config.num_warps}" if config.num_warps != 4 else "")
            + ("" if config.paired else " unpaired"))


def timed(fn, iterations: int = 30) -> float:
    """µs per call of fn(i), i counting calls (the weight copy to use): quant_bench's CUDA-graph
    timing."""
    calls = itertools.count()
    return graph_timed(lambda: fn(next(calls)), iterations)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--grid", choices=("wgmma", "mma8", "wide", "gluon"), default="wgmma",
                        help="wgmma: 16 token columns, 64-128-row programs (the default's "
                             "family); mma8: 8 token columns on mma.sync, 16-64 rows, 1-4 warps")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    configs = grid(args.grid)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        weight = torch.randn(n, k, device="cuda") * 0.02
        packed, scale, zero = quantize_int4(weight, 128)
        dense = weight.to(torch.bfloat16)
        del weight
        copies = [(packed.clone(), scale.clone(), zero.clone()) for _ in range(COPIES)]
        denses = [dense.clone() for _ in range(3)]
        weight_bytes = packed.numel() + 2 * scale.numel() * 2
        reference_weight = dequantize_int4(packed, scale, zero)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            expected = weight_only_linear_reference(x, reference_weight)
            norm = expected.float().abs().max().item()

            def record(name, fn, nbytes=weight_bytes, check=True):
                if check:
                    error = (fn(0).float() - expected.float()).abs().max().item() / norm
                    if not error < 2**-7:
                        print(f"{shape} M={m} {name}: WRONG (relative error {error:.3g})")
                        return None
                us = timed(fn)
                row = {"shape": shape, "m": m, "kernel": name, "us": round(us, 2),
                       "gb_s": round(nbytes / us / 1e3, 1)}
                results["rows"].append(row)
                return row

            record("bf16", lambda i: ops.linear(x, denses[i % 3], None), dense.numel() * 2,
                   check=False)
            if m == 1:
                record("int_gemv", lambda i: int_gemv.launch_int_gemv(x, *copies[i % COPIES],
                                                                       None))
            else:
                record("quant_linear", lambda i: quant_linear.quant_linear(
                    x, quant_linear.KIND_INT4, *copies[i % COPIES], bias=None))
            default = default_skinny_int4_config(m, n, k)
            record("skinny default " + label(default), lambda i: launch_skinny_int4(
                x, *copies[i % COPIES], None, config=default))
            if default.gluon:  # and the Triton kernel at its own default
                triton_default = default_skinny_int4_config(m, n, k, gluon=False)
                record("skinny triton default " + label(triton_default),
                       lambda i: launch_skinny_int4(x, *copies[i % COPIES], None,
                                                    config=triton_default))
            for config in configs:
                if time.monotonic() > deadline:
                    break
                try:
                    record("skinny " + label(config), lambda i, c=config: launch_skinny_int4(
                        x, *copies[i % COPIES], None, config=c))
                except Exception as error:  # noqa: BLE001 (too much shared memory, ...)
                    print(f"{shape} M={m} {label(config)}: {type(error).__name__}: "
                          f"{str(error)[:120]}")
            rows = [r for r in results["rows"] if r["shape"] == shape and r["m"] == m]
            skinny = sorted((r for r in rows if r["kernel"].startswith("skinny ")),
                            key=lambda r: r["us"])
            base = [r for r in rows if not r["kernel"].startswith("skinny")]
            print(f"{shape:8s} M={m:2d} " + "  ".join(f"{r['kernel']} {r['us']} µs "
                                                     f"({r['gb_s']} GB/s)" for r in base))
            defaults = [r for r in rows if r["kernel"].startswith(("skinny default",
                                                                    "skinny triton default"))]
            for r in defaults + skinny[:4]:
                print(f"{'':13s} {r['kernel']:40s} {r['us']:7.2f} µs {r['gb_s']:7.1f} GB/s")
        del copies, denses
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"skinny_int4_sweep-{args.grid}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
