"""The Gluon int4 kernel (kernels/skinny_int4_gluon.py) on Llama-3.1-8B shapes, µs per call (30
calls in one CUDA graph, weights rotating through copies so that L2 holds none), every output
checked against the torch reference first. Two comparisons:

  --mode pdl   its default configs at M = 1, 4, 8, 16, launched with and without
               programmatic dependent launch (same code)
  --mode wide  17, 32, 48 and 64 rows at 32 or 64 token columns, K split 1, 2, 4, 8,
               against what runs above its limit (dequantise to bf16 + cuBLAS). (x was
               gathered two bytes at a time in results/s18-h200-skinny-int4-wide-bench.json;
               the s19-h200-skinny-int4-xruns-* logs compare both loads, from this script at
               commit 059ffe5, and s19-h200-skinny-int4-wide64.log 48 and 64 rows.)

Usage (GPU machine): python3 benchmarks/skinny_int4_gluon_bench.py --mode pdl|wide OUT_DIR"""

from __future__ import annotations

import argparse
import itertools

import torch
from quant_bench import timed, write_results  # benchmarks/ is the script's directory

from kiln.kernels import quant_linear, skinny_int4_gluon
from kiln.kernels.quant_linear import dequantize_int4, weight_only_linear_reference
from kiln.kernels.skinny_int4 import default_skinny_int4_config
from kiln.quant.quantize import quantize_int4

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 6


def cases(shapes: dict, rows: tuple):
    """(shape, m, x, weight copies, check) for every shape and row count; check(out) is the
    output's largest error relative to the reference's largest value."""
    torch.manual_seed(0)
    for shape, (n, k) in shapes.items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        packed, scale, zero = quantize_int4(weight, 128)
        del weight
        copies = [(packed.clone(), scale.clone(), zero.clone()) for _ in range(COPIES)]
        reference_weight = dequantize_int4(packed, scale, zero)
        for m in rows:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            expected = weight_only_linear_reference(x, reference_weight).float()
            norm = expected.abs().max().item()
            def check(out, expected=expected, norm=norm):
                return (out.float() - expected).abs().max().item() / norm
            yield shape, m, x, copies, check
        del copies, reference_weight
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["pdl", "wide"], required=True)
    parser.add_argument("out")
    args = parser.parse_args()
    rows = []
    if args.mode == "pdl":
        shapes = {name: SHAPES[name] for name in ("qkv", "gate_up", "down")}
        row_counts = (1, 4, 8, 16)
    else:
        shapes, row_counts = SHAPES, (17, 32, 48, 64)
    for shape, m, x, copies, check in cases(shapes, row_counts):
        config = default_skinny_int4_config(m, *SHAPES[shape], True)
        variants = {}
        if args.mode == "pdl":
            for pdl in (False, True):
                variants[f"PDL {'on' if pdl else 'off'}"] = (
                    lambda i, pdl=pdl: skinny_int4_gluon.launch(
                        x, *copies[i % COPIES], None, config.split_k, config.tokens,
                        config.stages, pdl))
        else:
            variants["dequantise+cuBLAS"] = lambda i: torch.nn.functional.linear(
                x, quant_linear.dequantize(quant_linear.KIND_INT4, *copies[i % COPIES],
                                           x.dtype))
            for split in (1, 2, 4, 8):
                variants[f"gluon split {split}"] = (
                    lambda i, split=split: skinny_int4_gluon.launch(
                        x, *copies[i % COPIES], None, split, config.tokens, 0))
        line = []
        for name, call in variants.items():
            error = check(call(0))
            assert error < 2**-7, (shape, m, name, error)
            us = timed(lambda counter=itertools.count(), call=call: call(next(counter)), 30)
            rows.append({"shape": shape, "m": m, "kernel": name, "split_k": config.split_k,
                         "stages": config.stages, "us": round(us, 2), "max_rel_err": error})
            line.append(f"{name} {us:.2f}")
        print(f"{shape:8s} M={m:2d} (default split {config.split_k}, stages {config.stages}): "
              + ", ".join(line), flush=True)
    write_results(args.out, f"skinny_int4_gluon_{args.mode}", rows)


if __name__ == "__main__":
    main()
