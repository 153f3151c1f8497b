"""`kiln build --quant keep` of quantised checkpoints: the engine's logits match a
full-precision model holding the dequantised weights (transformers for the HF formats, the
dequantising GGUF build for GGUF), and builds refuse a quantised checkpoint without keep and
keep on a full-precision one."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.evaluate.forward import TeacherForcedModel
from tests.checkpoint.quantized_writers import (
    write_awq, write_compressed_tensors, write_gptq, write_modelopt_fp8,
)
from tests.checkpoint.test_gguf import write_tiny_gguf
from tests.helpers import save_tiny_hf_model, tiny_llama_config

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32]
KEEP = BuildConfig(dtype="float32", quant="keep")


def _reference_logits(tmp_path, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' logits with the same seed-0 model and the dequantised linears."""
    model = save_tiny_hf_model(tiny_llama_config(), tmp_path / "reference")
    state = model.state_dict()
    with torch.no_grad():
        for name, weight in expected.items():
            state[name].copy_(weight)
        return model(torch.tensor([PROMPT])).logits[0].float()


def _engine_logits(engine_dir) -> torch.Tensor:
    return TeacherForcedModel(engine_dir, device="cpu", max_window=32).logits(PROMPT)


@pytest.mark.parametrize("fmt, scheme, tolerance", [
    ("awq", "int4-wo", 1e-4),
    ("gptq", "int4-wo", 1e-4),
    ("ct-int4", "int4-wo", 1e-3),  # kiln keeps float16 scales, the package float32 ones
    ("ct-int8", "int8-wo", 1e-3),
    # Activations quantised to E4M3 (3 mantissa bits) at run time: the weights alone match.
    ("ct-fp8", "fp8", 0.1),
    ("modelopt", "fp8", 0.1),
])
def test_keep_builds_run_the_dequantised_weights(tmp_path, fmt, scheme, tolerance):
    source = tmp_path / "source"
    if fmt == "awq":
        expected = write_awq(source)
    elif fmt == "gptq":
        expected = write_gptq(source)
    elif fmt == "modelopt":
        expected = write_modelopt_fp8(source)
    else:
        expected = write_compressed_tensors(source, fmt.removeprefix("ct-"))
    build_engine(source, tmp_path / "engine", KEEP, progress=False)
    quant = open_engine(tmp_path / "engine").manifest["quant"]
    assert quant["scheme"] == scheme and quant["prequantized"] is True
    logits = _engine_logits(tmp_path / "engine")
    reference = _reference_logits(tmp_path, expected)
    error = (logits - reference).norm() / reference.norm()
    assert error < tolerance, f"relative error {error:.2e}"


def _kept_against_dequantised(tmp_path, path) -> tuple[dict, float]:
    """Build the GGUF file with --quant keep and dequantised: the kept engine's quant section
    and the relative error of its logits against the dequantised engine's."""
    build_engine(path, tmp_path / "kept", KEEP, progress=False)
    build_engine(path, tmp_path / "dequantised", BuildConfig(dtype="float32"), progress=False)
    kept, dequantised = _engine_logits(tmp_path / "kept"), _engine_logits(tmp_path / "dequantised")
    error = float((kept - dequantised).norm() / dequantised.norm())
    return open_engine(tmp_path / "kept").manifest["quant"], error


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_keep_matches_the_dequantising_build(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype=qtype, hidden=64, inter=128, heads=4, kv_heads=2, layers=2,
                    vocab=48, tied=True, tokenizer=False)
    quant, error = _kept_against_dequantised(tmp_path, path)
    assert quant["source_format"] == "gguf" and quant["group_size"] == 32
    # Q4_1's zero point −m/d is kept in float16 (weights 4e-4 off, relative; this writer's
    # weights are large and two layers amplify it ~12x in the logits); Q8_0, Q4_0 exact.
    assert error < (1e-2 if qtype == Q.Q4_1 else 1e-5), f"relative error {error:.2e}"


