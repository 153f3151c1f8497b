"""cuBLAS (torch.nn.functional.linear) time and TFLOP/s at the Llama-3.1-8B projection shapes
for the row counts a decode or mixed step has. Tells how far a step's GEMMs sit from the
8192³ peak and which shapes lose most. Usage (GPU machine):
    python3 benchmarks/gemm_shapes.py [--rows 256 512 1024 2048 8192] [--out DIR]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, out_features N, in_features K, launches per step)
SHAPES = [("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32),
          ("down", 4096, 14336, 32), ("lm_head", 128256, 4096, 1)]


def time_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[256, 512, 768, 1024, 2048, 8192])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    peak_a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak_us = time_us(lambda: peak_a @ peak_a, reps=10)
    peak = 2 * 8192**3 / peak_us / 1e6
    print(f"8192^3 bf16 matmul: {peak:.0f} TFLOP/s")
    report = {"peak_tflops": peak, "rows": {}}
    for rows in args.rows:
        x = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16)
        line, step_us, step_flop = [], 0.0, 0.0
        for name, n, k, count in SHAPES:
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            xk = x[:, :k].contiguous()
            us = time_us(lambda: F.linear(xk, weight))
            flop = 2 * rows * n * k
            report["rows"].setdefault(rows, {})[name] = {"us": us, "tflops": flop / us / 1e6}
            line.append(f"{name} {us:7.1f}us {flop / us / 1e6:4.0f}")
            step_us += us * count
            step_flop += flop * count
            del weight
        report["rows"][rows]["step"] = {"us": step_us, "tflops": step_flop / step_us / 1e6,
                                        "at_peak_us": step_flop / peak / 1e6}
        print(f"M={rows:5d}: " + " | ".join(line)
              + f" || step GEMMs {step_us / 1e3:.2f} ms = {step_flop / step_us / 1e6:.0f} TFLOP/s"
              f" (peak {step_flop / peak / 1e9:.2f} ms)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemm_shapes.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
