"""The decode W4A16 tensor-core GEMM (kernels/skinny_int4.py) against its torch reference: on
the CPU through the interpreter (shifts and masks, fp32 products: the unpacking twin and
every index), on a GPU the same tests run the PTX unpacking, in the Triton kernel and in its
Gluon twin (kernels/skinny_int4_gluon.py), at these shapes, and tests/gpu/test_quant_gpu.py
at real ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.kernels import ops, skinny_int4 as skinny_int4_module
from kiln.kernels.quant_linear import dequantize_int4, weight_only_linear_reference
from kiln.kernels.skinny_int4 import (
    SkinnyInt4Config,
    default_skinny_int4_config,
    skinny_int4_linear,
    skinny_int4_unsupported_reason,
)
from kiln.quant.quantize import pack_int4, quantize_int4
from tests.kernels.kernel_helpers import (
    assert_rows_do_not_depend_on_the_batch,
    max_relative_error,
    weight_only_inputs,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# 16-row programs so the interpreter runs a partial last block (N = 40) and several K tiles.
SMALL = SkinnyInt4Config(block_n=16, subtiles=1, tokens=8)
_inputs = weight_only_inputs
_relative = max_relative_error


@pytest.mark.parametrize("m,group_size,config", [
    (1, 128, SMALL),
    (3, 256, SkinnyInt4Config(block_n=16, subtiles=2, tokens=8, paired=False)),
    # tokens → 16; Gluon: a 3-stage ring over programs of 1-2 tiles (copies past the end)
    (9, 128, SkinnyInt4Config(block_n=16, subtiles=1, tokens=8, split_k=3, stages=3)),
    (16, 512, SkinnyInt4Config(block_n=32, subtiles=2, tokens=16, split_k=2, stages=2)),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gluon", [True, False])  # the Gluon twin on sm_90 (CPU: the same)
def test_matches_reference(m, group_size, config, dtype, gluon, device, poison_outputs):
    config = dataclasses.replace(config, gluon=gluon)
    x, weight, bias = _inputs(m, 40, 512, dtype, seed=m)
    packed, scale, zero = quantize_int4(weight, group_size)
    out = skinny_int4_linear(x.to(device), packed.to(device), scale.to(device),
                             zero.to(device), bias.to(device), config=config)
    expected = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero), bias)
    assert out.dtype == dtype and out.shape == (m, 40)
    assert _relative(out.cpu(), expected) < 2**-7


@pytest.mark.parametrize("paired,gluon", [(True, False), (False, False), (True, True)])
def test_every_nibble_in_every_position_reaches_its_column(paired, gluon, device):
    """x one-hot per column: y[n] is exactly q[n, column] − z (small integers, no rounding),
    so a nibble unpacked into the wrong column (or x permuted differently from the weights)
    fails here, in both column orders."""
    k, n = 128, 16
    q = torch.arange(n * k).remainder(16).reshape(n, k)
    q = q[:, torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    ones = torch.ones(n, 1, dtype=torch.float16, device=device)
    zero = torch.full((n, 1), 3.0, dtype=torch.float16, device=device)
    config = SkinnyInt4Config(block_n=16, subtiles=1, tokens=8, paired=paired, gluon=gluon)
    packed = pack_int4(q).to(device)
    for column in range(k):
        x = torch.zeros(1, k, dtype=torch.bfloat16)
        x[0, column] = 1.0
        y = skinny_int4_linear(x.to(device), packed, ones, zero, config=config)
        assert torch.equal(y.cpu()[0].float(), (q[:, column] - 3).float()), column


def test_default_configs_split_short_matrices():
    """Few column blocks split K (the H200 has 132 SMs); a wide matrix does not. Each kernel
    has its measured rule; the Gluon twin takes 8 token columns up to 8 rows."""
    splits = {shape: default_skinny_int4_config(4, *shape).split_k
              for shape in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))}
    assert list(splits.values()) == [4, 8, 4, 8]
    assert default_skinny_int4_config(4, 4096, 4096).tokens == 8
    assert default_skinny_int4_config(9, 4096, 4096).tokens == 16
    # the Gluon twin at 17-32 rows: 32 token columns, K in 4 on every shape, register path
    wide = [default_skinny_int4_config(m, *shape) for m in (17, 32) for shape in splits]
    assert {(c.tokens, c.split_k, c.stages) for c in wide} == {(32, 4, 0)}
    # at 33-64 rows: 64 token columns, K split while under 256 programs (at most in 4)
    for m in (33, 64):
        widest = [default_skinny_int4_config(m, *shape) for shape in splits]
        assert [(c.tokens, c.split_k, c.stages) for c in widest] == [
            (64, 2, 0), (64, 4, 0), (64, 1, 0), (64, 4, 0)]
    # Programs of ≥ 12 sub-tiles (gate|up unsplit, down in 8) take the staged ring, gate|up
    # split to 8 sub-tiles a program; above 8 rows (16 token columns, x twice the size)
    # gate|up keeps the register path unsplit.
    stages = [default_skinny_int4_config(4, *shape).stages for shape in splits]
    assert stages == [0, 0, 4, 4]
    assert default_skinny_int4_config(16, 28672, 4096).stages == 0
    assert default_skinny_int4_config(16, 28672, 4096).split_k == 1
    triton_splits = [default_skinny_int4_config(4, *shape, gluon=False).split_k
                     for shape in splits]
    assert triton_splits == [4, 4, 1, 8]
    assert not default_skinny_int4_config(1, 64, 256, gluon=False).gluon
    assert default_skinny_int4_config(1, 64, 256).split_k == 1  # too few tiles to split


def test_one_row_goes_to_the_gluon_twin_only_for_large_matrices(monkeypatch):
    """skinny_int4.takes_batch1: one row comes here only where the Gluon twin runs and the
    matrix is larger than 4096 x 4096 (int_gemv measured faster at that size), unless
    KILN_SKINNY_INT4_BATCH1=0."""
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    assert not skinny_int4_module.takes_batch1(x, 6144, 4096)  # CPU: no Gluon
    monkeypatch.setattr(skinny_int4_module, "gluon_usable", lambda tensor: True)
    assert skinny_int4_module.takes_batch1(x, 6144, 4096)
    assert not skinny_int4_module.takes_batch1(x, 4096, 4096)
    monkeypatch.setenv("KILN_SKINNY_INT4_BATCH1", "0")
    assert not skinny_int4_module.takes_batch1(x, 6144, 4096)


def test_ops_dispatch(device, monkeypatch):
    """ops sends int4 linears of 2-16 rows with 128-multiple groups and integer zero points
    here; one row stays on int_gemv; KILN_SKINNY_INT4=0 keeps the previous kernels; other
    group sizes, and zero points not known to be integers, never come here."""
    x, weight, bias = _inputs(4, 24, 256, seed=4)
    packed, scale, zero = quantize_int4(weight, 128)
    args = [t.to(device) for t in (x, packed, scale, zero, bias)]
    monkeypatch.setattr(ops, "_fast", lambda tensor: True)  # the interpreter stands in for CUDA
    calls = []
    real = skinny_int4_module.launch_skinny_int4
    monkeypatch.setattr(skinny_int4_module, "launch_skinny_int4",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    expected = weight_only_linear_reference(x, dequantize_int4(packed, scale, zero), bias)

    def run(rows=4, **kwargs):
        out = ops.int4_weight_only_linear(args[0][:rows], *args[1:], **kwargs)
        assert _relative(out.cpu(), expected[:rows]) < 2**-7

    run(integer_zeros=True)
    run(rows=1, integer_zeros=True)
    run()  # integer zero points not vouched for
    assert calls == [4]
    monkeypatch.setenv("KILN_SKINNY_INT4", "0")
    run(integer_zeros=True)
    monkeypatch.delenv("KILN_SKINNY_INT4")
    packed64, scale64, zero64 = quantize_int4(weight, 64)
    ops.int4_weight_only_linear(args[0], packed64.to(device), scale64.to(device),
                                zero64.to(device), args[4], integer_zeros=True)
    assert calls == [4]


def test_layers_vouch_for_integer_zero_points_once(monkeypatch):
    """kiln/quant/int4.integer_zero_points: whole-number zero points are found once per layer
    and remembered; fractional ones (GGUF Q4_1) are not vouched for; nothing is looked at for
    CPU tensors or inside a CUDA-graph capture; new weights are looked at again."""
    from types import SimpleNamespace

    from kiln.quant.int4 import integer_zero_points

    layer = SimpleNamespace(weight_zero=torch.tensor([[3.0, 8.0]], dtype=torch.float16))
    cpu_x = torch.zeros(1, 2)
    assert integer_zero_points(layer, cpu_x) is False
    assert getattr(layer, "integer_zero_points", None) is None
    cuda_like = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert integer_zero_points(layer, cuda_like) is False
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert integer_zero_points(layer, cuda_like) is True and layer.integer_zero_points is True
    layer.weight_zero = torch.tensor([[3.5, 8.0]], dtype=torch.float16)
    assert integer_zero_points(layer, cuda_like) is True  # remembered
    layer.integer_zero_points = None  # what loading or quantising a layer's weights does
    assert integer_zero_points(layer, cuda_like) is False


def test_unsupported_inputs_are_named(device, monkeypatch):
    n, k = 8, 256
    packed = torch.zeros(n, k // 2, dtype=torch.uint8)
    scale = torch.ones(n, 2, dtype=torch.float16)
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    assert skinny_int4_unsupported_reason(x.to(device), packed.to(device), scale.to(device),
                                          scale.to(device)) is None
    for bad_x, message in ((torch.zeros(33, k, dtype=torch.bfloat16), "x has 33 rows"),
                           (torch.zeros(1, k), "bfloat16 or float16"),
                           (torch.zeros(1, k, dtype=torch.bfloat16, device="meta"),
                            "Triton runs on CUDA")):
        assert message in skinny_int4_unsupported_reason(bad_x, packed, scale, scale)
    assert "uint8 (N, 128)" in skinny_int4_unsupported_reason(x, packed[:, :64], scale, scale)
    x192 = torch.zeros(1, 192, dtype=torch.bfloat16)
    assert "multiple of 128" in skinny_int4_unsupported_reason(
        x192, torch.zeros(n, 96, dtype=torch.uint8), scale[:, :1], scale[:, :1])
    four = torch.ones(n, 4, dtype=torch.float16)
    assert "group size must be a multiple of 128" in skinny_int4_unsupported_reason(
        x, packed, four, four)
    assert "zero must be float16" in skinny_int4_unsupported_reason(x, packed, scale,
                                                                     scale.float())
    misaligned = torch.zeros(n * k // 2 + 1, dtype=torch.uint8)[1:].view(n, k // 2)
    assert "4-byte boundary" in skinny_int4_unsupported_reason(x, misaligned, scale, scale)
    with pytest.raises(ValueError, match="skinny_int4_linear: x has 65 rows"):
        skinny_int4_linear(torch.zeros(65, k, device=device, dtype=torch.bfloat16),
                           packed.to(device), scale.to(device), scale.to(device))
    # 17-64 rows only where the Gluon twin runs (its token columns go to 64)
    on_device = [t.to(device) for t in (torch.zeros(17, k, dtype=torch.bfloat16), packed, scale)]
    x17, packed_on_device, scale_on_device = on_device
    monkeypatch.setattr(skinny_int4_module, "gluon_usable", lambda tensor: False)
    assert "x has 17 rows; this kernel takes 1-16" in skinny_int4_unsupported_reason(
        x17, packed_on_device, scale_on_device, scale_on_device)
    monkeypatch.setattr(skinny_int4_module, "gluon_usable", lambda tensor: True)
    assert skinny_int4_unsupported_reason(x17, packed_on_device, scale_on_device,
                                          scale_on_device) is None
    assert "takes 1-64" in skinny_int4_unsupported_reason(
        torch.zeros(65, k, dtype=torch.bfloat16, device=device), packed_on_device,
        scale_on_device, scale_on_device)
    monkeypatch.undo()
    for bad, message in ((dict(block_n=48), "block_n must be a power of 2"),
                         (dict(subtiles=3), "subtiles must be a power of 2"),
                         (dict(tokens=4), "tokens must be 8, 16, 32 or 64"),
                         (dict(split_k=0), "split_k must be 1..16"),
                         (dict(stages=1), r"stages must be 0 \(registers\) or 2..8")):
        with pytest.raises(ValueError, match=message):
            SkinnyInt4Config(**bad)


def test_staged_variant_refuses_x_larger_than_its_shared_memory():
    """The staged Gluon variant keeps a program's x in shared memory: a config whose K range
    does not fit is refused with the fix named, before any launch (the defaults always fit)."""
    from kiln.kernels.skinny_int4_gluon import staged_shared_bytes, staged_unsupported_reason

    reason = staged_unsupported_reason(4096, 1, 16, 3)
    assert "4096 columns of 16 tokens" in reason and "raise split_k or use stages=0" in reason
    assert staged_unsupported_reason(4096, 1, 16, 0) is None  # the register path keeps no x
    for m, n, k in ((1, 28672, 4096), (4, 28672, 4096), (8, 28672, 4096), (8, 6144, 4096),
                    (8, 4096, 14336)):
        config = default_skinny_int4_config(m, n, k)
        assert staged_unsupported_reason(k, config.split_k, config.tokens, config.stages) is None
    assert staged_shared_bytes(4096, 4, 8, 3) < 32 * 1024  # gate|up's default: ~3 programs/SM


def test_batch_invariant_rows_take_one_tiling(device, monkeypatch, poison_outputs):
    """KILN_BATCH_INVARIANT=1: int4 linears of 1-16 rows (integer zero points) all run here on
    16 token columns and one K split (never int_gemv at one row), and a row's bits do not
    depend on the others' (the interpreter's dot here; the GPU kernels in tests/gpu/
    test_batch_invariant_gpu.py)."""
    x, weight, bias = _inputs(16, 80, 512, seed=12)
    packed, scale, zero = (t.to(device) for t in quantize_int4(weight, 128))
    x, bias = x.to(device), bias.to(device)
    configs = assert_rows_do_not_depend_on_the_batch(
        monkeypatch, skinny_int4_module, "launch_skinny_int4",
        lambda rows: ops.int4_weight_only_linear(rows, packed, scale, zero, bias,
                                                 integer_zeros=True), x)
    assert configs[0].tokens == 16
