"""Weight-only linears above 16 rows (prefill, big decode batches): the dequantise kernel's
tilings, cuBLAS on the dense weight, and int8's Triton GEMM (quant_linear), µs per call on
Llama-3.1-8B shapes (each timed as 10 calls in one CUDA graph).
Usage (GPU machine):
    python3 benchmarks/dequantize_bench.py OUT_DIR [--base PATH/TO/kiln/kernels/quant_linear.py]
--base also times another tree's `dequantize` (the A/B of a change to it)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quant_bench import timed, write_results  # noqa: E402

from kiln.kernels import quant_linear  # noqa: E402
from kiln.quant.quantize import quantize_int4, quantize_int8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (32, 128, 512, 2048)
TRITON_ROWS = (32, 128, 512)


def load_base(path: str):
    spec = importlib.util.spec_from_file_location("base_quant_linear", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--base", help="another tree's kiln/kernels/quant_linear.py")
    args = parser.parse_args()
    base = load_base(args.base) if args.base else None
    rows = []

    def record(shape: str, kind: str, what: str, us: float) -> float:
        rows.append({"shape": shape, "kind": kind, "what": what, "us": round(us, 2)})
        return us

    torch.manual_seed(0)
    for shape, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        int4 = quantize_int4(weight, 128)
        int8 = quantize_int8(weight, k)  # per channel
        del weight
        line = []
        for kind, packed, zero, name in ((quant_linear.KIND_INT4, int4, int4[2], "int4"),
                                         (quant_linear.KIND_INT8, int8, None, "int8")):
            reference = (quant_linear.dequantize_int4(*int4) if zero is not None
                         else quant_linear.dequantize_int8(*int8)).to(torch.bfloat16)
            tensors = (kind, packed[0], packed[1], zero, torch.bfloat16)
            if base is not None:
                assert torch.equal(base.dequantize(*tensors), reference), (shape, name, "base")
                us = record(shape, name, "dequantize_base",
                            timed(lambda: base.dequantize(*tensors), 10))
                line.append(f"{name} base {us:.0f}")
            best = None
            for block_n, block_k in itertools.product((16, 32, 64), (128, 256, 512)):
                def call(block_n=block_n, block_k=block_k):
                    return quant_linear.dequantize(*tensors, block_n=block_n, block_k=block_k)
                assert torch.equal(call(), reference), (shape, name, block_n, block_k)
                us = record(shape, name, f"dequantize_n{block_n}_k{block_k}", timed(call, 10))
                if best is None or us < best[0]:
                    best = (us, block_n, block_k)
            moved = n * k * 2 + packed[0].numel()  # dense bf16 written + packed weights read
            line.append(f"{name} best {best[0]:.0f} µs (n{best[1]} k{best[2]}, "
                        f"{moved / best[0] / 1e3:.0f} GB/s)")
        dense = quant_linear.dequantize_int4(*int4).to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            us = record(shape, "bf16", f"linear_m{m}",
                        timed(lambda: torch.nn.functional.linear(x, dense), 10))
            text = f"M={m} cuBLAS {us:.0f}"
            if m in TRITON_ROWS:
                us = record(shape, "int8", f"triton_m{m}", timed(
                    lambda: quant_linear.quant_linear(x, quant_linear.KIND_INT8, *int8), 10))
                text += f" int8 Triton GEMM {us:.0f}"
            line.append(text)
        print(f"{shape}: " + " | ".join(line), flush=True)
        del dense
        torch.cuda.empty_cache()
    write_results(args.out, "dequantize_bench", rows)


if __name__ == "__main__":
    main()
