"""int8-wo at 96 / 128 rows: int_gemm tilings incl. 4 stages and 64 token columns, against
dequantise + cuBLAS, Llama-3.1-8B shapes, µs (checked first)."""
import sys
sys.path.insert(0, "benchmarks")
import itertools
import torch
from skinny_int8_bench import SHAPES, _time
from kiln.kernels import quant_linear
from kiln.kernels.int_gemm import IntGemmConfig, default_int_gemm_config, int_gemm
from kiln.kernels.quant_linear import dequantize_int8, weight_only_linear_reference
from kiln.quant.quantize import quantize_int8

COPIES = 6
torch.manual_seed(0)
rows = []
for shape, (n, k) in SHAPES.items():
    weight = torch.randn(n, k, device="cuda") * 0.02
    q, scale = quantize_int8(weight, k)
    del weight
    copies = [(q.clone(), scale.clone()) for _ in range(COPIES)]
    nbytes = q.numel() + scale.numel() * 2
    for m in (96, 128):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        expected = weight_only_linear_reference(x, dequantize_int8(q, scale)).float()
        d = default_int_gemm_config(m, n, k)
        variants = {f"default n{d.block_n} s{d.split_k}":
                    lambda i: int_gemm(x, *copies[i % COPIES])}
        for tokens, block_n, block_k, split, stages in itertools.product(
                (64, 128), (64, 128), (64, 128), (1, 2, 4), (3, 4)):
            if block_k == 128 and stages == 4:
                continue
            c = IntGemmConfig(block_n, block_k, tokens, split, block_n // 16, stages)
            variants[f"t{tokens} n{block_n} k{block_k} s{split} st{stages}"] = (
                lambda i, c=c: int_gemm(x, *copies[i % COPIES], config=c))
        _time(variants, expected, expected.abs().max().item(), shape, m, nbytes, rows)
    del copies
    torch.cuda.empty_cache()
