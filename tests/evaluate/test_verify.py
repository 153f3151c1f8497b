"""`kiln verify`: an engine against itself is exact everywhere; against a copy whose one
layer was changed, the first layer over the threshold is that layer (and that block)."""

from __future__ import annotations

import torch

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from kiln.evaluate.forward import TeacherForcedModel
from kiln.evaluate.layer_diff import compare_runs
from tests.helpers import save_tiny_hf_model, tiny_llama_config

PROMPT = [5, 17, 3, 42, 8, 9, 60, 1]


def _engines(tmp_path):
    config = tiny_llama_config(num_hidden_layers=3)
    model = save_tiny_hf_model(config, tmp_path / "hf")
    build_engine(tmp_path / "hf", tmp_path / "a", BuildConfig(dtype="float32"), progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "hf_changed", safe_serialization=True)
    build_engine(tmp_path / "hf_changed", tmp_path / "b", BuildConfig(dtype="float32"), progress=False)
    return tmp_path / "a", tmp_path / "b"


def test_verify_finds_the_layer_that_changed(tmp_path):
    original, changed = _engines(tmp_path)
    a = TeacherForcedModel(original, device="cpu", max_window=16)
    b = TeacherForcedModel(changed, device="cpu", max_window=16)

    same = compare_runs(a, PROMPT, against=a, threshold=0.01, engine_name="a", reference_name="a")
    assert same.first_diverged is None
    assert all(e == 0.0 for d in same.layers for e in d.errors.values())

    report = compare_runs(b, PROMPT, against=a, threshold=0.01, engine_name="b", reference_name="a")
    assert report.first_diverged == (1, "mlp")
    assert report.layers[0].errors == {"attn": 0.0, "mlp": 0.0, "residual": 0.0}
    assert report.layers[2].errors["attn"] > 0.0  # everything downstream moves
    text = report.format()
    assert "first layer over 0.01: layer 1 (mlp)" in text
    assert len([line for line in text.splitlines() if "< over" in line]) == 2  # layers 1, 2


def test_reference_kernels_on_the_cpu_are_the_same_run(tmp_path):
    original, _ = _engines(tmp_path)
    a = TeacherForcedModel(original, device="cpu", max_window=16)
    report = compare_runs(a, PROMPT, against=None, threshold=1e-6, engine_name="fast",
                          reference_name="reference")
    assert report.first_diverged is None
    assert report.last_token_agrees
