"""`int8-wo` (W8A16) end to end on a tiny random Llama: contract tensors in the file, exactly
Hugging Face's logits with the engine's dequantised weights, close to the bf16 engine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kiln.compiler.manifest import open_engine
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
    directory = tmp_path_factory.mktemp("int8")
    hf = tiny_quant_llama(directory)
    return (hf, build(hf, directory / "bf16"),
            build(hf, directory / "per-channel", quant="int8-wo"),
            build(hf, directory / "grouped", quant="int8-wo", group_size=32))


def test_engine_file_holds_int8_weights_and_float16_scales(engines):
    _, _, per_channel, grouped = engines
    for engine_dir, groups in ((per_channel, 1), (grouped, 256 // 32)):
        engine = open_engine(engine_dir)
        assert engine.manifest["quant"]["group_size"] == (-1 if groups == 1 else 32)
        tensors = load_file(str(engine.rank_file(0)))
        down = "model.layers.1.mlp.down_proj"
        assert tensors[f"{down}.weight"].dtype == torch.int8
        assert tensors[f"{down}.weight"].shape == (128, 256)
        assert tensors[f"{down}.weight_scale"].dtype == torch.float16
        assert tensors[f"{down}.weight_scale"].shape == (128, groups)


@pytest.mark.parametrize("which", [2, 3])
def test_matches_hugging_face_with_dequantised_weights(engines, which):
    hf, engine_dir = engines[0], engines[which]
    expected = hf_logits_with(hf, dequantised_weights(engine_dir))
    assert relative_error(logits_of(engine_dir), expected) < 1e-5


def test_stays_close_to_the_bf16_engine(engines):
    _, bf16, per_channel, grouped = engines
    reference = logits_of(bf16)
    for engine_dir in (per_channel, grouped):
        quantised = logits_of(engine_dir)
        assert relative_error(quantised, reference) < 0.03
        assert (quantised.argmax(-1) == reference.argmax(-1)).all()
