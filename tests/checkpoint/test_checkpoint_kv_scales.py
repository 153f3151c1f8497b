"""FP8 KV-cache scales stored in quantised checkpoints (compressed-tensors `kv_cache_scheme`,
ModelOpt `kv_cache_quant_algo: FP8`), kept by `kiln build --quant keep`: the manifest records
them, the FP8 cache runs with them (no "uncalibrated" warning), chosen at build or at serve
time; a declaration kiln cannot honour, or scales missing, non-finite or not positive, is one
line naming the field or tensor."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.checkpoint.hf import read_hf_directory
from kiln.cli import main
from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from kiln.runtime.sampling_params import SamplingParams
from tests.checkpoint.quantized_writers import write_compressed_tensors, write_modelopt_fp8
from tests.helpers import make_cpu_engine, run_to_completion

K_SCALES, V_SCALES = [0.011, 0.013], [0.017, 0.019]  # the tiny Llama's 2 layers
FP8_KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                 "symmetric": True}


def add_kv_cache_scheme(directory: Path, scheme: dict | None = FP8_KV_SCHEME,
                        k_scales=K_SCALES, v_scales=V_SCALES,
                        name: str = "self_attn.{kind}_scale") -> None:
    """What llm-compressor writes for an FP8 KV cache: kv_cache_scheme in the config and one
    k_scale / v_scale on each attention module (the names compressed-tensors registers;
    earlier versions: self_attn.{kind}_proj.output_scale)."""
    path = directory / "model.safetensors"
    state = load_file(path)
    for layer, (k, v) in enumerate(zip(k_scales, v_scales)):
        for kind, value in (("k", k), ("v", v)):
            if value is not None:
                state[f"model.layers.{layer}.{name.format(kind=kind)}"] = torch.tensor([value])
    save_file(state, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = scheme
    (directory / "config.json").write_text(json.dumps(config))


def keep(source: Path, output: Path, **options) -> Path:
    build_engine(source, output, BuildConfig(dtype="float32", quant="keep", **options),
                 progress=False)
    return output


def attention_scales(engine) -> tuple[list[float], list[float]]:
    layers = [m for m in engine.runner.model.modules() if hasattr(m, "k_scale")]
    return ([round(float(m.k_scale), 6) for m in layers],
            [round(float(m.v_scale), 6) for m in layers])


def generate(engine) -> int:
    [output] = run_to_completion(engine, [[1, 2, 3, 4, 5]],
                                 [SamplingParams(max_tokens=4, ignore_eos=True)])
    return len(output.outputs[0].token_ids)


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_compressed_tensors_kv_scales_are_kept_and_used(tmp_path, capsys, kind):
    source = tmp_path / "source"
    write_compressed_tensors(source, kind)
    add_kv_cache_scheme(source)
    quantization = read_hf_directory(source).quantization
    assert quantization.kv_cache == "fp8"
    assert quantization.kv_scales == tuple(pytest.approx(pair) for pair in zip(K_SCALES, V_SCALES))
    engine_dir = keep(source, tmp_path / "engine", kv_cache_dtype="fp8")
    recorded = open_engine(engine_dir).manifest["build"]["kv_scales"]
    assert recorded == {"k": pytest.approx(K_SCALES), "v": pytest.approx(V_SCALES),
                        "calibrated": False, "source": "checkpoint"}
    assert main(["inspect", str(engine_dir)]) == 0
    assert "KV cache fp8 (the checkpoint's scales)" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "uncalibrated scales" warning
        engine = make_cpu_engine(engine_dir)
    assert engine.kv_cache_dtype == torch.float8_e4m3fn
    assert attention_scales(engine) == (K_SCALES, V_SCALES)
    assert generate(engine) == 4


def test_scales_kept_by_a_bf16_cache_build_serve_an_fp8_cache_chosen_at_run_time(tmp_path):
    source = tmp_path / "source"
    write_compressed_tensors(source, "fp8")
    add_kv_cache_scheme(source)
    engine_dir = keep(source, tmp_path / "engine")
    manifest = open_engine(engine_dir).manifest["build"]
    assert manifest["kv_cache_dtype"] == "auto" and manifest["kv_scales"]["source"] == "checkpoint"
    assert make_cpu_engine(engine_dir).kv_cache_dtype == torch.float32  # the build's choice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = make_cpu_engine(engine_dir, kv_cache_dtype="fp8")
    assert attention_scales(engine) == (K_SCALES, V_SCALES)
    assert generate(engine) == 4


def test_modelopt_fp8_kv_scales(tmp_path):
    source = tmp_path / "source"
    write_modelopt_fp8(source)  # k_proj.k_scale / v_proj.v_scale = 0.01, kv algo FP8
    quantization = read_hf_directory(source).quantization
    assert quantization.kv_cache == "fp8"
    assert quantization.kv_scales == (pytest.approx((0.01, 0.01)),) * 2
    engine_dir = keep(source, tmp_path / "engine", kv_cache_dtype="fp8")
    assert open_engine(engine_dir).manifest["build"]["kv_scales"]["k"] == pytest.approx([0.01] * 2)
    hf_quant = json.loads((source / "hf_quant_config.json").read_text())
    hf_quant["quantization"]["kv_cache_quant_algo"] = None  # no FP8 cache declared
    (source / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    quantization = read_hf_directory(source).quantization
    assert quantization.kv_cache is None and quantization.kv_scales == ()


def test_earlier_llm_compressor_output_scale_names(tmp_path):
    source = tmp_path / "source"
    write_compressed_tensors(source, "fp8")
    add_kv_cache_scheme(source, name="self_attn.{kind}_proj.output_scale")
    checkpoint = read_hf_directory(source)
    assert checkpoint.quantization.kv_scales == tuple(
        pytest.approx(pair) for pair in zip(K_SCALES, V_SCALES))
    assert not any(n.endswith("output_scale") for n in checkpoint.tensors.names())
    engine_dir = keep(source, tmp_path / "engine", kv_cache_dtype="fp8")
    assert open_engine(engine_dir).manifest["build"]["kv_scales"]["v"] == pytest.approx(V_SCALES)


def test_per_head_scales_keep_the_largest(tmp_path):
    source = tmp_path / "source"
    write_compressed_tensors(source, "fp8")
    add_kv_cache_scheme(source, {**FP8_KV_SCHEME, "strategy": "attn_head"})
    state = load_file(source / "model.safetensors")
    state["model.layers.1.self_attn.v_scale"] = torch.tensor([[0.02], [0.05]])  # 2 heads
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    assert read_hf_directory(source).quantization.kv_scales[1] == pytest.approx((0.013, 0.05))


@pytest.mark.parametrize("change, message", [
    ({"scheme": {**FP8_KV_SCHEME, "type": "int"}},
     "quantization_config.kv_cache_scheme.type = 'int': only an FP8 (8-bit float) KV cache "
     "is supported"),
    ({"scheme": {**FP8_KV_SCHEME, "dynamic": True}},
     "quantization_config.kv_cache_scheme.dynamic = True: kiln's FP8 KV cache needs static "
     "scales stored in the checkpoint"),
    ({"scheme": {**FP8_KV_SCHEME, "strategy": "channel"}},
     "quantization_config.kv_cache_scheme.strategy = 'channel': expected tensor or attn_head"),
    ({"scheme": "fp8"}, "quantization_config.kv_cache_scheme = 'fp8': expected an object"),
    ({"v_scales": [0.017, None]}, "declares an FP8 KV cache, but layer 1 has no v_scale tensor"),
    ({"k_scales": [float("nan"), 0.013]},
     "tensor model.layers.0.self_attn.k_scale has 1 non-finite value"),
    ({"k_scales": [0.011, 0.0]},
     "tensor model.layers.1.self_attn.k_scale = [0.0]: expected positive KV-cache scales"),
])
def test_kv_cache_declarations_kiln_cannot_honour_are_refused(tmp_path, capsys, change,
                                                                message):
    source = tmp_path / "source"
    write_compressed_tensors(source, "fp8")
    add_kv_cache_scheme(source, **change)
    with pytest.raises(CheckpointError) as error:
        read_hf_directory(source)
    assert message in str(error.value) and "\n" not in str(error.value)
    code = main(["build", str(source), "-o", str(tmp_path / "engine"), "--quant", "keep"])
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "engine").exists()


def test_modelopt_kv_algorithm_other_than_fp8_is_refused(tmp_path):
    source = tmp_path / "source"
    write_modelopt_fp8(source)
    hf_quant = json.loads((source / "hf_quant_config.json").read_text())
    hf_quant["quantization"]["kv_cache_quant_algo"] = "INT8"
    (source / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    with pytest.raises(CheckpointError, match=r"quantization.kv_cache_quant_algo = 'INT8': "
                       "only an FP8 KV cache \\(or none\\) is supported"):
        read_hf_directory(source)