def test_gguf_q4_k_m_style_mix_keeps_q4_k_and_dequantises_the_rest(tmp_path):
    """A Q4_K_M-style file: Q4_K linears, with layer 0's v and layer 1's down stored as Q6_K.
    The Q4_K ones stay int4; the Q6_K ones, and q and k fused with layer 0's v, are read
    dequantised and their layers kept in full precision (named in the manifest, warned
    about); the engine's logits match the build that dequantises everything."""
    from kiln.checkpoint.gguf import read_gguf

    path = tmp_path / "k_m.gguf"
    write_tiny_gguf(path, qtype=Q.Q4_K, hidden=256, inter=512, heads=4, kv_heads=2, layers=2,
                    vocab=48, tied=True, tokenizer=False,
                    qtypes={"blk.0.attn_v.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q6_K})
    with pytest.warns(UserWarning, match=r"one scheme an engine; 2 Q6_K linears and 2 fused "
                      r"with them are read dequantised"):
        quantization = read_gguf(path, keep_quantized=True).quantization
    assert quantization.unquantized_layers == ("model.layers.0.self_attn.qkv_proj",
                                               "model.layers.1.mlp.down_proj")
    with pytest.warns(UserWarning, match="Q6_K"):
        quant, error = _kept_against_dequantised(tmp_path, path)
    assert quant["scheme"] == "int4-wo" and quant["zero_point"] is True
    assert quant["unquantized_layers"] == list(quantization.unquantized_layers)
    assert error < 1e-2, f"relative error {error:.2e}"  # float16 scales and zeros, as Q4_1


def test_gguf_with_8_bit_and_4_bit_linears_keeps_the_4_bit_ones(tmp_path):
    """One scheme an engine: a Q4_0 file with a Q8_0 down projection (llama.cpp's mixed
    files) keeps the Q4_0 linears as int4-wo and reads the Q8_0 one dequantised (warned
    about, named in the manifest), instead of refusing the file."""
    from kiln.checkpoint.gguf import read_gguf

    path = tmp_path / "mixed.gguf"
    write_tiny_gguf(path, qtype=Q.Q4_0, hidden=64, inter=128, heads=4, kv_heads=2, layers=2,
                    tokenizer=False, qtypes={"blk.1.ffn_down.weight": Q.Q8_0})
    with pytest.warns(UserWarning, match=r"\(as int8-wo\), one scheme an engine; 1 Q8_0 "
                      r"linears are read dequantised"):
        quantization = read_gguf(path, keep_quantized=True).quantization
    assert quantization.scheme == "int4-wo"
    assert quantization.unquantized_layers == ("model.layers.1.mlp.down_proj",)
    with pytest.warns(UserWarning, match="Q8_0"):
        _, error = _kept_against_dequantised(tmp_path, path)
    assert error < 1e-5, f"relative error {error:.2e}"  # Q4_0 and Q8_0 both exact


def test_gguf_q6_k_keep_matches_the_dequantising_build(tmp_path):
    """A Q6_K file with a Q8_0 linear: int8-wo in groups of 16 end to end."""
    path = tmp_path / "q6.gguf"
    write_tiny_gguf(path, qtype=Q.Q6_K, hidden=256, inter=512, heads=4, kv_heads=2, layers=2,
                    vocab=48, tied=True, tokenizer=False, qtypes={"blk.0.attn_q.weight": Q.Q8_0})
    quant, error = _kept_against_dequantised(tmp_path, path)
    assert quant["scheme"] == "int8-wo" and quant["group_size"] == 16
    assert error < 1e-2, f"relative error {error:.2e}"  # float16 scales d · sc


def test_quantised_checkpoint_needs_keep_and_keep_needs_a_quantised_one(tmp_path):
    write_awq(tmp_path / "awq")
    with pytest.raises(KilnError, match="is a quantised checkpoint .*build it with --quant keep"):
        build_engine(tmp_path / "awq", tmp_path / "e", BuildConfig(dtype="float32"), progress=False)
    save_tiny_hf_model(tiny_llama_config(), tmp_path / "plain")
    with pytest.raises(KilnError, match="--quant keep: .* is not a quantised checkpoint"):
        build_engine(tmp_path / "plain", tmp_path / "e", KEEP, progress=False)
    assert not (tmp_path / "e").exists()
