"""`kiln build --quant ...` and `--kv-cache-dtype fp8`: flags, manifest, random weights with
every scheme, `kiln inspect`, an FP8 KV cache in a CPU engine, layers kept unquantised
(`--unquantized-layers`), and bad input answered with one line and no engine directory left
behind."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from kiln.cli import main
from kiln.compiler.manifest import open_engine
from kiln.runtime.kv_tensors import KVCacheSpec
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import make_cpu_engine, run_to_completion, tiny_llama_config
from tests.quant.quant_helpers import (
    build, dequantised_weights, hf_logits_with, logits_of, relative_error, tiny_quant_llama,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_quant_llama(tmp_path_factory.mktemp("build"))


def _fails_with(capsys, argv, message, output):
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not output.exists()  # no partial engine
    return errors[0]


def test_group_size_that_does_not_divide_a_layer_is_refused(hf_dir, tmp_path, capsys):
    out = tmp_path / "e"
    error = _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--quant", "int4-wo",
                                 "--group-size", "48"], "group size 48 does not divide", out)
    # the sizes that would fit that layer (hidden size 128 here), none that would not
    assert error.endswith("input size (this layer's: 16, 32, 64, 128)"), error


def test_unknown_scheme_and_misplaced_flags_are_refused(hf_dir, tmp_path, capsys):
    out = tmp_path / "e"
    _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--quant", "int3"],
                "unknown quantisation scheme 'int3'", out)
    _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--quant", "fp8",
                         "--group-size", "64"], "takes no --group-size", out)
    _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--quant", "fp8",
                         "--act-scales", "static"], "--act-scales static needs --calibration",
                out)
    _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--quant", "keep"],
                "is not a quantised checkpoint", out)


def test_fp8_on_a_gpu_before_sm89_is_refused(hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    out = tmp_path / "e"
    for flags in (["--quant", "fp8"], ["--kv-cache-dtype", "fp8"]):
        _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), *flags],
                    "FP8 needs a GPU of compute capability 8.9", out)


def test_calibration_call_site_says_when_calibration_is_missing(hf_dir, tmp_path, capsys,
                                                                monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "kiln.quant.calibration" else real_find_spec(name, *a))
    out = tmp_path / "e"
    _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--quant", "int4-wo",
                         "--calibration", "sharegpt"], "calibration is not available", out)


@pytest.mark.parametrize("scheme", ["fp8", "int8-wo", "int4-wo"])
def test_random_weight_builds_with_every_scheme_generate(scheme, tmp_path, capsys):
    config = tmp_path / "config.json"
    hf_config = tiny_llama_config(hidden_size=128, intermediate_size=256,
                                  num_attention_heads=4, num_key_value_heads=2).to_dict()
    config.write_text(json.dumps({**hf_config, "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "engine"
    flags = ["--group-size", "64"] if scheme == "int4-wo" else []
    assert main(["build", str(config), "-o", str(out), "--random-weights", "--quant", scheme,
                 *flags]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"quant       {scheme}:" in capsys.readouterr().out
    engine = make_cpu_engine(out)
    [output] = run_to_completion(engine, [[1, 2, 3]], [SamplingParams(max_tokens=4,
                                                                      ignore_eos=True)])
    assert len(output.outputs[0].token_ids) == 4


def test_fp8_kv_cache_build_runs_an_engine_with_half_the_kv_bytes(hf_dir, tmp_path, capsys):
    plain = build(hf_dir, tmp_path / "plain")
    fp8_kv = build(hf_dir, tmp_path / "fp8-kv", quant="int8-wo", kv_cache_dtype="fp8")
    manifest = open_engine(fp8_kv).manifest
    assert manifest["build"]["kv_cache_dtype"] == "fp8"
    assert manifest["build"]["kv_scales"] == {"k": [1.0, 1.0], "v": [1.0, 1.0],
                                              "calibrated": False}
    assert main(["inspect", str(fp8_kv)]) == 0
    assert "KV cache fp8 (scales 1.0, uncalibrated)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="uncalibrated scales"):
        engine = make_cpu_engine(fp8_kv)
    assert engine.kv_cache_dtype == torch.float8_e4m3fn
    assert all(cache.dtype == torch.float8_e4m3fn for cache in engine.runner.kv_caches)
    spec = engine.runner.kv_cache_spec
    bf16_spec = KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.bfloat16)
    assert spec.bytes_per_block(16) * 2 == bf16_spec.bytes_per_block(16)
    outputs = run_to_completion(engine, [[1, 2, 3], [4, 5, 6, 7, 8]],
                                [SamplingParams(max_tokens=5, ignore_eos=True)] * 2)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5]
    # An FP8 cache on an engine built without it, asked for at run time.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = make_cpu_engine(plain, kv_cache_dtype="fp8")
    assert engine.kv_cache_dtype == torch.float8_e4m3fn


def test_fp8_kv_cache_defaults_to_32_token_blocks_unless_the_block_size_is_set(hf_dir,
                                                                                tmp_path):
    from kiln.config import DEFAULT_BLOCK_SIZE, FP8_KV_DEFAULT_BLOCK_SIZE, EngineConfig
    from kiln.runtime.engine import LLMEngine

    plain = build(hf_dir, tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8 KV scales of 1.0
        fp8 = LLMEngine(open_engine(plain), EngineConfig(device="cpu", kv_cache_dtype="fp8"))
        chosen = LLMEngine(open_engine(plain),
                           EngineConfig(device="cpu", kv_cache_dtype="fp8", block_size=8))
    bf16 = LLMEngine(open_engine(plain), EngineConfig(device="cpu"))
    assert FP8_KV_DEFAULT_BLOCK_SIZE == 32 != DEFAULT_BLOCK_SIZE
    assert fp8.config.block_size == fp8.scheduler.config.block_size == 32
    assert fp8.runner.kv_caches[0].shape[2] == 32
    assert chosen.config.block_size == chosen.runner.kv_caches[0].shape[2] == 8
    assert bf16.config.block_size == bf16.runner.kv_caches[0].shape[2] == DEFAULT_BLOCK_SIZE
    outputs = run_to_completion(fp8, [list(range(1, 40))],
                                [SamplingParams(max_tokens=5, ignore_eos=True)])
    assert len(outputs[0].outputs[0].token_ids) == 5


def test_fp8_kv_cache_logits_stay_close_and_use_the_recorded_scales(hf_dir, tmp_path,
                                                                    monkeypatch):
    plain = build(hf_dir, tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp8 = logits_of(plain, kv_cache_dtype="fp8")
    reference = logits_of(plain)
    assert 0 < relative_error(fp8, reference) < 0.06
    # Calibrated scales (calibration sets them on the attention layers; here, as if it had)
    # are recorded in the manifest and are what the layers get at load.
    from kiln.compiler import builder

    calibrated = {"k": [0.02, 0.03], "v": [0.01, 0.01], "calibrated": True}
    monkeypatch.setattr(builder, "kv_scales_of", lambda model, calibrated_flag: calibrated)
    engine = build(hf_dir, tmp_path / "scaled", kv_cache_dtype="fp8")
    assert open_engine(engine).manifest["build"]["kv_scales"] == calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no warning
        scaled = logits_of(engine)
    assert 0 < relative_error(scaled, reference) < 0.06
    assert not torch.equal(scaled, fp8)


def test_random_weight_builds_of_one_seed_hold_the_same_model_in_every_scheme(tmp_path):
    """--random-weights draws in the model's parameter order whatever the scheme, a quantised
    layer's weight whole at its turn: so the quantised build is the bf16 build quantised, and
    comparing them (kiln eval --compare on the random 8B) measures quantisation. Before, the
    quantised layers' weights were drawn after everything else: other embeddings, other
    matrices, an unrelated model (0 % top-1 agreement on the H200)."""
    config = tmp_path / "config.json"
    hf_config = tiny_llama_config(hidden_size=128, intermediate_size=256,
                                  num_attention_heads=4, num_key_value_heads=2).to_dict()
    config.write_text(json.dumps({**hf_config, "architectures": ["LlamaForCausalLM"]}))
    plain = build(config, tmp_path / "bf16", random_weights=True, seed=3)
    reference = logits_of(plain)
    embedding = load_file(plain / "rank0.safetensors")["model.embed_tokens.weight"]
    errors = {}
    for scheme, flags in (("fp8", {}), ("int8-wo", {}), ("int4-wo", {"group_size": 64})):
        out = build(config, tmp_path / scheme, random_weights=True, seed=3, quant=scheme,
                    **flags)
        tensors = load_file(out / "rank0.safetensors")
        assert torch.equal(tensors["model.embed_tokens.weight"], embedding), scheme
        errors[scheme] = relative_error(logits_of(out), reference)
    other_seed = logits_of(build(config, tmp_path / "seed4", random_weights=True, seed=4))
    unrelated = relative_error(other_seed, reference)
    # Quantisation error only (measured 0.012 / 0.072 / 0.17), far from another seed's (1.4).
    assert errors["int8-wo"] < 0.03 and errors["fp8"] < 0.15 and errors["int4-wo"] < 0.3, errors
    assert unrelated > 0.5, unrelated


def test_unquantized_layers_stay_as_the_plain_build_stores_them(hf_dir, tmp_path, capsys):
    plain = load_file(build(hf_dir, tmp_path / "plain") / "rank0.safetensors")
    out = tmp_path / "mixed"
    assert main(["build", str(hf_dir), "-o", str(out), "--quant", "int8-wo",
                 "--unquantized-layers", "model.layers.1.mlp.down_proj",
                 "--unquantized-layers", "model.layers.0.self_attn"]) == 0
    kept = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.1.mlp.down_proj"]  # model order, whatever the flags' order
    manifest = open_engine(out).manifest
    assert manifest["quant"]["unquantized_layers"] == kept
    assert manifest["build"]["unquantized_layers"] == ["model.layers.1.mlp.down_proj",
                                                       "model.layers.0.self_attn"]
    tensors = load_file(out / "rank0.safetensors")
    quantised = [f"model.layers.{i}.{name}" for i in range(2) for name in
                 ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    for layer in quantised:
        if layer in kept:
            assert torch.equal(tensors[f"{layer}.weight"], plain[f"{layer}.weight"]), layer
            assert f"{layer}.weight_scale" not in tensors
        else:
            assert tensors[f"{layer}.weight"].dtype == torch.int8, layer
    # The engine computes the model with exactly these weights (the HF oracle).
    expected = hf_logits_with(hf_dir, dequantised_weights(out))
    assert relative_error(logits_of(out), expected) < 1e-5
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"unquantized_layers {kept}" in capsys.readouterr().out  # three: in full
    many = tmp_path / "many"  # more than four: a count, the first three and the last
    assert main(["build", str(hf_dir), "-o", str(many), "--quant", "int8-wo",
                 "--unquantized-layers", "model.layers.*"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(many)]) == 0
    assert ("unquantized_layers 8 layers (model.layers.0.self_attn.qkv_proj, "
            "model.layers.0.self_attn.o_proj, model.layers.0.mlp.gate_up_proj, ..., "
            "model.layers.1.mlp.down_proj)") in capsys.readouterr().out


def test_unquantized_layers_that_match_nothing_or_need_a_scheme_are_refused(hf_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "e"
    int8 = ["build", str(hf_dir), "-o", str(out), "--quant", "int8-wo"]
    _fails_with(capsys, [*int8, "--unquantized-layers", "model.layers.1.mlp.gate_proj"],
                "kiln fuses q_proj, k_proj and v_proj into qkv_proj (gate_proj and up_proj "
                "into gate_up_proj) and quantises a fused layer whole; name "
                "'model.layers.1.mlp.gate_up_proj'", out)
    _fails_with(capsys, [*int8, "--unquantized-layers", "model.layers.0,layers.1"],
                "--unquantized-layers 'layers.1' matches none of this model's 8 quantisable "
                "layers (model.layers.0.self_attn.qkv_proj,", out)
    _fails_with(capsys, [*int8, "--unquantized-layers", "model.layers.0,"],
                "--unquantized-layers has an empty layer name", out)
    error = _fails_with(capsys, ["build", str(hf_dir), "-o", str(out), "--unquantized-layers",
                                 "model.layers.0"], "it needs --quant fp8, int8-wo or int4-wo",
                        out)
    assert "(got {" not in error  # a whole-config check does not trail every field's value


def test_unquantized_layer_patterns_are_names_prefixes_or_globs():
    from kiln.quant.layer_selection import select_layers

    kinds = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    names = [f"model.layers.{i}.{kind}" for i in range(12) for kind in kinds]
    assert select_layers(["model.layers.11.mlp.down_proj"], names) == (names[-1],)
    # A prefix ends at a dot: layer 1 is not layers 10 and 11.
    assert select_layers(["model.layers.1"], names) == tuple(names[4:8])
    downs = tuple(name for name in names if name.endswith("down_proj"))
    assert select_layers(["model.layers.*.mlp.down_proj"], names) == downs
    assert select_layers(["*down_proj"], names) == downs  # * crosses dots
    # Overlapping patterns: each layer once, in model order.
    assert select_layers(["model.layers.1?.mlp.down_proj", "model.layers.10"], names) == (
        *names[40:44], names[47])
