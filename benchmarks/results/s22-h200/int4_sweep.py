"""int4-wo at 96 / 128 rows: int_gemm tilings (token columns 64 / 128, weight rows, warps,
splits) against dequantise + cuBLAS, Llama-3.1-8B shapes, µs (checked first)."""
import sys
sys.path.insert(0, "benchmarks")
import torch
from skinny_int8_bench import SHAPES, _time
from kiln.kernels import quant_linear
from kiln.kernels.int_gemm import IntGemmConfig, int_gemm
from kiln.kernels.quant_linear import dequantize_int4, weight_only_linear_reference
from kiln.quant.quantize import quantize_int4

COPIES = 6
torch.manual_seed(0)
rows = []
for shape, (n, k) in SHAPES.items():
    weight = torch.randn(n, k, device="cuda") * 0.02
    int4 = quantize_int4(weight, 128)
    del weight
    copies = [tuple(t.clone() for t in int4) for _ in range(COPIES)]
    nbytes = sum(t.numel() * t.element_size() for t in int4)
    for m in (96, 128):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        expected = weight_only_linear_reference(x, dequantize_int4(*int4)).float()
        variants = {"dequant": lambda i: torch.nn.functional.linear(
            x, quant_linear.dequantize(quant_linear.KIND_INT4, *copies[i % COPIES], x.dtype))}
        for tokens in (64, 128):
            for block_n, warps in ((64, 4), (128, 8), (128, 4)):
                for split in (1, 2):
                    for stages in ((2, 3) if tokens == 64 else (3,)):
                        c = IntGemmConfig(block_n, 128, tokens, split, warps, stages)
                        variants[f"t{tokens} n{block_n} w{warps} s{split} st{stages}"] = (
                            lambda i, c=c: int_gemm(x, *copies[i % COPIES], config=c))
        _time(variants, expected, expected.abs().max().item(), shape, m, nbytes, rows)
    del copies
    torch.cuda.empty_cache()
