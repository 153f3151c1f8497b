"""The quantisation seam end to end, with a scheme registered here and nowhere in kiln:
4-bit weights packed eight to an int32, float8_e4m3fn scales per group of 16 inputs and a
float32 scale per output channel, quantised at build time from the checkpoint's weights,
with o_proj left unquantized. Its tensors must go build → file → load bit-exactly (in a
bfloat16 engine loaded as float32 on the CPU), and the model must compute what plain torch
computes with the dequantised weights. Unknown schemes are refused by name, in BuildConfig,
on the command line and in a manifest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import transformers
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from kiln.cli import main
from kiln.compiler.builder import build_engine
from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import EngineFormatError
from kiln.models.registry import get_model_class
from kiln.quant.base import QuantMethod, UnquantizedLinearMethod, make_parameter
from kiln.quant.config import QuantConfig, register_quant_scheme
from kiln.quant.placement import WEIGHT_LAYOUT, FeatureLayout, copy_into_place
from tests.compiler.engine_files import rehash
from tests.helpers import save_tiny_hf_model
from tests.models.model_inputs import prefill_then_decode

PACK = 8  # 4-bit values per int32
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCHEME = "test-int4-fp8"


def quantize(weight: torch.Tensor, group_size: int):
    """(O, I) float32 → qweight (O, I/8) int32, group_scale (O, I/G) fp8, channel_scale (O,)
    float32, with weight ≈ (nibble - 8) * group_scale * channel_scale."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)  # (O, I/G, G)
    group_step = groups.abs().amax(-1) / 7  # (O, I/G): the int4 step each group needs
    channel_scale = (group_step.amax(-1) / FP8_MAX).clamp(min=1e-12)  # (O,)
    group_scale = (group_step / channel_scale[:, None]).to(FP8)  # (O, I/G), at most 448
    step = group_scale.float() * channel_scale[:, None]  # (O, I/G)
    steps = torch.where(step[..., None] > 0, groups / step[..., None], 0.0)  # (O, I/G, G)
    nibbles = (steps.round().clamp(-8, 7) + 8).to(torch.int32).reshape(out_features, -1, PACK)
    qweight = torch.zeros(nibbles.shape[:2], dtype=torch.int32)  # (O, I/8)
    for k in range(PACK):
        qweight |= nibbles[..., k] << (4 * k)
    return qweight, group_scale, channel_scale


def dequantize(qweight, group_scale, channel_scale, group_size: int) -> torch.Tensor:
    """The (O, I) float32 weight the packed tensors stand for (fp8 upcast before any math:
    the CPU has no fp8 arithmetic)."""
    out_features = qweight.shape[0]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (qweight[..., None] >> shifts) & 0xF  # (O, I/8, 8)
    values = (nibbles - 8).float().reshape(out_features, -1, group_size)  # (O, I/G, G)
    step = group_scale.float() * channel_scale[:, None]  # (O, I/G)
    return (values * step[..., None]).reshape(out_features, -1)


