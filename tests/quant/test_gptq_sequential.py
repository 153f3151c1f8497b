"""GPTQ layer by layer (kiln/quant/gptq_sequential.py): the rounding target is the weight
that best maps the quantised model's inputs onto the full-precision layer's outputs, every
decoder linear is rounded once, in the order the layer runs them, from its inputs in the
model whose earlier linears are already rounded, and the stored weight is the rounded one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import kiln.quant.gptq_sequential as sequential
from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.kernels.quant_linear import dequantize_int8
from kiln.quant.gptq import asymmetric_target
from tests.quant.quant_helpers import tiny_gguf_and_text

WORDS = ["hello", "world", "he", "or", "ld", "abc", "xyz", "lo", "wo"]


def _inputs(seed: int, rows: int = 512, features: int = 24):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator) @ torch.randn(features, features,
                                                                         generator=generator)
    # What rounded earlier layers leave: a small linear distortion plus noise.
    distortion = torch.eye(features) + 0.1 * torch.randn(features, features,
                                                         generator=generator) / features**0.5
    quantised = x @ distortion + 0.01 * torch.randn(rows, features, generator=generator)
    weight = torch.randn(16, features, generator=generator)
    return x, quantised, weight


def test_target_is_the_least_squares_weight_for_the_quantised_inputs(monkeypatch):
    x, quantised, weight = _inputs(0)
    n = x.shape[0]
    q64 = quantised.double()
    gram, cross = q64.T @ q64 / n, x.double().T @ q64 / n
    wanted = x @ weight.T

    def error(w):
        return float((wanted - quantised @ w.T).pow(2).mean())

    # The earlier layers' error compensated (damped as the build does) ...
    assert error(asymmetric_target(weight, gram, cross)) < 0.5 * error(weight)
    # ... and undamped, the target is least squares' own answer.
    monkeypatch.setattr("kiln.quant.gptq.DAMPING", 0.0)
    best = torch.linalg.lstsq(quantised.double(), wanted.double()).solution.T.float()
    torch.testing.assert_close(asymmetric_target(weight, gram, cross), best,
                               rtol=1e-3, atol=1e-3)


def test_target_is_the_weight_when_the_inputs_did_not_move():
    x, _, weight = _inputs(1)
    gram = x.T @ x / x.shape[0]
    torch.testing.assert_close(asymmetric_target(weight, gram, gram), weight)


def test_target_names_bad_moments():
    x, quantised, weight = _inputs(2)
    gram = quantised.T @ quantised
    with pytest.raises(KilnError, match="down_proj has 24 inputs but calibration moments"):
        asymmetric_target(weight, gram[:8, :8], gram[:8, :8], "model.layers.0.mlp.down_proj")
    bad = gram.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(KilnError, match="not finite .* build without --gptq"):
        asymmetric_target(weight, gram, bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gguf_and_text(tmp_path_factory.mktemp("gptq-sequential"), WORDS)


def test_every_decoder_linear_is_rounded_once_in_order_against_the_full_model(
        tiny, tmp_path, monkeypatch):
    seen = []

    def recording(weight, gram, cross, name="a layer"):
        seen.append((name, torch.allclose(gram, cross, rtol=1e-5, atol=1e-6)))
        return asymmetric_target(weight, gram, cross, name)

    stored: dict = {}
    original_round = sequential.BuildQuantizedLinearMethod.round_with_gptq

    def keep(self, layer, weight, gram):
        result = original_round(self, layer, weight, gram)
        stored[layer.prefix] = result[0].cpu()  # on the GPU where calibration ran there
        return result

    monkeypatch.setattr(sequential, "asymmetric_target", recording)
    monkeypatch.setattr(sequential.BuildQuantizedLinearMethod, "round_with_gptq", keep)
    config = BuildConfig(dtype="float32", quant="int8-wo", calibration=str(tiny / "text.txt"),
                         calibration_samples=8, gptq=True)
    build_engine(tiny / "tiny.gguf", tmp_path / "e", config, progress=False)

    names = [name for name, _ in seen]
    layers = sorted({int(name.split(".")[2]) for name in names})
    per_layer = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{i}.{linear}" for i in layers for linear in per_layer]
    # The first linear reads the embeddings through a norm: nothing quantised before it.
    # Every later one reads what rounded linears produced, so its inputs moved.
    assert seen[0][1] and not any(same for _, same in seen[1:])

    engine = open_engine(tmp_path / "e")
    assert engine.manifest["quant"]["gptq"] is True
    tensors = load_file(str(engine.rank_file(0)))
    for name, weight in stored.items():  # stored exactly as rounded (same grid, same codes)
        stored_weight = dequantize_int8(tensors[f"{name}.weight"],
                                        tensors[f"{name}.weight_scale"]).float()
        torch.testing.assert_close(stored_weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme,group,gptq", [
    ("int8-wo", {}, True), ("int4-wo", {"group_size": 32}, True),
    ("int4-wo", {"group_size": 32}, False)], ids=["int8-wo-gptq", "int4-wo-gptq", "int4-wo-awq"])
def test_calibrating_builds_leave_unquantized_layers_alone(tiny, tmp_path, scheme, group, gptq):
    """AWQ (int4-wo without --gptq) folds nothing into or out of a kept layer (its norm
    neither) and GPTQ's layer pass rounds around it: it is stored as the plain build stores
    it."""
    build_engine(tiny / "tiny.gguf", tmp_path / "plain", BuildConfig(dtype="float32"),
                 progress=False)
    kept = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"]
    config = BuildConfig(dtype="float32", quant=scheme, calibration=str(tiny / "text.txt"),
                         calibration_samples=8, gptq=gptq, unquantized_layers=kept, **group)
    build_engine(tiny / "tiny.gguf", tmp_path / "e", config, progress=False)
    plain = load_file(str(tmp_path / "plain" / "rank0.safetensors"))
    tensors = load_file(str(open_engine(tmp_path / "e").rank_file(0)))
    for name in [f"{layer}.weight" for layer in kept] + [
            "model.layers.1.input_layernorm.weight"]:  # qkv's norm: no AWQ scales folded
        assert torch.equal(tensors[name], plain[name]), name
    # Its neighbours were quantised (and AWQ, where it ran, folded scales into layer 0's norm).
    assert "model.layers.0.mlp.gate_up_proj.weight_scale" in tensors
    assert (not gptq) == (not torch.equal(
        tensors["model.layers.0.input_layernorm.weight"],
        plain["model.layers.0.input_layernorm.weight"]))
