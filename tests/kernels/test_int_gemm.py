"""The int8 / int4 weight-only GEMM of 65-128 rows (kiln/kernels/int_gemm.py: the skinny
kernels at 128 token columns with a token-block grid axis) against dequantise +
weight_only_linear_reference, under the CPU interpreter at small tiles and on a GPU at the
default ones. int8 tolerance as tests/kernels/test_skinny_int8.py (exact products, fp32 sums
in another order, one rounding to x's dtype); int4 as tests/kernels/test_skinny_int4.py."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.int_gemm import (
    IntGemmConfig,
    default_int_gemm_config,
    int_gemm,
    int_gemm_unsupported_reason,
)
from kiln.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    weight_only_linear_reference,
)
from kiln.quant.quantize import quantize_int4, quantize_int8
from tests.kernels.kernel_helpers import max_relative_error, weight_only_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def _quantised(fmt: str, m: int, n: int, k: int, dtype, device: str, seed: int = 0):
    """x, the kernel's weight tensors (weight, scale, zero or None), bias, and the dense
    dequantised weight the reference multiplies by."""
    x, weight, bias = weight_only_inputs(m, n, k, dtype, seed=seed)
    x[1] = 0
    if fmt.startswith("int8"):  # "int8": per channel; "int8-g64": groups of 64 inputs
        q, scale = quantize_int8(weight, int(fmt.partition("-g")[2] or k))
        tensors, dense = (q, scale, None), dequantize_int8(q, scale)
    else:
        packed, scale, zero = quantize_int4(weight, 128)
        tensors, dense = (packed, scale, zero), dequantize_int4(packed, scale, zero)
    return (x.to(device), tuple(t if t is None else t.to(device) for t in tensors),
            bias.to(device), dense)


def _assert_matches(fmt: str, out, x, dense, bias):
    expected = weight_only_linear_reference(x.cpu(), dense, bias.cpu())
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if fmt == "int4":
        assert max_relative_error(out.cpu(), expected) < 2**-7
        return
    if fmt != "int8":  # group scales: each weight rounded once to x's dtype on the GPU
        assert max_relative_error(out.cpu(), expected) < 2**-7
        return
    magnitude = x.cpu().float().abs() @ dense.abs().T
    allowed = magnitude * (2 * x.shape[1] + 8) * 2.0**-24 + expected.float().abs() * 2.0**-6
    difference = (out.cpu().float() - expected.float()).abs()
    assert (difference <= allowed).all(), (difference - allowed).max().item()


# Small tiles keep the interpreter quick; the token blocks, K splits (uneven: 3 int4 tiles or
# 5 int8 tiles in 2), partial weight blocks (N = 80) and masked token rows are what the GPU's
# default tiling meets too.
CONFIGS = [IntGemmConfig(64, 64, 32, 1, 4, 2), IntGemmConfig(64, 64, 64, 2, 4, 2)]


@pytest.mark.parametrize("config", CONFIGS, ids=["t32_unsplit", "t64_split2"])
@pytest.mark.parametrize("m", [65, 100, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int8", "int8-g16", "int8-g32", "int8-g64", "int4"])
def test_matches_reference(fmt, m, dtype, config, device, poison_outputs):
    x, tensors, bias, dense = _quantised(fmt, m, 80, 384 if fmt == "int4" else 320, dtype,
                                         device, seed=m)
    out = int_gemm(x, *tensors, bias, config=config)
    _assert_matches(fmt, out, x, dense, bias)


@pytest.mark.parametrize("fmt", ["int8", "int8-g64", "int8-g128", "int4"])
def test_default_config_on_the_gpu(fmt, device, poison_outputs):
    """The default tilings (128 token columns; 128 weight rows on 8 warps, or 64 on 4 for
    N = 4,096) at real widths: GPU only (the interpreter at that size takes minutes)."""
    if device == "cpu":
        pytest.skip("the default tilings run on the GPU (CPU: small tiles above)")
    for m, (n, k) in ((128, (6144, 4096)), (65, (4096, 14336)), (100, (200, 1152))):
        x, tensors, bias, dense = _quantised(fmt, m, n, k, torch.bfloat16, device, seed=n)
        _assert_matches(fmt, int_gemm(x, *tensors, bias), x, dense, bias)


def test_default_tiling_rule():
    """The H200 sweep's rule at Llama-3.1-8B's shapes: 64 weight rows a program for o and down
    (N = 4,096), 128 for q|k|v and gate|up; K in at most 4 while the programs are fewer than
    the SMs, each split ≥ 8 tiles and the partials within 8 MiB (q|k|v in 2 at 96-128 rows,
    in 4 at 64)."""
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
    configs = [default_int_gemm_config(128, *shape) for shape in shapes]
    assert [(c.block_n, c.num_warps, c.split_k) for c in configs] == [
        (128, 8, 2), (64, 4, 4), (128, 8, 1), (64, 4, 4)]
    assert default_int_gemm_config(96, 6144, 4096).split_k == 2
    assert default_int_gemm_config(64, 6144, 4096).split_k == 4
    assert default_int_gemm_config(128, 4096, 512).split_k == 1  # 8 tiles: no split


def test_unsupported_inputs_are_named(device):
    x, (weight, scale, _), bias, _ = _quantised("int8", 65, 64, 256, torch.bfloat16, device)
    _, (packed, scale4, zero), _, _ = _quantised("int4", 65, 64, 256, torch.bfloat16, device)
    too_many = torch.zeros(129, 256, dtype=torch.bfloat16, device=device)
    for arguments, message in (
            ((too_many, weight, scale, None, None), "x has 129 rows; this kernel takes 1-128"),
            ((too_many, packed, scale4, zero, None), "x has 129 rows; this kernel takes 1-128"),
            ((x.float(), weight, scale, None, None), "x must be bfloat16 or float16"),
            ((x, weight, torch.ones(64, 3, dtype=torch.float16, device=device), None, None),
             "the group size K / 3 must be a whole multiple of 16"),
            ((x, weight, torch.ones(64, 32, dtype=torch.float16, device=device), None, None),
             "the group size K / 32 must be a whole multiple of 16 (the MMA's K step)"),
            ((x[:, :128], weight, scale, None, None), "x must be a contiguous (M, K) tensor"),
            ((x[:, :128].contiguous(), weight, scale, None, None),
             "x has K=128 but weight has K=256"),
            ((x, weight.float(), scale, None, None), "weight must be a contiguous 2-D int8"),
            ((x, packed[:, :64], scale4, zero, None), "qweight must be contiguous uint8"),
            ((torch.zeros(65, 512, dtype=torch.bfloat16, device=device)[:, :256], packed,
              scale4, zero, None), "x must be a contiguous (M, K) tensor"),
            ((x, weight, torch.ones(64, 2, dtype=torch.float16, device=device)[:, :1], None,
              None), "scale must be contiguous float16 (64, groups)"),
            ((x, weight, scale, None, bias[:10]), "bias must be a contiguous (64,)")):
        assert message in int_gemm_unsupported_reason(*arguments)
        with pytest.raises(ValueError, match="int_gemm: "):
            int_gemm(*arguments)
    assert int_gemm_unsupported_reason(x, weight, scale, None, bias) is None
    assert int_gemm_unsupported_reason(x, packed, scale4, zero, bias) is None
    with pytest.raises(ValueError, match="tokens must be ≤ 256"):
        IntGemmConfig(tokens=512)
    with pytest.raises(ValueError, match="block_n must be ≥ 64"):
        IntGemmConfig(block_n=32)


def test_ops_dispatch(device, monkeypatch):
    """ops sends int8 (per channel) and int4 (integer zero points) linears here on Hopper
    (has_sm90, stood in for by the interpreter) for 65-128 rows, and for 17-64 where the
    Gluon twins do not run, unless KILN_INT_GEMM=0, int8 group scales included; 16 rows stay
    on quant_linear; 129 rows, int4 fractional zero points and int4 whose K would split
    dequantise; 17-64 rows go to the Gluon twins where they run."""
    from kiln.kernels import int_gemm as module
    from kiln.kernels import ops, skinny_int4, skinny_int8

    x, (weight, scale, _), bias, dense = _quantised("int8", 129, 80, 256, torch.bfloat16,
                                                    device, seed=3)
    _, (packed, scale4, zero), _, dense4 = _quantised("int4", 129, 80, 256, torch.bfloat16,
                                                      device, seed=3)
    monkeypatch.setattr(ops, "_fast", lambda tensor: True)
    monkeypatch.setattr(module, "has_sm90", lambda tensor: True)
    monkeypatch.setattr(skinny_int8, "has_sm90", lambda tensor: True)
    monkeypatch.setattr(skinny_int8, "gluon_usable", lambda tensor, weight: False)
    monkeypatch.setattr(skinny_int4, "gluon_usable", lambda tensor: False)
    calls = []
    small = IntGemmConfig(64, 64, 64, 1, 4, 2)  # keeps the interpreter quick
    real = module.launch_int_gemm
    monkeypatch.setattr(module, "launch_int_gemm", lambda *a, **kw: calls.append(
        (a[0].shape[0], a[3] is not None)) or real(*a, config=small))
    grouped_weight, grouped_scale = (t.to(device) for t in quantize_int8(
        torch.randn(80, 256, generator=torch.Generator().manual_seed(4)), 128))
    expected = weight_only_linear_reference(x.cpu(), dense, bias.cpu()).float()
    expected4 = weight_only_linear_reference(x.cpu(), dense4, bias.cpu()).float()
    for rows in (65, 128, 129, 17, 16):
        for out, reference in (
                (ops.int8_weight_only_linear(x[:rows], weight, scale, bias), expected),
                (ops.int4_weight_only_linear(x[:rows], packed, scale4, zero, bias,
                                             integer_zeros=True), expected4)):
            assert max_relative_error(out.cpu(), reference[:rows]) < 2**-7, rows
    assert calls == [(65, False), (65, True), (128, False), (128, True), (17, False),
                     (17, True)]
    grouped = ops.int8_weight_only_linear(x[:100], grouped_weight, grouped_scale, None)
    assert calls[6:] == [(100, False)]
    assert max_relative_error(grouped.cpu(), weight_only_linear_reference(
        x[:100].cpu(), dequantize_int8(grouped_weight.cpu(), grouped_scale.cpu()))) < 2**-7
    ops.int4_weight_only_linear(x[:100], packed, scale4, zero + 0.5, None, integer_zeros=False)
    assert len(calls) == 7
    # int4 whose GEMM would split K dequantises (measured slower there); int8 takes it
    x_long, (weight_long, scale_long, _), _, _ = _quantised("int8", 65, 80, 1024,
                                                            torch.bfloat16, device, seed=5)
    _, (packed_long, scale4_long, zero_long), _, _ = _quantised("int4", 65, 80, 1024,
                                                                torch.bfloat16, device, seed=5)
    assert default_int_gemm_config(65, 80, 1024).split_k == 2
    assert module.chosen_config(x_long, weight_long, scale_long, None, None) == (
        default_int_gemm_config(65, 80, 1024))
    assert module.chosen_config(x_long, packed_long, scale4_long, zero_long, None) is None
    # where the Gluon twins run, 17-64 rows are theirs
    monkeypatch.setattr(skinny_int8, "gluon_usable", lambda tensor, weight: True)
    monkeypatch.setattr(skinny_int4, "gluon_usable", lambda tensor: True)
    skinny = []
    monkeypatch.setattr(skinny_int8, "launch_skinny_int8",
                        lambda *a, **kw: skinny.append("int8") or a[0])
    monkeypatch.setattr(skinny_int4, "launch_skinny_int4",
                        lambda *a, **kw: skinny.append("int4") or a[0])
    ops.int8_weight_only_linear(x[:64], weight, scale, bias)
    ops.int4_weight_only_linear(x[:64], packed, scale4, zero, bias, integer_zeros=True)
    assert skinny == ["int8", "int4"] and len(calls) == 7
    monkeypatch.setenv("KILN_INT_GEMM", "0")
    ops.int8_weight_only_linear(x[:100], weight, scale, bias)
    ops.int4_weight_only_linear(x[:100], packed, scale4, zero, bias, integer_zeros=True)
    assert len(calls) == 7
