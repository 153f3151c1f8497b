"""Call C: grouped int8 (g64) at 2-16 rows on shapes whose K is not a multiple of 128 (so the
Gluon twin cannot run): skinny_int8's Triton kernel (default) against quant_linear's
converting kernel (KILN_SKINNY_INT8=0), µs per call in a CUDA graph, weights rotated."""
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
from quant_bench import timed  # noqa: E402

from kiln.kernels import ops  # noqa: E402
from kiln.quant.quantize import quantize_int8  # noqa: E402

for n, k in ((5760, 2880), (2880, 2880), (2880, 5760), (2560, 960)):
    copies = [quantize_int8(torch.randn(n, k, device="cuda") * 0.02, 64) for _ in range(4)]
    turn = [0]

    def pick():
        turn[0] = (turn[0] + 1) % 4
        return copies[turn[0]]

    for m in (2, 8, 16):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        row = []
        for flag in ("0", "1"):
            os.environ["KILN_SKINNY_INT8"] = flag
            row.append(timed(lambda: ops.int8_weight_only_linear(x, *pick(), None)))
        mb = n * k * (1 + 2 / 64) / 1e6
        print(f"{n}x{k} M={m:2}: quant_linear {row[0]:6.2f} us, skinny triton {row[1]:6.2f} us "
              f"({mb:.1f} MB: {mb / row[0] * 1e-3:.2f} / {mb / row[1] * 1e-3:.2f} TB/s)")
