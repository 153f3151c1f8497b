"""One-row int8 / int4 weight-only and fp8 linears at Llama-3.1-8B shapes: int_gemv
(fp8_gemv) at its default tiling and at the tilings given, and the dispatcher's own choice
(ops: int_gemv or a Gluon twin; fp8: skinny_fp8), µs per call and weight GB/s, beside the
bf16 GEMV and the card's copy rate. Run it once per tree (PYTHONPATH=ROOT) to A/B a kernel
change in one device call; every timed output is checked against the torch reference first.

Usage: python benchmarks/int_gemv_ab.py OUT_DIR --label new [--tilings 16x128x4 32x64x4]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from quant_bench import COPIES, SHAPES, nbytes, timed, write_results

from kiln.bench.latency import measure_copy_bandwidth
from kiln.kernels import int_gemv, ops
from kiln.kernels.int_gemv import IntGemvConfig
from kiln.kernels.quant_linear import (dequantize_int4, dequantize_int8,
                                       fp8_linear_prequantized_reference,
                                       quantize_fp8_per_token_reference,
                                       weight_only_linear_reference)
from kiln.quant.quantize import quantize_int4, quantize_int8

FORMATS = {"int8": None, "int8-g64": 64, "int8-g128": 128, "int4-g128": 128, "fp8": None}


def fp8_copy(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weights with per-output-channel scales, as `kiln build --quant fp8` makes them."""
    scale = (weight.abs().amax(1) / 448).float()
    return (weight / scale[:, None]).to(torch.float8_e4m3fn), scale


def fp32_unpacking(fn):
    """fn with KILN_INT_GEMV_PACKED=0 (int4 unpacked to fp32, not two bf16 weights an
    instruction) for each call, so the A/B runs in one process and one graph capture."""
    def run():
        os.environ["KILN_INT_GEMV_PACKED"] = "0"
        try:
            return fn()
        finally:
            os.environ.pop("KILN_INT_GEMV_PACKED", None)
    return run


# --smoke: small shapes on the CPU under the interpreter (tests/bench/test_int_gemv_ab.py), so a
# script error shows before a device call does.
SMOKE_SHAPES = {"qkv": (48, 256), "down": (32, 512)}


def smoke_timed(fn) -> float:
    """µs of one call (the --smoke stand-in for quant_bench.timed's CUDA graph)."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e6


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--label", required=True)
    parser.add_argument("--tilings", nargs="*", default=[])
    parser.add_argument("--formats", nargs="*", default=list(FORMATS))
    parser.add_argument("--smoke", action="store_true",
                        help="small shapes on the CPU (TRITON_INTERPRET=1): the script's check")
    args = parser.parse_args(argv)
    rows = []
    device = "cpu" if args.smoke else "cuda"
    timer = smoke_timed if args.smoke else timed
    copy = (1.0 if args.smoke  # no copy rate to compare with: percentages are meaningless
            else round(measure_copy_bandwidth(torch.device("cuda")) / 1e9, 1))  # as kiln bench
    print(f"copy {copy} GB/s  {device_name(device)}")
    for shape, (n, k) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        weights = [torch.randn(n, k, device=device) * 0.02 for _ in range(COPIES)]
        x = torch.randn(1, k, device=device).to(torch.bfloat16)
        dense = [w.to(torch.bfloat16) for w in weights]
        turn = [0]

        def next_dense():  # rotated as the int formats are, so L2 holds none of them
            turn[0] = (turn[0] + 1) % COPIES
            return dense[turn[0]]

        us = timer(lambda: ops.linear(x, next_dense(), None))
        rows.append({"shape": shape, "format": "bf16", "path": "ops", "us": round(us, 2),
                     "weight_gb_s": round(nbytes(dense[0]) / us / 1e3, 1)})
        print(f"{shape:8} bf16      ops        {us:7.2f} us {rows[-1]['weight_gb_s']:7.1f} GB/s")
        del dense
        for fmt in args.formats:
            group = FORMATS[fmt] or k
            if fmt == "fp8":
                copies = [fp8_copy(w) for w in weights]
                x_q, x_scale = quantize_fp8_per_token_reference(x)
                expected_fp8 = fp8_linear_prequantized_reference(
                    x_q, x_scale, *copies[0], None, torch.bfloat16).float()
            elif fmt.startswith("int4"):
                copies = [quantize_int4(w, group, True) for w in weights]
                reference = dequantize_int4(*copies[0])
            else:
                copies = [quantize_int8(w, group) for w in weights]
                reference = dequantize_int8(*copies[0])
            expected = (expected_fp8 if fmt == "fp8"
                        else weight_only_linear_reference(x, reference, None).float())
            turn = [0]

            def pick():
                turn[0] = (turn[0] + 1) % COPIES
                return copies[turn[0]]

            if fmt == "fp8":  # x quantised by its producer (fused_quant), as in the model
                runs = {"ops": lambda: ops.fp8_linear(x_q, *pick(), None, None,
                                                      x_scale=x_scale, out_dtype=x.dtype),
                        "gemv": lambda: int_gemv.fp8_gemv(x_q, x_scale, *pick())}
            elif fmt.startswith("int4"):  # RTN's zero points are whole numbers
                runs = {"ops": lambda: ops.int4_weight_only_linear(x, *pick(), None,
                                                                   integer_zeros=True)}
            else:
                runs = {"ops": lambda: ops.int8_weight_only_linear(x, *pick(), None)}
            if fmt != "fp8":
                runs |= {"gemv": lambda: int_gemv.int_gemv(x, *pick())}
            if fmt.startswith("int4"):
                runs["gemv_fp32"] = fp32_unpacking(runs["gemv"])
            for tag in args.tilings:
                config = IntGemvConfig.parse(tag)
                if fmt == "fp8":
                    runs[f"gemv_{tag}"] = lambda c=config: int_gemv.fp8_gemv(
                        x_q, x_scale, *pick(), config=c)
                else:
                    runs[f"gemv_{tag}"] = lambda c=config: int_gemv.int_gemv(
                        x, *pick(), config=c)
            for path, fn in runs.items():
                turn[0] = COPIES - 1  # the next pick is copy 0: the one checked
                try:
                    error = ((fn().float() - expected).abs().max()
                             / expected.abs().max()).item()
                    us = timer(fn)
                except Exception as failure:  # reported, not fatal
                    rows.append({"shape": shape, "format": fmt, "path": path,
                                 "error": str(failure)[:200]})
                    print(f"{shape:8} {fmt:9} {path:16} ERROR {str(failure)[:100]}")
                    continue
                gb_s = nbytes(*copies[0]) / us / 1e3
                rows.append({"shape": shape, "format": fmt, "path": path, "us": round(us, 2),
                             "weight_gb_s": round(gb_s, 1), "max_rel_error": error,
                             "pct_of_copy": round(100 * gb_s / copy, 1)})
                flag = "  WRONG" if error > 2**-6 else ""
                print(f"{shape:8} {fmt:9} {path:16} {us:7.2f} us {gb_s:7.1f} GB/s "
                      f"{100 * gb_s / copy:5.1f} %{flag}")
            del copies
        del weights
    write_results(args.out, f"int_gemv_ab-{args.label}", rows, copy_gb_s=copy,
                  label=args.label)
    return rows


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreted)"


if __name__ == "__main__":
    main()