class PackedInt4Method(QuantMethod):
    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer, input_size: int, output_size: int) -> None:
        layer.qweight = make_parameter(
            (output_size, input_size // PACK), FeatureLayout(input_block=PACK), torch.int32
        )
        layer.group_scale = make_parameter(
            (output_size, input_size // self.group_size),
            FeatureLayout(input_block=self.group_size), FP8,
        )
        layer.channel_scale = make_parameter((output_size,), FeatureLayout(input_dim=None),
                                             torch.float32)

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        return ("weight",)

    def load_checkpoint_tensor(self, layer, name, loaded, placement, source_name) -> None:
        # Full precision until every part is in; quantised after loading.
        if not hasattr(layer, "full_precision_weight"):
            layer.full_precision_weight = torch.zeros(layer.output_size, layer.input_size)
        copy_into_place(layer.full_precision_weight, loaded, placement, source_name, WEIGHT_LAYOUT)

    def process_weights_after_loading(self, layer) -> None:
        tensors = quantize(layer.full_precision_weight, self.group_size)
        for param, value in zip((layer.qweight, layer.group_scale, layer.channel_scale), tensors):
            param.data.copy_(value)
        del layer.full_precision_weight

    def apply(self, layer, x, bias):
        weight = dequantize(layer.qweight, layer.group_scale, layer.channel_scale, self.group_size)
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


@register_quant_scheme
@dataclass(frozen=True)
class PackedInt4Config(QuantConfig):
    scheme: ClassVar[str] = SCHEME
    group_size: int = 16
    unquantized_layers: tuple[str, ...] = ("o_proj",)  # layer-name suffixes

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < PACK or self.group_size % PACK:
            raise ValueError(f"group_size must be a multiple of {PACK}, got {self.group_size!r}")

    def linear_method(self, prefix: str) -> QuantMethod:
        if prefix.endswith(self.unquantized_layers):
            return UnquantizedLinearMethod()
        return PackedInt4Method(self.group_size)


QUANTIZED_LAYERS = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")
HF_CONFIG = transformers.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, attention_bias=True,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel]:
    directory = tmp_path_factory.mktemp("quant")
    hf_model = save_tiny_hf_model(HF_CONFIG, directory / "hf")
    build_engine(directory / "hf", directory / "engine",
                 BuildConfig(dtype="bfloat16", quant=SCHEME), progress=False)
    return directory / "engine", hf_model


def test_manifest_records_the_scheme(built, capsys):
    engine_dir, _ = built
    manifest = json.loads((engine_dir / "engine.json").read_text())
    assert manifest["quant"] == {"scheme": SCHEME, "group_size": 16, "unquantized_layers": ["o_proj"]}
    assert open_engine(engine_dir).quant_config == PackedInt4Config()
    assert main(["inspect", str(engine_dir)]) == 0
    assert f"quant {SCHEME}" in capsys.readouterr().out


def test_quantised_tensors_survive_build_file_and_load_bit_exactly(built):
    engine_dir, hf_model = built
    stored = load_file(engine_dir / "rank0.safetensors")
    hf = {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}
    for i in range(HF_CONFIG.num_hidden_layers):
        layer = f"model.layers.{i}"
        attention, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        full_weights = {
            f"{attention}.qkv_proj": torch.cat([hf[f"{attention}.{p}_proj.weight"] for p in "qkv"]),
            f"{mlp}.gate_up_proj": torch.cat([hf[f"{mlp}.gate_proj.weight"], hf[f"{mlp}.up_proj.weight"]]),
            f"{mlp}.down_proj": hf[f"{mlp}.down_proj.weight"],
        }
        for prefix, weight in full_weights.items():
            for suffix, expected in zip(("qweight", "group_scale", "channel_scale"),
                                        quantize(weight, 16)):
                found = stored[f"{prefix}.{suffix}"]
                assert found.dtype == expected.dtype, (prefix, suffix)
                assert torch.equal(found.view(torch.uint8), expected.view(torch.uint8)), (prefix, suffix)
            assert f"{prefix}.weight" not in stored
        # Unquantized layers, biases and norms are the build dtype as always.
        assert stored[f"{attention}.o_proj.weight"].dtype == torch.bfloat16
        assert stored[f"{attention}.qkv_proj.bias"].dtype == torch.bfloat16

    # The CPU runtime computes in float32 from a bfloat16 engine: only the compute-dtype
    # tensors are converted; packed ints, FP8 and float32 scales arrive bit-exact.
    model = load_engine_model(open_engine(engine_dir), dtype=torch.float32)
    params = dict(model.named_parameters())
    assert set(params) == set(stored)
    for name, tensor in stored.items():
        if tensor.dtype == torch.bfloat16:
            assert params[name].dtype == torch.float32 and torch.equal(params[name], tensor.float())
        else:
            assert params[name].dtype == tensor.dtype, name
            assert torch.equal(params[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert {stored[n].dtype for n in stored} == {torch.bfloat16, torch.int32, FP8, torch.float32}
    # The loaded parameters keep their markers: a later conversion still knows which is which.
    assert model.compute_dtype_names() == {n for n, t in stored.items() if t.dtype == torch.bfloat16}


def test_forward_matches_dequantised_torch_math(built):
    engine_dir, _ = built
    engine = open_engine(engine_dir)
    model = load_engine_model(engine, dtype=torch.float32)
    # The same model unquantized, with each quantised layer's dequantised weight.
    reference = get_model_class(engine.model_config.architecture)(engine.model_config).eval()
    weights = {}
    for name, param in model.named_parameters():
        prefix, _, tensor_name = name.rpartition(".")
        if tensor_name == "qweight":
            weights[f"{prefix}.weight"] = dequantize(
                param, *(model.get_parameter(f"{prefix}.{s}") for s in ("group_scale", "channel_scale")), 16
            )
        elif tensor_name not in ("group_scale", "channel_scale"):
            weights[name] = param
    reference.load_state_dict(weights, strict=True)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.quant_method, PackedInt4Method)
    assert isinstance(layer.self_attn.o_proj.quant_method, UnquantizedLinearMethod)

    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    prefill, decode = prefill_then_decode(model, prompt, next_token=5)
    expected_prefill, expected_decode = prefill_then_decode(reference, prompt, next_token=5)
    # Exact up to float32 rounding: both sides run F.linear on the same float32 weights.
    torch.testing.assert_close(prefill, expected_prefill, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(decode, expected_decode, rtol=1e-6, atol=1e-6)


def test_random_weights_go_through_the_method(tmp_path):
    config = transformers.LlamaConfig(**{**HF_CONFIG.to_dict(), "architectures": ["LlamaForCausalLM"]})
    (tmp_path / "config.json").write_text(config.to_json_string())
    files = []
    for name in ("a", "b"):  # the same seed twice: the same bytes
        build_engine(tmp_path / "config.json", tmp_path / name,
                     BuildConfig(dtype="bfloat16", quant=SCHEME, random_weights=True, seed=1),
                     progress=False)
        files.append((tmp_path / name / "rank0.safetensors").read_bytes())
    assert files[0] == files[1]
    model = load_engine_model(open_engine(tmp_path / "a"), dtype=torch.float32)
    qkv = model.model.layers[1].self_attn.qkv_proj
    weight = dequantize(qkv.qweight, qkv.group_scale, qkv.channel_scale, 16)
    # normal(0, 0.02) through 4-bit quantisation: still about that spread, not zeros.
    assert 0.01 < weight.std().item() < 0.03
    assert qkv.qweight.dtype == torch.int32 and qkv.group_scale.dtype == FP8


# ---- unknown or malformed schemes -------------------------------------------------------------


def test_build_config_names_unknown_scheme():
    with pytest.raises(ValidationError, match=r"unknown quantisation scheme 'fp9'; this kiln "
                                              rf"knows: fp8, int4-wo, int8-wo, none, {SCHEME}, keep"):
        BuildConfig(quant="fp9")


def test_cli_names_unknown_scheme(built, tmp_path, capsys):
    hf_dir = built[0].parent / "hf"
    assert main(["build", str(hf_dir), "-o", str(tmp_path / "e"), "--quant", "fp9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: invalid BuildConfig: quant:") and "'fp9'" in err
    assert "this kiln knows: fp8, int4-wo, int8-wo, none" in err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("section, needle", [
    ({"scheme": "fp9"}, rf"unknown quantisation scheme 'fp9'; this kiln knows: fp8, int4-wo, int8-wo, none, {SCHEME}"),
    ("none", r"expected an object with a 'scheme', got 'none'"),
    ({"group_size": 16}, r"'scheme' must be a scheme name, got None"),
    ({"scheme": SCHEME, "bits": 4},
     rf"scheme '{SCHEME}' has no parameter 'bits'; its parameters: group_size, unquantized_layers"),
    ({"scheme": SCHEME, "group_size": 12}, rf"scheme '{SCHEME}': group_size must be a multiple of 8, got 12"),
    ({"scheme": "none", "group_size": 16}, r"scheme 'none' has no parameter 'group_size'"),
])
def test_manifest_quant_section_is_checked(built, tmp_path, section, needle):
    engine_dir = shutil.copytree(built[0], tmp_path / "engine")
    manifest = json.loads((engine_dir / "engine.json").read_text())
    manifest["quant"] = section
    (engine_dir / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFormatError, match=r"manifest 'quant' section is invalid: " + needle):
        open_engine(engine_dir)


def test_engine_tensor_in_the_wrong_dtype_is_named(built, tmp_path):
    engine_dir = shutil.copytree(built[0], tmp_path / "engine")
    tensors = load_file(engine_dir / "rank0.safetensors")
    name = "model.layers.0.mlp.down_proj.group_scale"
    tensors[name] = tensors[name].float()
    save_file(tensors, engine_dir / "rank0.safetensors", metadata={"format": "pt"})
    rehash(engine_dir, 4096)
    with pytest.raises(EngineFormatError, match=rf"tensor {name} in rank0.safetensors is "
                                                rf"torch.float32; quantisation scheme '{SCHEME}' "
                                                r"stores it as torch.float8_e4m3fn"):
        load_engine_model(open_engine(engine_dir))
