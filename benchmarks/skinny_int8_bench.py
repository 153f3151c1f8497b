"""int8 weight-only linears at decode rows on Llama-3.1-8B shapes, µs per call (30 calls in one
CUDA graph, weights rotating through copies so that L2 holds none), every output checked
against the torch reference first: the tensor-core kernel (kernels/skinny_int8.py) and its
Gluon twin (skinny_int8_gluon.py), each at its default config and at K split 1, 2, 4, 8,
against quant_linear's converting kernel (what ran at 2-16 rows before them) and, at one
row, int_gemv (what runs there).

--group-size N: group scales (GGUF Q8_0's 32, `--group-size`), which only the Gluon twin
takes at 2-16 rows (and int_gemv at one row); quant_linear is what they ran on before.
--rows: the row counts (default 1 2 4 8 16); above 16 only the Gluon twin runs (32 or 64
token columns), timed against the dequantise-then-cuBLAS path that took those rows before.

Usage (GPU machine): python3 benchmarks/skinny_int8_bench.py OUT_DIR [--group-size N]
                     [--rows 17 32 48 64]"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
from quant_bench import timed, write_results  # benchmarks/ is the script's directory

from kiln.kernels import int_gemv, quant_linear, skinny_int8_gluon
from kiln.kernels.quant_linear import dequantize_int8, weight_only_linear_reference
from kiln.kernels.skinny_fp8 import MAX_TOKENS, default_skinny_fp8_config
from kiln.kernels.skinny_int8 import default_gluon_split_and_tokens, skinny_int8_linear
from kiln.quant.quantize import quantize_int8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--group-size", type=int, default=-1, help="-1: per output channel")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        q, scale = quantize_int8(weight, k if args.group_size == -1 else args.group_size)
        del weight
        copies = [(q.clone(), scale.clone()) for _ in range(COPIES)]
        reference_weight = dequantize_int8(q, scale)
        weight_bytes = q.numel() + scale.numel() * 2
        for m in args.rows:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            expected = weight_only_linear_reference(x, reference_weight).float()
            norm = expected.abs().max().item()
            gluon_split, tokens = default_gluon_split_and_tokens(m, n, k,
                                                                 args.group_size != -1)
            if m > MAX_TOKENS:  # the Gluon twin only, against what ran these rows before
                variants = {
                    "dequantise+cuBLAS": lambda i: torch.nn.functional.linear(
                        x, quant_linear.dequantize(quant_linear.KIND_INT8,
                                                   *copies[i % COPIES], None, x.dtype)),
                    f"gluon default (split {gluon_split})": lambda i: skinny_int8_linear(
                        x, *copies[i % COPIES]),
                }
                for split in (1, 2, 4, 8):
                    if split != gluon_split:
                        variants[f"gluon split {split}"] = (
                            lambda i, split=split: skinny_int8_gluon.launch(
                                x, *copies[i % COPIES], None, split, tokens))
                _time(variants, expected, norm, shape, m, weight_bytes, rows)
                continue
            config = default_skinny_fp8_config(m, n, k)
            variants = {
                "quant_linear": lambda i: quant_linear.quant_linear(
                    x, quant_linear.KIND_INT8, *copies[i % COPIES], None),
            }
            kernels = ((False, config.split_k), (True, gluon_split))
            if args.group_size != -1:  # the Triton kernel takes per-channel scales only
                kernels = kernels[1:]
            for gluon, default in kernels:
                kernel = "gluon" if gluon else "triton"
                variants[f"{kernel} default (split {default})"] = (
                    lambda i, gluon=gluon: skinny_int8_linear(x, *copies[i % COPIES],
                                                              gluon=gluon))
                for split in (1, 2, 4, 8):
                    if split != default:
                        variants[f"{kernel} split {split}"] = (
                            lambda i, gluon=gluon, c=dataclasses.replace(
                                config, split_k=split, tokens=tokens if gluon else 16):
                            skinny_int8_linear(x, *copies[i % COPIES], config=c, gluon=gluon))
            if m == 1:
                variants["int_gemv"] = lambda i: int_gemv.launch_int_gemv(
                    x, *copies[i % COPIES], None, None)
            _time(variants, expected, norm, shape, m, weight_bytes, rows)
        del copies, reference_weight
        torch.cuda.empty_cache()
    write_results(args.out, "skinny_int8_bench", rows, group_size=args.group_size)


def _time(variants: dict, expected, norm: float, shape: str, m: int, weight_bytes: int,
          rows: list) -> None:
    """Checks then times each variant (call(i) uses weight copy i), one printed line."""
    line = []
    for name, call in variants.items():
        error = (call(0).float() - expected).abs().max().item() / norm
        if not error < 2**-7:  # a wrong kernel is reported, not timed
            line.append(f"{name} WRONG (error {error:.3g})")
            continue
        us = timed(lambda counter=itertools.count(), call=call: call(next(counter)), 30)
        rows.append({"shape": shape, "m": m, "kernel": name, "us": round(us, 2),
                     "weight_tb_s": round(weight_bytes / us / 1e6, 2), "max_rel_err": error})
        line.append(f"{name} {us:.1f}")
    print(f"{shape:8s} M={m:2d}: " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
