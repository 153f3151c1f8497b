"""`int4-wo` (W4A16, asymmetric groups, round-to-nearest) end to end on a tiny random Llama:
packed nibbles and per-group scales and zero points in the file, exactly Hugging Face's
logits with the engine's dequantised weights, within 4-bit error of the bf16 engine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kiln.compiler.manifest import open_engine
from kiln.quant.quantize import pack_int4, quantize_int4, unpack_int4
from tests.quant.quant_helpers import (
    build,
    dequantised_weights,
    hf_logits_with,
    logits_of,
    relative_error,
    tiny_quant_llama,
)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    directory = tmp_path_factory.mktemp("int4")
    hf = tiny_quant_llama(directory)
    return (hf, build(hf, directory / "bf16"),
            build(hf, directory / "g64", quant="int4-wo", group_size=64))


def test_engine_file_holds_packed_nibbles_scales_and_zero_points(engines):
    _, _, g64 = engines
    engine = open_engine(g64)
    quant = engine.manifest["quant"]
    assert (quant["scheme"], quant["group_size"], quant["zero_point"]) == ("int4-wo", 64, True)
    tensors = load_file(str(engine.rank_file(0)))
    gate_up = "model.layers.0.mlp.gate_up_proj"
    assert tensors[f"{gate_up}.qweight"].dtype == torch.uint8
    assert tensors[f"{gate_up}.qweight"].shape == (512, 64)
    for name in ("weight_scale", "weight_zero"):
        assert tensors[f"{gate_up}.{name}"].dtype == torch.float16
        assert tensors[f"{gate_up}.{name}"].shape == (512, 2)
    zeros = tensors[f"{gate_up}.weight_zero"]
    assert ((zeros >= 0) & (zeros <= 15) & (zeros == zeros.round())).all()


def test_matches_hugging_face_with_dequantised_weights(engines):
    hf, _, g64 = engines
    expected = hf_logits_with(hf, dequantised_weights(g64))
    assert relative_error(logits_of(g64), expected) < 1e-5


def test_within_four_bit_error_of_the_bf16_engine(engines):
    _, bf16, g64 = engines
    reference, quantised = logits_of(bf16), logits_of(g64)
    assert relative_error(quantised, reference) < 0.35
    assert (quantised.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.6


def test_nibble_order_is_low_then_high():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[1 | (2 << 4), 15]]
    assert torch.equal(unpack_int4(packed), q)


def test_symmetric_groups_use_zero_point_eight():
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    _, _, zero = quantize_int4(weight, 32, zero_point=False)
    assert (zero == 8).all()
