"""Launches skinny_int4 (default tiling) and, at one row, int_gemv on one Llama-3.1-8B shape a
few times, for Nsight Compute to read. Usage (GPU machine):
    ncu --clock-control none --kernel-name regex:"_skinny_int4_kernel|_int_gemv_kernel" \
        --launch-skip 2 --launch-count 2 --section WarpStateStats --section Occupancy ... \
        python3 benchmarks/skinny_int4_ncu.py gate_up 1"""

from __future__ import annotations

import sys

import torch

from kiln.kernels import int_gemv
from kiln.kernels.skinny_int4 import launch_skinny_int4
from kiln.quant.quantize import quantize_int4

n, k = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}[sys.argv[1]]
m = int(sys.argv[2])
w = torch.randn(n, k, device="cuda") * 0.02
packed, scale, zero = quantize_int4(w, 128)
x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
for _ in range(3):
    launch_skinny_int4(x, packed, scale, zero, None)
    if m == 1:
        int_gemv.launch_int_gemv(x, packed, scale, zero, None)
torch.cuda.synchronize()
