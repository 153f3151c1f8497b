"""Call D: grouped int8 (g64) at 8 rows, K not a multiple of 128 (64-deep K tiles): skinny_int8's
Triton kernel at split K 1-8 against quant_linear, weights rotated through 8 copies (L2 holds
none), µs per call in a CUDA graph."""
import sys

import torch

sys.path.insert(0, "benchmarks")
from quant_bench import timed  # noqa: E402

from kiln.kernels import quant_linear, skinny_int8  # noqa: E402
from kiln.kernels.skinny_fp8 import SkinnyFp8Config  # noqa: E402
from kiln.quant.quantize import quantize_int8  # noqa: E402

for n, k in ((5760, 2880), (2880, 2880), (2880, 5760), (2560, 960), (1536, 576)):
    copies = [quantize_int8(torch.randn(n, k, device="cuda") * 0.02, 64) for _ in range(8)]
    turn = [0]

    def pick():
        turn[0] = (turn[0] + 1) % 8
        return copies[turn[0]]

    x = torch.randn(8, k, device="cuda").to(torch.bfloat16)
    out = [f"ql {timed(lambda: quant_linear.quant_linear(x, quant_linear.KIND_INT8, *pick())):.1f}",
           f"default {timed(lambda: skinny_int8.launch_skinny_int8(x, *pick(), gluon=False)):.1f}"]
    for split in (1, 2, 4, 8):
        config = SkinnyFp8Config(64, 256, tokens=16, split_k=split)
        out.append(f"s{split} {timed(lambda: skinny_int8.launch_skinny_int8(x, *pick(), config=config, gluon=False)):.1f}")
    print(f"{n}x{k} M=8: " + ", ".join(out), flush=True)
