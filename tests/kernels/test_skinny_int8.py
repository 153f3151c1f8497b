"""The W8A16 skinny GEMM (kiln/kernels/skinny_int8.py: skinny_fp8's kernel with int8 weights,
and on sm_90 its Gluon twin, kernels/skinny_int8_gluon.py) against dequantize_int8 +
weight_only_linear_reference (the CPU interpreter here, small shapes, where `gluon=True` falls
back to the Triton kernel; the same tests run on a GPU, both kernels).

Tolerance. int8 weights are exact in bf16 and fp16, and a weight times a 16-bit activation is
exact in fp32, so kernel and reference differ only in the order their fp32 sums round (tiles,
the MMA's internal order, split-K partials): each side within (K-1)·2^-24 of Σ|q·x|·s, the
two within (2K + 8)·2^-24·Σ|q·x|·s (the 8: scaling and the bias add); then the rounding to
x's dtype, where the interpreter truncates and torch rounds: two units in the last place
(2^-6 of the value for bf16; fp16's 2^-9 is inside that).
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.quant_linear import dequantize_int8, weight_only_linear_reference
from kiln.kernels.skinny_fp8 import SkinnyFp8Config
from kiln.kernels.skinny_int8 import (
    default_gluon_split_and_tokens,
    skinny_int8_linear,
    skinny_int8_unsupported_reason,
)
from kiln.quant.quantize import quantize_int8
from tests.kernels.kernel_helpers import assert_rows_do_not_depend_on_the_batch

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# (N, K, bias): N = 80 leaves a partial 64-row block; K = 384 is 3 tiles of 128, which a
# split of 2 divides unevenly.
SHAPES = [(80, 512, True), (128, 384, False)]


def _weights(n: int, k: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) * 0.05
    q, scale = quantize_int8(w, k)  # per output channel: scale (N, 1) float16
    bias = torch.randn(n, generator=generator) * 0.1
    return q.to(device), scale.to(device), bias.to(device)


def _x(m: int, k: int, dtype, device: str, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if m > 2:
        x[1] = 0
    return x.to(device)


def _assert_matches(out, x, weight, scale, bias, rounded_weights: bool = False):
    """rounded_weights: the kernel rounds each dequantised weight to x's dtype (group scales),
    2^-9 of it for bf16."""
    expected = weight_only_linear_reference(x, dequantize_int8(weight, scale), bias)
    magnitude = x.float().abs() @ dequantize_int8(weight, scale).abs().T
    allowed = magnitude * (2 * x.shape[1] + 8) * 2.0**-24 + expected.float().abs() * 2.0**-6
    if rounded_weights:
        allowed += magnitude * 2.0**-9
    difference = (out.float() - expected.float()).abs()
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert (difference <= allowed).all(), (difference - allowed).max().item()


@pytest.mark.parametrize("gluon", [True, False])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("n,k,has_bias", SHAPES)
def test_matches_reference(m, split_k, n, k, has_bias, gluon, device, poison_outputs):
    weight, scale, bias = _weights(n, k, device)
    bias = bias.to(torch.bfloat16) if has_bias else None
    x = _x(m, k, torch.bfloat16, device)
    config = SkinnyFp8Config(64, 128, 16, split_k, num_stages=2)
    out = skinny_int8_linear(x, weight, scale, bias, config=config, gluon=gluon)
    _assert_matches(out, x, weight, scale, bias)


@pytest.mark.parametrize("gluon", [True, False])
@pytest.mark.parametrize("m", [2, 8, 11])
def test_eight_token_tiles_and_float16(m, gluon, device, poison_outputs):
    """tokens = 8 up to 8 rows; more are raised to 16 columns, not truncated; fp16 x."""
    weight, scale, bias = _weights(64, 256, device, seed=2)
    x = _x(m, 256, torch.float16, device, seed=3)
    config = SkinnyFp8Config(64, 128, tokens=8, split_k=2, num_stages=2)
    out = skinny_int8_linear(x, weight, scale, bias.to(torch.float16), config=config,
                             gluon=gluon)
    _assert_matches(out, x, weight, scale, bias.to(torch.float16))


@pytest.mark.parametrize("m", [1, 5, 16])
def test_default_config(m, device, poison_outputs):
    """The default configs (the Gluon twin's on sm_90); K = 1152 is 9 sub-tiles of 128, which
    the default splits unevenly; N = 200 a partial 64-row block."""
    weight, scale, bias = _weights(200, 1152, device, seed=4)
    x = _x(m, 1152, torch.bfloat16, device, seed=5)
    out = skinny_int8_linear(x, weight, scale, bias.to(torch.bfloat16))
    _assert_matches(out, x, weight, scale, bias.to(torch.bfloat16))


def test_gluon_defaults():
    """8 token columns up to 8 rows, 16 above; K split while ≤ 512 programs of ≥ 4 sub-tiles
    (Llama-3.1-8B's q|k|v in 4, o and down in 8, gate|up unsplit)."""
    shapes = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
    assert [default_gluon_split_and_tokens(4, *shape) for shape in shapes] == [
        (4, 8), (8, 8), (1, 8), (8, 8)]
    assert default_gluon_split_and_tokens(9, 4096, 4096) == (8, 16)
    # 17-32 rows: 32 columns, the same rule but K in at most 4; 33-64: 64 columns, split
    # while under 256 programs
    assert [default_gluon_split_and_tokens(17, *shape) for shape in shapes] == [
        (4, 32), (4, 32), (1, 32), (4, 32)]
    assert [default_gluon_split_and_tokens(64, *shape) for shape in shapes] == [
        (2, 64), (4, 64), (1, 64), (4, 64)]
    assert default_gluon_split_and_tokens(33, 64, 256) == (1, 64)  # ≥ 4 sub-tiles a split
    # one row with group scales: K in at least 4 (gate|up), the rule's 8 kept (o, down)
    assert [default_gluon_split_and_tokens(1, *shape, grouped=True) for shape in shapes] == [
        (4, 8), (8, 8), (4, 8), (8, 8)]
    assert default_gluon_split_and_tokens(1, 28672, 1024, grouped=True) == (2, 8)
    assert default_gluon_split_and_tokens(2, 28672, 4096, grouped=True) == (1, 8)


def test_unsupported_inputs_are_named(device):
    weight, scale, bias = _weights(64, 256, device, seed=6)
    x = _x(4, 256, torch.bfloat16, device)
    grouped = torch.ones(64, 2, dtype=torch.float16, device=device)  # groups of 128
    odd_groups = torch.ones(64, 16, dtype=torch.float16, device=device)  # groups of 16
    for arguments, message in (
            ((x, weight, odd_groups, None), "groups of a multiple of 32 inputs"),
            ((x, weight, grouped[:, :1].T, None), "scale must be contiguous float16 (64, K / G)"),
            ((x, weight, grouped[:, :0], None), "scale must be contiguous float16 (64, K / G)"),
            ((x[:, :0], weight[:, :0], scale, None), "K=0 must be a positive multiple of 32"),
            ((x.float(), weight, scale, None), "x must be bfloat16 or float16"),
            ((_x(65, 256, torch.bfloat16, device), weight, scale, None),
             "x has 65 rows; this kernel takes 1-64 (16 unless the Gluon twin runs)"),
            ((x[:, :128].contiguous(), weight, scale, None),
             "x has K=128 but weight has K=256"),
            ((x[:, :128], weight, scale, None), "x must be a contiguous (M, K) tensor"),
            ((x, weight.float(), scale, None), "weight must be a contiguous 2-D int8"),
            ((x, weight, scale, bias[:10]), "bias must be a contiguous (64,)")):
        assert message in skinny_int8_unsupported_reason(*arguments)
        with pytest.raises(ValueError, match="skinny_int8_linear: "):
            skinny_int8_linear(*arguments)
    assert skinny_int8_unsupported_reason(x, weight, scale, bias) is None
    # group scales on both kernels
    assert skinny_int8_unsupported_reason(x, weight, grouped, None, gluon=False) is None
    # 17-64 rows on the Gluon twin only: named where it cannot run (or is not asked for)
    wide = _x(17, 256, torch.bfloat16, device)
    assert "more than 16 run on the Gluon twin only" in skinny_int8_unsupported_reason(
        wide, weight, scale, None, gluon=False)
    if device == "cpu":
        assert "Gluon twin only" in skinny_int8_unsupported_reason(wide, weight, scale, None)
    from kiln.kernels import skinny_int8_gluon

    with pytest.raises(ValueError, match="tokens must be 8, 16, 32 or 64; got 12"):
        skinny_int8_gluon.launch(x, weight, scale, None, split_k=1, tokens=12)
    with pytest.raises(ValueError, match="'reduce' only"):
        skinny_int8_linear(x, weight, scale, config=SkinnyFp8Config(
            64, 128, 16, 2, split_k_mode="serial"))


def test_one_row_goes_to_the_gluon_twin_for_long_rows_or_small_groups(monkeypatch):
    """skinny_int8.takes_batch1: one row comes here only where the Gluon twin runs, and K is
    at least BATCH1_MIN_K or the groups are of at most 64 (int_gemv measured faster on the
    rest), unless KILN_SKINNY_INT8_BATCH1=0."""
    from kiln.kernels import skinny_int8

    x = torch.zeros(1, 14336, dtype=torch.bfloat16)
    long_rows = torch.zeros(64, 14336, dtype=torch.int8)
    short_rows = torch.zeros(64, 4096, dtype=torch.int8)
    channel = torch.ones(64, 1)
    assert not skinny_int8.takes_batch1(x, long_rows, channel)  # CPU: no Gluon
    monkeypatch.setattr(skinny_int8, "gluon_usable", lambda tensor, weight: True)
    assert skinny_int8.takes_batch1(x, long_rows, channel)
    assert skinny_int8.takes_batch1(x, long_rows, torch.ones(64, 14336 // 128))
    assert not skinny_int8.takes_batch1(x[:, :4096], short_rows, channel)
    assert not skinny_int8.takes_batch1(x[:, :4096], short_rows, torch.ones(64, 4096 // 128))
    assert skinny_int8.takes_batch1(x[:, :4096], short_rows, torch.ones(64, 4096 // 32))
    assert skinny_int8.takes_batch1(x[:, :4096], short_rows, torch.ones(64, 4096 // 64))
    monkeypatch.setenv("KILN_SKINNY_INT8_BATCH1", "0")
    assert not skinny_int8.takes_batch1(x, long_rows, channel)


def test_ops_dispatch(device, monkeypatch):
    """ops sends int8 linears of 2-16 rows here where the kernel runs (Hopper: has_sm90,
    stood in for by the interpreter), group scales too (on the Triton kernel where the Gluon
    twin does not run, e.g. K not a multiple of 128); one row stays on int_gemv unless
    takes_batch1; KILN_SKINNY_INT8=0 keeps the previous kernels; 17 rows never come here."""
    from kiln.kernels import ops, skinny_int8

    weight, scale, bias = _weights(80, 512, device, seed=7)
    x = _x(17, 512, torch.bfloat16, device, seed=8)
    monkeypatch.setattr(ops, "_fast", lambda tensor: True)  # the interpreter stands in for CUDA
    monkeypatch.setattr(skinny_int8, "has_sm90", lambda tensor: True)
    monkeypatch.setattr(skinny_int8, "gluon_usable", lambda tensor, weight: False)
    calls = []
    real = skinny_int8.launch_skinny_int8  # what ops calls once `takes` said yes
    monkeypatch.setattr(skinny_int8, "launch_skinny_int8",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))

    expected = weight_only_linear_reference(x, dequantize_int8(weight, scale),
                                            bias.to(torch.bfloat16)).float()

    def run(rows):  # any kernel: within the bf16 rounding of weights or output
        out = ops.int8_weight_only_linear(x[:rows], weight, scale, bias.to(torch.bfloat16))
        error = (out.float() - expected[:rows]).abs().max() / expected.abs().max()
        assert error < 2**-7, (rows, error.item())

    for rows in (4, 1, 16, 17):
        run(rows)
    assert calls == [4, 16]
    grouped_weight, grouped_scale = quantize_int8(
        dequantize_int8(weight.cpu(), scale.cpu()), 64)
    grouped = ops.int8_weight_only_linear(x[:5], grouped_weight.to(device),
                                          grouped_scale.to(device), None)
    reference = weight_only_linear_reference(x[:5], dequantize_int8(
        grouped_weight, grouped_scale).to(device)).float()
    assert (grouped.float() - reference).abs().max() / reference.abs().max() < 2**-7
    assert calls == [4, 16, 5]
    del calls[-1]
    monkeypatch.setattr(skinny_int8, "takes_batch1", lambda *args: True)
    run(1)
    assert calls == [4, 16, 1]
    monkeypatch.setenv("KILN_SKINNY_INT8", "0")
    run(4)
    assert calls == [4, 16, 1]


@pytest.mark.parametrize("gluon", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [2, 16])
def test_group_scales(m, group, dtype, gluon, device, poison_outputs):
    """Group scales (GGUF Q8_0's 32, `--group-size`) on both kernels: each weight times its
    group's scale, rounded once to x's dtype before the MMA (the interpreter keeps the product
    in fp32). K = 1152 is 9 sub-tiles, which the split below cuts unevenly; N = 200 a partial
    block."""
    from kiln.kernels.skinny_int8 import gluon_usable

    generator = torch.Generator().manual_seed(group + m)
    w = torch.randn(200, 1152, generator=generator) * 0.05
    weight, scale = (t.to(device) for t in quantize_int8(w, group))
    bias = (torch.randn(200, generator=generator) * 0.1).to(dtype).to(device)
    x = _x(m, 1152, dtype, device, seed=group)
    if gluon and not gluon_usable(x, weight):
        pytest.skip("the Gluon twin runs on sm_90 GPUs only (CPU: the reasons test above)")
    for config in (None, SkinnyFp8Config(64, 128, 8 if m <= 8 else 16, 2, num_stages=2)):
        out = skinny_int8_linear(x, weight, scale, bias, config=config, gluon=gluon)
        _assert_matches(out, x, weight, scale, bias, rounded_weights=True)


def test_shallow_k_tiles_split_k_further(device, poison_outputs, monkeypatch):
    """K (or the group) a power of 2 times an odd number clips the K tile to 64: the default
    then splits K for 4x the programs (H100: 5760 x 2880 at 8 rows 35.3 -> 15.9 us), and the
    result still matches. K = 1088 = 64 * 17 on one column block splits in 4."""
    from kiln.kernels import skinny_int8 as module

    assert module._split_for_shallow_tiles(5760, 45, 64, 4) == 4
    assert module._split_for_shallow_tiles(2880, 45, 64, 4) == 8
    assert module._split_for_shallow_tiles(1536, 9, 64, 4) == 2  # SmolLM2: as before
    splits = []
    real = module._split_for_shallow_tiles
    monkeypatch.setattr(module, "_split_for_shallow_tiles",
                        lambda *args: splits.append(real(*args)) or splits[-1])
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(64, 1088, generator=generator) * 0.05
    weight, scale = (t.to(device) for t in quantize_int8(w, 64))
    x = _x(3, 1088, torch.bfloat16, device, seed=8)
    out = module.launch_skinny_int8(x, weight, scale, gluon=False)
    assert splits == [4]
    _assert_matches(out, x, weight, scale, None, rounded_weights=True)


def test_batch_invariant_rows_take_one_tiling(device, monkeypatch, poison_outputs):
    """KILN_BATCH_INVARIANT=1: int8 linears of 1-16 rows all run here on 16 token columns
    and one K split (never int_gemv at one row), and a row's bits do not depend on the
    others' (the interpreter's dot here; the GPU kernels in tests/gpu/
    test_batch_invariant_gpu.py); group scales the kernels do not take (groups of 16) go to
    quant_linear's kernel for every row count."""
    from kiln.kernels import ops, skinny_int8

    weight, scale, bias = _weights(80, 512, device, seed=9)
    x = _x(16, 512, torch.bfloat16, device, seed=10)
    monkeypatch.setattr(skinny_int8, "has_sm90", lambda tensor: True)
    monkeypatch.setattr(skinny_int8, "gluon_usable", lambda tensor, weight: False)
    configs = assert_rows_do_not_depend_on_the_batch(
        monkeypatch, skinny_int8, "skinny_int8_linear",
        lambda rows: ops.int8_weight_only_linear(rows, weight, scale, bias), x)
    assert configs[0].tokens == 16
    grouped_weight, grouped_scale = (t.to(device) for t in quantize_int8(
        torch.randn(80, 512, generator=torch.Generator().manual_seed(11)) * 0.05, 16))
    configs = assert_rows_do_not_depend_on_the_batch(
        monkeypatch, ops.quant_linear, "quant_linear",
        lambda rows: ops.int8_weight_only_linear(rows, grouped_weight, grouped_scale, None), x)
    assert configs[0].block_m == 16  # one row on the 16-row tiling too


@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [17, 33, 64])
def test_wide_rows_on_the_gluon_twin(m, dtype, group, device, poison_outputs):
    """17-64 rows (decode batches, short prefills) on the Gluon twin's 32 and 64 token
    columns, per channel and grouped, the default split and an uneven one (K = 1152: 9
    sub-tiles), N = 200 a partial block."""
    from kiln.kernels import skinny_int8_gluon
    from kiln.kernels.skinny_int8 import gluon_usable

    generator = torch.Generator().manual_seed(m + group)
    w = torch.randn(200, 1152, generator=generator) * 0.05
    weight, scale = (t.to(device) for t in quantize_int8(w, group or 1152))
    bias = (torch.randn(200, generator=generator) * 0.1).to(dtype).to(device)
    x = _x(m, 1152, dtype, device, seed=m)
    if not gluon_usable(x, weight):
        pytest.skip("the Gluon twin runs on sm_90 GPUs only (CPU: the reasons test above)")
    out = skinny_int8_linear(x, weight, scale, bias)
    _assert_matches(out, x, weight, scale, bias, rounded_weights=bool(group))
    out = skinny_int8_gluon.launch(x, weight, scale, None, split_k=2, tokens=8)
    _assert_matches(out, x, weight, scale, None, rounded_weights=bool(group))
