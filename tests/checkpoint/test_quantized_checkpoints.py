"""Quantised checkpoints read without re-quantising: every format's tensors, converted to
kiln's layout, dequantise to exactly the weights the format's own writer meant (the
compressed-tensors package's decompressor; AWQ/GPTQ references computed in the writer;
gguf's dequantiser), and bad configs are refused naming the field."""

from __future__ import annotations

import pytest
import torch

from kiln.checkpoint.gguf import read_gguf
from kiln.checkpoint.hf import read_hf_directory
from kiln.checkpoint.packing import dequantize_int4
from kiln.errors import CheckpointError
from tests.checkpoint.quantized_writers import (
    set_quantization_config, write_awq, write_compressed_tensors, write_gptq, write_modelopt_fp8,
)
from tests.checkpoint.test_gguf import write_tiny_gguf


def _dequantized(tensors, module: str, scheme: str) -> torch.Tensor:
    if scheme == "int4-wo":
        return dequantize_int4(tensors.get(f"{module}.qweight"), tensors.get(f"{module}.weight_scale"),
                               tensors.get(f"{module}.weight_zero"))
    weight = tensors.get(f"{module}.weight").float()
    scale = tensors.get(f"{module}.weight_scale").float()
    if scale.dim() == 1:  # fp8: per output channel
        return weight * scale[:, None]
    return weight * scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)


