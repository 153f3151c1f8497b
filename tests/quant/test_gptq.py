"""GPTQ at build (--gptq): every rounded value lies on the scheme's round-to-nearest grid (so
the scheme stores it exactly), the linear's error on correlated calibration inputs drops well
below round-to-nearest's for fp8, int8-wo and int4-wo, inputs calibration never saw are
rounded to nearest, and a built engine records gptq and sits closer to the full-precision
model than the plain rounding; flags that cannot work are one line."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from kiln.cli import main
from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.evaluate.forward import TeacherForcedModel
from kiln.kernels.quant_linear import dequantize_int4, dequantize_int8
from kiln.quant.config import quant_config_for_build
from kiln.quant.gptq import CALIBRATION_GRAM, gptq_round
from kiln.quant.quantize import FULL_PRECISION
from tests.quant.quant_helpers import tiny_gguf_and_text

SCHEMES = {"fp8": {}, "int8-wo": {"group_size": -1}, "int4-wo": {"group_size": 32}}
WORDS = ["hello", "world", "he", "or", "ld", "abc", "xyz", "lo", "wo"]


def _layer(scheme: str, out_features: int = 48, in_features: int = 96):
    """The scheme's method and a bare module with the parameters it creates."""
    method = quant_config_for_build(scheme, SCHEMES[scheme]).quantized_method()
    layer = nn.Module()
    layer.prefix = "model.layers.0.mlp.down_proj"
    method.create_weights(layer, in_features, out_features)
    return method, layer


def _dequantised(scheme: str, layer: nn.Module) -> torch.Tensor:
    if scheme == "fp8":
        return layer.weight.float() * layer.weight_scale[:, None]
    if scheme == "int8-wo":
        return dequantize_int8(layer.weight, layer.weight_scale)
    return dequantize_int4(layer.qweight, layer.weight_scale, layer.weight_zero)


def _correlated_inputs(generator: torch.Generator, rows: int, features: int) -> torch.Tensor:
    """Inputs whose channels are mixed (correlated) with a few large ones, as a norm's output."""
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    x = torch.randn(rows, features, generator=generator) @ (torch.eye(features) + 2 * mixing)
    x[:, :3] *= 8.0
    return x


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gptq_rounds_onto_the_grid_and_beats_round_to_nearest(scheme):
    generator = torch.Generator().manual_seed(1)
    method, layer = _layer(scheme)
    weight = torch.randn(48, 96, generator=generator) * 0.05
    x = _correlated_inputs(generator, 1024, 96)
    gram = x.T @ x / x.shape[0]
    grid = method.grid(layer, weight)
    rounded = gptq_round(weight, gram, lambda c, i: method.round_columns(layer, grid, c, i))

    method.store_quantized(layer, rounded, grid)
    assert torch.equal(_dequantised(scheme, layer), rounded)  # exactly representable
    method.store_quantized(layer, weight, grid)  # round-to-nearest on the same grid
    nearest = _dequantised(scheme, layer)

    def output_error(w):
        return float((x @ (weight - w).T).pow(2).mean())

    assert output_error(rounded) < 0.7 * output_error(nearest)


def test_an_input_calibration_never_saw_is_rounded_to_nearest():
    method, layer = _layer("int8-wo")
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 96, generator=generator)
    x = _correlated_inputs(generator, 512, 96)
    x[:, 10] = 0.0
    grid = method.grid(layer, weight)
    rounded = gptq_round(weight, x.T @ x / 512, lambda c, i: method.round_columns(layer, grid, c, i))
    nearest = method.round_columns(layer, grid, weight, torch.arange(96))
    assert torch.equal(rounded[:, 10], nearest[:, 10])
    assert not torch.equal(rounded, nearest) and bool(torch.isfinite(rounded).all())


def test_bad_second_moments_are_one_line():
    method, layer = _layer("fp8")
    weight = torch.randn(48, 96)
    grid = method.grid(layer, weight)
    round_columns = lambda c, i: method.round_columns(layer, grid, c, i)  # noqa: E731
    with pytest.raises(KilnError, match="down_proj has 96 inputs but a calibration second moment of shape"):
        gptq_round(weight, torch.eye(64), round_columns, name="model.layers.0.mlp.down_proj")
    nan = torch.eye(96)
    nan[3, 3] = float("nan")
    with pytest.raises(KilnError, match="not finite"):
        gptq_round(weight, nan, round_columns, name="model.layers.0.mlp.down_proj")
    # Far from positive definite: even the largest damping leaves a negative eigenvalue.
    indefinite = torch.eye(96)
    indefinite[0, 1] = indefinite[1, 0] = 1000.0
    with pytest.raises(KilnError, match="down_proj's calibration inputs give no usable second "
                                        "moment .* build without --gptq"):
        gptq_round(weight, indefinite, round_columns, name="model.layers.0.mlp.down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tiny_gguf_and_text(tmp_path_factory.mktemp("gptq"), WORDS)
    build_engine(directory / "tiny.gguf", directory / "plain", BuildConfig(dtype="float32"),
                 progress=False)
    return directory


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gptq_engine_is_closer_to_full_precision(tiny, tmp_path, scheme, capsys):
    """Against round to nearest (no calibration). Not against AWQ, which --gptq replaces:
    this tiny random model at 4 bits is wrecked either way (mean KL 5.8 nats after round to
    nearest), far from any regime where their ranking means something; on SmolLM2 the layer
    pass beat AWQ at 8 and 4 bits (BENCHMARKS.md)."""
    group = {"group_size": 32} if scheme == "int4-wo" else {}
    errors = {}
    for gptq in (False, True):
        calibration = dict(calibration=str(tiny / "text.txt"), calibration_samples=8,
                           gptq=True) if gptq else {}
        config = BuildConfig(dtype="float32", quant=scheme, **calibration, **group)
        build_engine(tiny / "tiny.gguf", tmp_path / str(gptq), config, progress=False)
        assert open_engine(tmp_path / str(gptq)).manifest["quant"].get("gptq", False) is gptq
        # Held-out tokens: ids the calibration text (letters and spaces) mixes differently.
        tokens = torch.Generator().manual_seed(5)
        ids = torch.randint(0, 48, (1, 96), generator=tokens)
        plain = TeacherForcedModel(tiny / "plain", device="cpu").logits(ids[0].tolist())
        quantised = TeacherForcedModel(tmp_path / str(gptq), device="cpu").logits(ids[0].tolist())
        errors[gptq] = float((quantised - plain).pow(2).mean())
    assert errors[True] < errors[False]
    assert main(["inspect", str(tmp_path / "True")]) == 0
    assert "gptq" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--quant", "int8-wo", "--gptq"], "--gptq .* needs --quant fp8, int8-wo or int4-wo and --calibration"),
    (["--gptq", "--calibration", "sharegpt", "--kv-cache-dtype", "fp8"], "needs --quant fp8"),
    (["--quant", "keep", "--gptq", "--calibration", "sharegpt"], "needs --quant fp8"),
])
def test_gptq_flags_that_cannot_work_are_one_line(tiny, tmp_path, capsys, flags, message):
    assert main(["build", str(tiny / "tiny.gguf"), "-o", str(tmp_path / "e"), *flags]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not (tmp_path / "e").exists()
