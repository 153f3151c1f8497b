"""int8 weight-only linears at decode rows on Llama-3.1-8B shapes, µs per call (30 calls in one
CUDA graph, weights rotating through copies so that L2 holds none), every output checked
against the torch reference first: the tensor-core kernel (kernels/skinny_int8.py) and its
Gluon twin (skinny_int8_gluon.py), each at its default config and at K split 1, 2, 4, 8,
against quant_linear's converting kernel (what ran at 2-16 rows before them) and, at one
row, int_gemv (what runs there).

--group-size N: group scales (GGUF Q8_0's 32, `--group-size`), which only the Gluon twin
takes at 2-16 rows (and int_gemv at one row; int_gemm at 65-128); quant_linear is what they
ran on before.
--rows: the row counts (default 1 2 4 8 16); above 16 only the Gluon twin runs (32 or 64
token columns), timed against the dequantise-then-cuBLAS path that took those rows before;
above 64, kernels/int_gemm.py (128 token columns) at its default and a grid of tilings
(weight rows 64 / 128, K tiles 64 / 128, splits 1, 2, 4), against the same.

--smollm2: the default model's shapes (K = 576: the Triton kernel, no Gluon twin).

Usage (GPU machine): python3 benchmarks/skinny_int8_bench.py OUT_DIR [--group-size N]
                     [--rows 17 32 48 64 96 128] [--int4] [--smollm2]"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
from quant_bench import timed, write_results  # benchmarks/ is the script's directory

from kiln.kernels import int_gemv, quant_linear, skinny_int8_gluon
from kiln.kernels.int_gemm import MAX_ROWS, IntGemmConfig, default_int_gemm_config, int_gemm
from kiln.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    weight_only_linear_reference,
)
from kiln.kernels.skinny_fp8 import MAX_TOKENS, default_skinny_fp8_config
from kiln.kernels.skinny_int8 import (
    default_gluon_split_and_tokens,
    gluon_usable,
    skinny_int8_linear,
)
from kiln.quant.quantize import quantize_int4, quantize_int8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# SmolLM2-135M (the default model): K = 576 is no multiple of 128, so no Gluon twin there
SMOLLM2_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576),
                  "down": (576, 1536)}
COPIES = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--group-size", type=int, default=-1, help="-1: per output channel")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--int4", action="store_true",
                        help="above 64 rows also int4-wo (groups of 128) through int_gemm")
    parser.add_argument("--smollm2", action="store_true",
                        help="SmolLM2-135M's shapes instead of Llama-3.1-8B's")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape, (n, k) in (SMOLLM2_SHAPES if args.smollm2 else SHAPES).items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        q, scale = quantize_int8(weight, k if args.group_size == -1 else args.group_size)
        int4 = quantize_int4(weight, 128) if args.int4 else None
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
            dequantised = {"dequantise+cuBLAS": lambda i: torch.nn.functional.linear(
                x, quant_linear.dequantize(quant_linear.KIND_INT8, *copies[i % COPIES], None,
                                           x.dtype))}
            if m > skinny_int8_gluon.MAX_TOKENS:  # the int8 GEMM, against dequantising
                if m > MAX_ROWS:  # int_gemm does not take these
                    _time(dequantised, expected, norm, shape, m, weight_bytes, rows)
                    continue
                default = default_int_gemm_config(m, n, k)
                variants = {**dequantised, f"int_gemm default (split {default.split_k})": (
                    lambda i: int_gemm(x, *copies[i % COPIES]))}
                # group scales: K tiles inside one group (int_gemm clips larger ones)
                block_ks = [b for b in (64, 128) if args.group_size in (-1, b) or
                            args.group_size % b == 0] or [64]
                for block_n, block_k, split in itertools.product((128, 64), block_ks,
                                                                 (1, 2, 4)):
                    config = IntGemmConfig(block_n, block_k, 128, split, block_n // 16)
                    if config != default:
                        variants[f"int_gemm n{block_n} k{block_k} split {split}"] = (
                            lambda i, c=config: int_gemm(x, *copies[i % COPIES], config=c))
                _time(variants, expected, norm, shape, m, weight_bytes, rows)
                if int4 is not None:
                    _time_int4(int4, x, shape, m, default, rows)
                continue
            if m > MAX_TOKENS:  # the Gluon twin only, against what ran these rows before
                variants = {
                    **dequantised,
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
            if not gluon_usable(x, q):  # K not a multiple of 128 (--smollm2): Triton only
                kernels = kernels[:1]
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


def _time_int4(int4: tuple, x: torch.Tensor, shape: str, m: int, default, rows: list) -> None:
    """int4-wo (packed, scale, zero) at m rows: dequantise + cuBLAS against int_gemm at its
    default and at splits 1, 2, 4 of 128 / 64 weight rows."""
    copies4 = [tuple(t.clone() for t in int4) for _ in range(COPIES)]
    expected = weight_only_linear_reference(x, dequantize_int4(*int4)).float()
    variants = {
        "int4 dequantise+cuBLAS": lambda i: torch.nn.functional.linear(
            x, quant_linear.dequantize(quant_linear.KIND_INT4, *copies4[i % COPIES], x.dtype)),
        f"int4 int_gemm default (split {default.split_k})": lambda i: int_gemm(
            x, *copies4[i % COPIES]),
    }
    for block_n, split in itertools.product((128, 64), (1, 2, 4)):
        config = IntGemmConfig(block_n, 128, 128, split, block_n // 16)
        if (block_n, split) != (default.block_n, default.split_k):
            variants[f"int4 int_gemm n{block_n} split {split}"] = (
                lambda i, c=config: int_gemm(x, *copies4[i % COPIES], config=c))
    weight_bytes = sum(t.numel() * t.element_size() for t in int4)
    _time(variants, expected, expected.abs().max().item(), shape, m, weight_bytes, rows)


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
