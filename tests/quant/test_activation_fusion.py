"""FP8 activations quantised by their producers (kiln/quant/activation_fusion.py): an fp8
engine loads with exactly the declared RMSNorm / SiLU-and-mul → linear pairs fused and
computes the same logits as without the fusion; bf16 and weight-only engines, layers kept
unquantised and block classes without the declaration are left alone.

On the CPU every op runs its torch reference, and the fused references are the unfused ones
composed (the producer's output in the compute dtype, quantised as the linear would): the
logits are equal bit for bit, not merely close. (The Triton kernels are held to the unfused
Triton kernels in tests/kernels/test_fused_quant.py.)"""

from __future__ import annotations

import pytest
import torch

from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import open_engine
from kiln.kernels.activation import silu_and_mul_reference
from kiln.kernels.norm import rms_norm_reference
from kiln.kernels.quant_linear import quantize_fp8_per_token_reference
from kiln.layers.activation import SiluAndMul
from kiln.layers.norm import RMSNorm
from kiln.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from kiln.parallel.state import ParallelState
from kiln.quant.activation_fusion import fuse_fp8_activations
from kiln.quant.fp8 import Fp8Config
from kiln.quant.fused_activation import Fp8Activation, Fp8OutputSpec
from kiln.quant.quantize import FULL_PRECISION
from tests.quant.quant_helpers import build, logits_of, tiny_quant_llama



@pytest.fixture(autouse=True)
def fusion_default(monkeypatch):
    """The fusion is on unless KILN_FP8_FUSE_ACTIVATIONS=0 (whatever the caller's shell set)."""
    monkeypatch.delenv("KILN_FP8_FUSE_ACTIVATIONS", raising=False)


def test_the_loader_does_not_fuse_when_switched_off(engines, monkeypatch):
    monkeypatch.setenv("KILN_FP8_FUSE_ACTIVATIONS", "0")
    assert _fused_pairs(load_engine_model(open_engine(engines["fp8"]))) == set()


NUM_LAYERS = 2
DECLARED = [(f"model.layers.{i}.{producer}", f"model.layers.{i}.{consumer}")
            for i in range(NUM_LAYERS)
            for producer, consumer in LlamaDecoderLayer.fp8_activation_producers]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    directory = tmp_path_factory.mktemp("activation_fusion")
    hf = tiny_quant_llama(directory)
    return {
        "bf16": build(hf, directory / "bf16"),
        "fp8": build(hf, directory / "fp8", quant="fp8"),
        # Static scales need calibration; a random-weight build calibrates on random ids.
        "fp8-static": build(hf, directory / "fp8-static", quant="fp8", act_scales="static",
                            random_weights=True, calibration="random ids",
                            calibration_samples=8, max_model_len=64),
        "int8-wo": build(hf, directory / "int8", quant="int8-wo"),
        "int4-wo": build(hf, directory / "int4", quant="int4-wo"),
    }


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_producers_return_what_the_linear_would_have_quantised(static):
    consumer = torch.nn.Module()
    consumer.input_scale = torch.tensor([0.01])
    spec = Fp8OutputSpec("consumer", consumer, static=static)
    input_scale = consumer.input_scale if static else None
    generator = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 5, 64, generator=generator).to(torch.bfloat16)
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    norm.quantize_output = spec
    out, new_residual = norm(x, residual)
    normed, expected_residual = rms_norm_reference(x, norm.weight, 1e-5, residual)
    values, scale = quantize_fp8_per_token_reference(normed, input_scale)
    assert isinstance(out, Fp8Activation) and out.dtype == torch.bfloat16
    assert torch.equal(out.values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(out.scale, scale) and torch.equal(new_residual, expected_residual)
    assert torch.equal(out.dequantize(), (values.float() * scale).to(torch.bfloat16))

    act = SiluAndMul()
    act.quantize_output = spec
    out = act(torch.cat([x, residual], dim=1))  # (5, 128): [gate | up]
    values, scale = quantize_fp8_per_token_reference(
        silu_and_mul_reference(torch.cat([x, residual], dim=1)), input_scale)
    assert torch.equal(out.values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(out.scale, scale)


def _fused_pairs(model) -> set[tuple[str, str]]:
    return {(name, module.quantize_output.consumer_name)
            for name, module in model.named_modules()
            if getattr(module, "quantize_output", None) is not None}


@pytest.mark.parametrize("name", ["fp8", "fp8-static"])
def test_fp8_engines_load_with_the_declared_pairs_fused(engines, name):
    model = load_engine_model(open_engine(engines[name]))
    assert _fused_pairs(model) == set(DECLARED)
    assert model.model.layers[0].mlp.act.quantize_output.static == (name == "fp8-static")
    assert model.model.norm.quantize_output is None  # the final norm feeds the bf16 LM head
    assert sorted(fuse_fp8_activations(model)) == sorted(DECLARED)  # idempotent


@pytest.mark.parametrize("name", ["bf16", "int8-wo", "int4-wo"])
def test_engines_without_fp8_linears_fuse_nothing(engines, name):
    assert _fused_pairs(load_engine_model(open_engine(engines[name]))) == set()


@pytest.mark.parametrize("name,dtype", [("fp8", torch.float32), ("fp8", torch.bfloat16),
                                        ("fp8-static", torch.float32)])
def test_fusion_changes_no_logit(engines, name, dtype, monkeypatch):
    produced = []  # the type of every norm's and activation's output
    for layer_class in (RMSNorm, SiluAndMul):
        def recording_forward(module, *args, real_forward=layer_class.forward):
            out = real_forward(module, *args)
            produced.append(type(out[0] if isinstance(out, tuple) else out))
            return out
        monkeypatch.setattr(layer_class, "forward", recording_forward)

    fused = logits_of(engines[name], dtype=dtype)
    forwards = 4  # the prompt, then 3 decode steps
    assert produced.count(Fp8Activation) == forwards * len(DECLARED)
    produced.clear()
    monkeypatch.setattr("kiln.compiler.loader.fuse_fp8_activations", lambda model: [])
    unfused = logits_of(engines[name], dtype=dtype)
    assert produced and Fp8Activation not in produced
    assert torch.equal(fused, unfused)  # so the greedy tokens are the same too
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))


