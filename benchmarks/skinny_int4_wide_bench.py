"""int4 linears of 17-32 rows (decode batches, short prefills): the Gluon kernel at 32 token
columns (K split 1, 2, 4, 8) against what runs above its limit (dequantise to bf16 +
cuBLAS), µs per call on Llama-3.1-8B shapes (30 calls in one CUDA graph, weights
rotating through 4 copies so that L2 holds none); every output checked against the torch
reference first. (The 64-column rows of results/s18-h200-skinny-int4-wide-bench.json were
taken with the kernel's limit raised to 64, since lowered to 32 by that measurement.)
Usage (GPU machine): python3 benchmarks/skinny_int4_wide_bench.py OUT_DIR"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from quant_bench import timed  # benchmarks/ is the script's directory

from kiln.kernels import quant_linear, skinny_int4_gluon
from kiln.kernels.quant_linear import dequantize_int4, weight_only_linear_reference
from kiln.kernels.skinny_int4 import default_skinny_int4_config
from kiln.quant.quantize import quantize_int4

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 4


def main() -> None:
    out = Path(sys.argv[1])
    rows = []
    torch.manual_seed(0)
    for shape, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        packed, scale, zero = quantize_int4(weight, 128)
        del weight
        copies = [(packed.clone(), scale.clone(), zero.clone()) for _ in range(COPIES)]
        reference_weight = dequantize_int4(packed, scale, zero)
        for m in (17, 32):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            expected = weight_only_linear_reference(x, reference_weight).float()
            norm = expected.abs().max().item()
            default = default_skinny_int4_config(m, n, k, True)
            line = {}

            def measure(name, call):
                error = (call(0).float() - expected).abs().max().item() / norm
                assert error < 2**-7, (shape, m, name, error)
                us = timed(lambda counter=itertools.count(): call(next(counter)), 30)
                rows.append({"shape": shape, "m": m, "kernel": name, "us": round(us, 2),
                             "max_rel_err": error})
                line[name] = us

            def dequantised(i):
                dense = quant_linear.dequantize(quant_linear.KIND_INT4, *copies[i % COPIES],
                                                x.dtype)
                return torch.nn.functional.linear(x, dense)

            measure("dequantise+cuBLAS", dequantised)
            for split in (1, 2, 4, 8):
                def gluon(i, split=split):
                    return skinny_int4_gluon.launch(x, *copies[i % COPIES], None, split,
                                                    default.tokens, 0)
                measure(f"gluon split {split}" + (" (default)" if split == default.split_k
                                                  else ""), gluon)
            print(f"{shape:8s} M={m:2d}: " + ", ".join(f"{name} {us:.1f}"
                                                      for name, us in line.items()), flush=True)
        del copies
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "skinny_int4_wide_bench.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
