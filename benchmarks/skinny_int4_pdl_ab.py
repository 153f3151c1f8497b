"""The Gluon int4 decode kernel (kernels/skinny_int4_gluon.py) at its default configs, launched
with and without programmatic dependent launch, same code: µs per call (30 calls in one CUDA
graph, weights rotating through 6 copies so that L2 holds none), each output first checked
against the torch reference. Llama-3.1-8B shapes at M = 1, 4, 8, 16.
Usage (GPU machine): python3 benchmarks/skinny_int4_pdl_ab.py OUT_DIR"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from quant_bench import timed  # benchmarks/ is the script's directory

from kiln.kernels import skinny_int4_gluon
from kiln.kernels.quant_linear import dequantize_int4, weight_only_linear_reference
from kiln.kernels.skinny_int4 import default_skinny_int4_config
from kiln.quant.quantize import quantize_int4

SHAPES = {"qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 6


def main() -> None:
    out = Path(sys.argv[1])
    rows = []
    torch.manual_seed(0)
    for shape, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        packed, scale, zero = quantize_int4(weight, 128)
        del weight
        copies = [(packed.clone(), scale.clone(), zero.clone()) for _ in range(COPIES)]
        nbytes = packed.numel() + 4 * scale.numel()
        reference_weight = dequantize_int4(packed, scale, zero)
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            expected = weight_only_linear_reference(x, reference_weight).float()
            norm = expected.abs().max().item()
            config = default_skinny_int4_config(m, n, k, True)
            line = {}
            for pdl in (False, True):
                def call(i, pdl=pdl):
                    return skinny_int4_gluon.launch(x, *copies[i % COPIES], None, config.split_k,
                                                    config.tokens, config.stages, pdl)
                error = (call(0).float() - expected).abs().max().item() / norm
                assert error < 2**-7, (shape, m, pdl, error)
                us = timed(lambda counter=itertools.count(), call=call: call(next(counter)), 30)
                rows.append({"shape": shape, "m": m, "pdl": pdl, "stages": config.stages,
                             "split_k": config.split_k, "us": round(us, 2),
                             "gb_s": round(nbytes / us / 1e3, 1), "max_rel_err": error})
                line[pdl] = us
            print(f"{shape:8s} M={m:2d} stages={config.stages} split={config.split_k}: "
                  f"no PDL {line[False]:.2f} µs, PDL {line[True]:.2f} µs", flush=True)
        del copies
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "skinny_int4_pdl_ab.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