def _check(checkpoint, expected: dict, scheme: str, atol: float) -> None:
    assert checkpoint.quantization.scheme == scheme
    for name, reference in expected.items():
        module = name.removesuffix(".weight")
        if scheme == "int4-wo":
            assert name not in checkpoint.tensors.names()
        got = _dequantized(checkpoint.tensors, module, scheme)
        torch.testing.assert_close(got, reference, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("kind, scheme, params", [
    ("int4", "int4-wo", {"group_size": 16, "zero_point": True}),
    ("int4-sym-channel", "int4-wo", {"group_size": -1, "zero_point": False}),
    ("int8", "int8-wo", {"group_size": -1}),
    ("fp8", "fp8", {"activation_scales": "static"}),
    ("fp8-tensor", "fp8", {"activation_scales": "dynamic"}),
])
def test_compressed_tensors(tmp_path, kind, scheme, params):
    expected = write_compressed_tensors(tmp_path, kind)
    checkpoint = read_hf_directory(tmp_path)
    assert checkpoint.quantization.params == params
    assert checkpoint.quantization.source_format == "compressed-tensors"
    # float16 scales in kiln's layout against the package's float32 ones: 2^-11 relative.
    _check(checkpoint, expected, scheme, atol=1e-3)
    names = checkpoint.tensors.names()
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    if kind == "fp8":
        scale = checkpoint.tensors.get("model.layers.0.self_attn.q_proj.input_scale")
        assert scale.shape == (1,) and float(scale) == pytest.approx(0.02)
    if kind == "fp8-tensor":
        scale = checkpoint.tensors.get("model.layers.0.mlp.down_proj.weight_scale")
        assert scale.shape == (32,) and bool((scale == scale[0]).all())  # expanded per channel


def test_awq_gemm_layout(tmp_path):
    expected = write_awq(tmp_path)
    checkpoint = read_hf_directory(tmp_path)
    assert checkpoint.quantization.quant_section() == {
        "scheme": "int4-wo", "group_size": 16, "zero_point": True, "prequantized": True,
        "source_format": "awq"}
    _check(checkpoint, expected, "int4-wo", atol=1e-6)


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_gptq_4bit_zero_point_conventions(tmp_path, version):
    expected = write_gptq(tmp_path, version=version)
    checkpoint = read_hf_directory(tmp_path)
    _check(checkpoint, expected, "int4-wo", atol=1e-6)
    assert not any(n.endswith("g_idx") for n in checkpoint.tensors.names())


def test_gptq_8bit_symmetric_is_int8(tmp_path):
    expected = write_gptq(tmp_path, bits=8, with_g_idx=False)
    checkpoint = read_hf_directory(tmp_path)
    _check(checkpoint, expected, "int8-wo", atol=1e-6)


@pytest.mark.parametrize("writer, change, message", [
    (write_gptq, {"bits": 3}, "quantization_config.bits = 3"),
    (write_gptq, {"desc_act": True}, "quantization_config.desc_act = True"),
    (write_gptq, {"checkpoint_format": "marlin"}, "quantization_config.checkpoint_format"),
    (write_awq, {"version": "gemv"}, "quantization_config.version = 'gemv'"),
    (write_awq, {"bits": 8}, "quantization_config.bits = 8"),
    (write_awq, {"quant_method": "hqq"}, "quantization_config.quant_method = 'hqq'"),
])
def test_unsupported_configs_name_the_field(tmp_path, writer, change, message):
    writer(tmp_path)
    set_quantization_config(tmp_path, **change)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        read_hf_directory(tmp_path)


def test_modelopt_fp8(tmp_path):
    import json

    expected = write_modelopt_fp8(tmp_path)
    checkpoint = read_hf_directory(tmp_path)
    assert checkpoint.quantization.quant_section()["source_format"] == "modelopt"
    _check(checkpoint, expected, "fp8", atol=1e-6)
    names = checkpoint.tensors.names()
    assert not any(n.endswith(("k_scale", "v_scale")) for n in names)
    assert checkpoint.tensors.get("model.layers.1.mlp.up_proj.input_scale").shape == (1,)
    config = json.loads((tmp_path / "hf_quant_config.json").read_text())
    config["quantization"]["quant_algo"] = "NVFP4"
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization.quant_algo = 'NVFP4'"):
        read_hf_directory(tmp_path)


def test_missing_scale_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_awq(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model\.layers\.1\.mlp\.up_proj\.scales"):
        read_hf_directory(tmp_path)


def test_compressed_tensors_unsupported_bits(tmp_path):
    write_compressed_tensors(tmp_path, "int4")
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights.num_bits = 2"):
        read_hf_directory(tmp_path)


@pytest.mark.parametrize("qtype, scheme", [("Q8_0", "int8-wo"), ("Q4_0", "int4-wo"), ("Q4_1", "int4-wo")])
def test_gguf_keep(tmp_path, qtype, scheme):
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "tiny.gguf"
    expected, _ = write_tiny_gguf(path, qtype=getattr(Q, qtype), hidden=64, inter=128,
                                  heads=4, kv_heads=2, layers=2, tied=False)
    checkpoint = read_gguf(path, keep_quantized=True)
    params = {"group_size": 32} | ({"zero_point": qtype == "Q4_1"} if scheme == "int4-wo" else {})
    assert checkpoint.quantization.params == params
    linears = {n: t for n, t in expected.items() if n.endswith("_proj.weight")}
    # gguf's own dequantiser (expected, rows put back in HF order by the writer) against ours
    # from the kept blocks: float16 zero points of Q4_1 round −m/d to 2^-11 relative.
    _check(checkpoint, {n: torch.from_numpy(t) for n, t in linears.items()}, scheme,
           atol=2e-3 if qtype == "Q4_1" else 1e-6)
    names = checkpoint.tensors.names()
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names  # dequantised
    torch.testing.assert_close(checkpoint.tensors.get("lm_head.weight"),
                               torch.from_numpy(expected["lm_head.weight"]))


def test_gguf_q4_k_is_kept_as_int4_groups_of_32(tmp_path):
    """Q4_K's 8 sub-blocks of 32 (6-bit scales and minimums under a float16 d and dmin) are
    Q4_1's form a sub-block: int4-wo, groups of 32, fractional zero points; against gguf's
    own dequantiser (float16 scales d · sc and zeros round to 2^-11 relative)."""
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "k.gguf"
    expected, _ = write_tiny_gguf(path, qtype=Q.Q4_K, hidden=256, inter=512, heads=4,
                                  kv_heads=2, layers=2, tied=False)
    checkpoint = read_gguf(path, keep_quantized=True)
    assert checkpoint.quantization.params == {"group_size": 32, "zero_point": True}
    assert checkpoint.quantization.unquantized_layers == ()
    linears = {n: torch.from_numpy(t) for n, t in expected.items() if n.endswith("_proj.weight")}
    for name, reference in linears.items():
        got = _dequantized(checkpoint.tensors, name.removesuffix(".weight"), "int4-wo")
        torch.testing.assert_close(got, reference, atol=2e-3 * float(reference.abs().max()),
                                   rtol=0, msg=name)


def test_gguf_q6_k_is_kept_as_int8_groups_of_16(tmp_path):
    """Q6_K's 16 sub-blocks of 16 (int8 scales under a float16 d, 6-bit levels around 32) are
    int8-wo in groups of 16, exactly but for float16 scales d · sc; a Q8_0 linear beside them
    takes the same groups (each block's d twice). Against gguf's own dequantiser."""
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "q6.gguf"
    expected, _ = write_tiny_gguf(path, qtype=Q.Q6_K, hidden=256, inter=512, heads=4,
                                  kv_heads=2, layers=2, tied=False,
                                  qtypes={"blk.1.ffn_up.weight": Q.Q8_0})
    checkpoint = read_gguf(path, keep_quantized=True)
    assert checkpoint.quantization.scheme == "int8-wo"
    assert checkpoint.quantization.params == {"group_size": 16}
    assert checkpoint.tensors.get("model.layers.1.mlp.up_proj.weight_scale").shape == (512, 16)
    for name, reference in expected.items():
        if name.endswith("_proj.weight"):
            got = _dequantized(checkpoint.tensors, name.removesuffix(".weight"), "int8-wo")
            torch.testing.assert_close(got, torch.from_numpy(reference), rtol=0,
                                       atol=1e-3 * float(abs(reference).max()), msg=name)


def test_gguf_keep_refuses_what_it_cannot_keep(tmp_path):
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "f32.gguf"
    write_tiny_gguf(path, qtype=Q.F32)
    with pytest.raises(CheckpointError, match="nothing to keep"):
        read_gguf(path, keep_quantized=True)
    path = tmp_path / "k.gguf"
    write_tiny_gguf(path, qtype=Q.Q5_K, hidden=256, inter=256, heads=4, kv_heads=2)
    with pytest.raises(CheckpointError, match="no linear layer is stored quantised as Q8_0, "
                       "Q6_K, Q4_0, Q4_1 or Q4_K, so there is nothing to keep"):
        read_gguf(path, keep_quantized=True)
