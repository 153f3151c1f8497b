"""Quantised linear kernels on the GPU at Llama-3.1-8B shapes: µs per call and weight GB/s
(bytes of the quantised weight and its scales over the time) for M = 1, 4, 16 against the
bf16 GEMV/cuBLAS path, and the large-M choice for fp8 (Triton vs torch._scaled_mm) and the
int formats (Triton vs dequantise → cuBLAS); at M = 1 the int formats also through the
conversion kernel int_gemv replaced (int8_cvt, int4_cvt) and, with QUANT_BENCH_INT_GRID=1,
int_gemv's tilings. Weights rotate through several copies so L2
(50 MB) holds none of them. Writes quant_bench.json to --out.

Usage: python benchmarks/quant_bench.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from kiln.kernels import int_gemv, ops, quant_linear
from kiln.kernels.int_gemv import IntGemvConfig
from kiln.kernels.quant_linear import KIND_FP8, KIND_INT4, KIND_INT8
from kiln.quant.quantize import quantize_fp8_per_channel, quantize_int4, quantize_int8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
ROWS = tuple(int(m) for m in os.environ.get("QUANT_BENCH_ROWS", "1 4 16 512 4096").split())
COPIES = 4
# int_gemv tilings timed at M = 1 when QUANT_BENCH_INT_GRID is set: "1" for every
# combination below, or a list of rows x words x warps ("64x32x2 16x64x1"). 64 rows or 1 warp
# give a thread 8 rows: fewer x-side instructions per weight (BENCHMARKS.md, int4 roofline
# note). benchmarks/int_gemv_pick.py picks the fastest per format from the results.
_GRID = os.environ.get("QUANT_BENCH_INT_GRID", "")
INT_GEMV_GRID = [
    IntGemvConfig(block_n, tile_words, warps)
    for block_n, tile_words, warps in itertools.product((8, 16, 32, 64), (32, 64, 128),
                                                        (1, 2, 4, 8))
] if _GRID == "1" else [IntGemvConfig.parse(tag) for tag in _GRID.split()]


def timed(fn, iterations: int = 20) -> float:
    """µs per call: `iterations` calls captured in one CUDA graph, replayed, timed by CUDA
    events (the host's launch overhead, ~20-60 µs per Python call, would otherwise hide a
    20 µs kernel)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iterations):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iterations)
    times.sort()
    return times[len(times) // 2]


def write_results(out_dir, name: str, rows: list, **extra) -> Path:
    """OUT_DIR/NAME.json: the card, torch and triton versions, `extra` and the rows (what every
    quantised-kernel micro-benchmark here writes)."""
    import triton

    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "torch": torch.__version__,
              "triton": triton.__version__, **extra, "rows": rows}
    path.write_text(json.dumps(report, indent=1))
    return path


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    results = []
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(COPIES)]
        formats = {
            "bf16": [(w.to(torch.bfloat16),) for w in weights],
            "fp8": [quantize_fp8_per_channel(w) for w in weights],
            "int8": [quantize_int8(w, k) for w in weights],
            "int4": [quantize_int4(w, 128) for w in weights],
        }
        del weights
        for m in ROWS:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            turn = [0]

            def pick(fmt):
                turn[0] = (turn[0] + 1) % COPIES
                return formats[fmt][turn[0]]

            runs = {
                "bf16": lambda: ops.linear(x, *pick("bf16"), None),
                "fp8": lambda: ops.fp8_linear(x, *pick("fp8"), None, None),
                "int8": lambda: ops.int8_weight_only_linear(x, *pick("int8"), None),
                "int4": lambda: ops.int4_weight_only_linear(x, *pick("int4"), None),
            }
            if m == 1:  # the conversion kernel int_gemv replaces, then int_gemv's tilings
                runs["int8_cvt"] = lambda: quant_linear.quant_linear(x, KIND_INT8, *pick("int8"))
                runs["int4_cvt"] = lambda: quant_linear.quant_linear(x, KIND_INT4, *pick("int4"))
                for config in INT_GEMV_GRID:
                    tag = f"n{config.block_n}_t{config.tile_words}_w{config.num_warps}"
                    runs[f"int8_gemv_{tag}"] = (lambda c=config: int_gemv.int_gemv(
                        x, *pick("int8"), config=c))
                    runs[f"int4_gemv_{tag}"] = (lambda c=config: int_gemv.int_gemv(
                        x, *pick("int4"), config=c))
            if m > 16:
                runs["fp8_triton"] = lambda: quant_linear.quant_linear(x, KIND_FP8, *pick("fp8"))
                runs["int8_triton"] = lambda: quant_linear.quant_linear(x, KIND_INT8, *pick("int8"))
                runs["int4_triton"] = lambda: quant_linear.quant_linear(x, KIND_INT4, *pick("int4"))
                runs["int4_dequant_cublas"] = lambda: torch.nn.functional.linear(
                    x, quant_linear.dequantize(KIND_INT4, *pick("int4"), torch.bfloat16))
            for label, fn in runs.items():
                fmt = label.split("_")[0]
                try:
                    us = timed(fn, 5 if m > 16 else 20)
                except Exception as error:  # a failing path is reported, not fatal
                    results.append({"shape": name, "m": m, "path": label, "error": str(error)[:200]})
                    print(f"{name:8} M={m:5} {label:22} ERROR {str(error)[:120]}")
                    continue
                weight_bytes = nbytes(*formats[fmt][0])
                row = {"shape": name, "n": n, "k": k, "m": m, "path": label, "us": round(us, 2),
                       "weight_gb_s": round(weight_bytes / us / 1e3, 1),
                       "tflop_s": round(2 * m * n * k / us / 1e6, 1)}
                results.append(row)
                print(f"{name:8} M={m:5} {label:22} {us:9.1f} us {row['weight_gb_s']:8.1f} GB/s "
                      f"{row['tflop_s']:7.1f} TFLOP/s")
        del formats
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_bench.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
