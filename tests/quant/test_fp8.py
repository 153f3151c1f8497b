"""`fp8` (W8A8) end to end on a tiny random Llama: the engine file holds the contract's
tensors, the engine computes exactly what Hugging Face computes with the engine's dequantised
weights and per-token E4M3 activations, and stays close to the bf16 engine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kiln.compiler.manifest import open_engine
from kiln.layers.linear import QKVParallelLinear
from kiln.parallel.state import SINGLE_PROCESS
from kiln.quant.config import quant_config_for_build
from kiln.quant.fp8 import Fp8Config
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
    directory = tmp_path_factory.mktemp("fp8")
    hf = tiny_quant_llama(directory)
    return hf, build(hf, directory / "bf16"), build(hf, directory / "fp8", quant="fp8")


def test_engine_file_holds_e4m3_weights_with_per_channel_scales(engines):
    _, _, fp8 = engines
    engine = open_engine(fp8)
    assert engine.manifest["quant"]["scheme"] == "fp8"
    assert engine.manifest["quant"]["activation_scales"] == "dynamic"
    tensors = load_file(str(engine.rank_file(0)))
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert tensors[f"{qkv}.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{qkv}.weight"].shape == (128 + 2 * 64, 128)
    assert tensors[f"{qkv}.weight_scale"].dtype == torch.float32
    assert tensors[f"{qkv}.weight_scale"].shape == (256,)
    assert f"{qkv}.input_scale" not in tensors  # dynamic: computed per token at run time
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # the LM head stays bf16


def test_matches_hugging_face_with_dequantised_weights_and_e4m3_activations(engines):
    hf, _, fp8 = engines
    expected = hf_logits_with(hf, dequantised_weights(fp8), fp8_activations=True)
    assert relative_error(logits_of(fp8), expected) < 1e-5


def test_stays_close_to_the_bf16_engine(engines):
    _, bf16, fp8 = engines
    reference, quantised = logits_of(bf16), logits_of(fp8)
    assert relative_error(quantised, reference) < 0.12
    assert (quantised.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


def test_static_input_scales_of_fused_parts_take_the_max():
    config = Fp8Config(activation_scales="static", prequantized=True)
    layer = QKVParallelLinear(64, 16, 4, 2, False, quant_config=config, parallel=SINGLE_PROCESS,
                              prefix="model.layers.0.self_attn.qkv_proj")
    assert layer.checkpoint_tensor_names() == ("weight", "weight_scale", "input_scale")
    for part, value in (("q", 0.5), ("k", 2.0), ("v", 1.0)):
        layer.load_checkpoint_tensor("input_scale", torch.tensor(value), part_id=part,
                                     source_name=f"{part}_proj.input_scale")
    assert layer.input_scale.item() == 2.0


def test_unknown_activation_scales_are_refused():
    with pytest.raises(ValueError, match="activation_scales must be one of"):
        quant_config_for_build("fp8", {"activation_scales": "sometimes"})


def test_layers_named_unquantized_keep_the_compute_dtype():
    config = Fp8Config(unquantized_layers=("model.layers.1",))
    assert config.linear_method("model.layers.1.mlp.down_proj").__class__.__name__ == \
        "UnquantizedLinearMethod"
    assert config.linear_method("model.layers.10.mlp.down_proj").__class__.__name__ == \
        "Fp8LinearMethod"
    assert config.linear_method("lm_head").__class__.__name__ == "UnquantizedLinearMethod"