def test_a_block_class_without_the_declaration_is_left_alone(engines, monkeypatch):
    monkeypatch.delattr(LlamaDecoderLayer, "fp8_activation_producers")
    assert _fused_pairs(load_engine_model(open_engine(engines["fp8"]))) == set()


def _constructed(engines, quant_config, parallel=None) -> LlamaForCausalLM:
    """The fp8 engine's model built afresh with another quantisation or geometry (the pass
    reads only the layers' methods, so no weights are needed)."""
    return LlamaForCausalLM(open_engine(engines["fp8"]).model_config,
                            quant_config=quant_config, parallel=parallel)


def test_consumers_kept_unquantised_or_not_yet_quantised_are_not_fused(engines):
    config = Fp8Config(unquantized_layers=("model.layers.0.mlp.down_proj",))
    model = _constructed(engines, config)
    # A linear still holding its full-precision weight (a build before quantisation).
    setattr(model.model.layers[1].self_attn.qkv_proj, FULL_PRECISION, torch.zeros(1))
    fused = fuse_fp8_activations(model)
    assert sorted(fused) == sorted(pair for pair in DECLARED
                                   if pair[1] not in ("model.layers.0.mlp.down_proj",
                                                      "model.layers.1.self_attn.qkv_proj"))


def test_row_parallel_consumers_stay_fused_at_tp_2(engines):
    # down_proj quantises the rank's shard of the intermediate row per token whether or not
    # SiLU-and-mul does it for it (see activation_fusion.py), so the fusion stays on.
    model = _constructed(engines, Fp8Config(), ParallelState.for_slicing(2, 1, 0))
    assert sorted(fuse_fp8_activations(model)) == sorted(DECLARED)


def test_a_wrong_declaration_is_named(engines, monkeypatch):
    monkeypatch.setattr(LlamaDecoderLayer, "fp8_activation_producers",
                        (("input_layernorm", "self_attn.q_proj"),))
    with pytest.raises(ValueError, match="names 'self_attn.q_proj', which model.layers.0"):
        fuse_fp8_activations(_constructed(engines, Fp8Config()))
    monkeypatch.setattr(LlamaDecoderLayer, "fp8_activation_producers",
                        (("self_attn", "self_attn.qkv_proj"),))
    with pytest.raises(ValueError, match="'self_attn' is a LlamaAttention, which cannot"):
        fuse_fp8_activations(_constructed(engines, Fp8Config()))
