"""`kiln build --quant SCHEME --quant-lm-head`: the LM head quantised with the build's scheme
(an untied head in place; a tied model's head as its own quantised copy, the embedding kept
in the compute dtype), matching Hugging Face with the dequantised matrices; refused without a
scheme and with --tp/--pp."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kiln.cli import main
from kiln.compiler.manifest import open_engine
from kiln.kernels.quant_linear import dequantize_int8
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import make_cpu_engine, run_to_completion, save_tiny_hf_model, tiny_llama_config
from tests.quant.quant_helpers import (
    build,
    dequantised_weights,
    hf_logits_with,
    logits_of,
    relative_error,
    tiny_quant_llama,
)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    directory = tmp_path_factory.mktemp("head")
    hf_dir = tiny_quant_llama(directory)
    return hf_dir, build(hf_dir, directory / "int8-head", quant="int8-wo", quant_lm_head=True)


def head_weight(engine_dir) -> torch.Tensor:
    tensors = load_file(str(open_engine(engine_dir).rank_file(0)))
    assert tensors["lm_head.weight"].dtype == torch.int8
    return dequantize_int8(tensors["lm_head.weight"], tensors["lm_head.weight_scale"])


def test_untied_head_is_quantised_and_matches_hugging_face(untied):
    hf_dir, engine_dir = untied
    manifest = json.loads((engine_dir / "engine.json").read_text())
    assert manifest["quant"]["quantize_lm_head"] is True
    weights = dequantised_weights(engine_dir) | {"lm_head.weight": head_weight(engine_dir)}
    assert relative_error(logits_of(engine_dir), hf_logits_with(hf_dir, weights)) < 1e-5


def test_tied_head_gets_its_own_quantised_copy(tmp_path):
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                               num_key_value_heads=2, tie_word_embeddings=True)
    hf_dir = tmp_path / "hf"
    save_tiny_hf_model(config, hf_dir)
    plain = build(hf_dir, tmp_path / "plain", quant="int8-wo")
    quantised = build(hf_dir, tmp_path / "head", quant="int8-wo", quant_lm_head=True)
    tensors = load_file(str(open_engine(quantised).rank_file(0)))
    embedding = tensors["model.embed_tokens.weight"]
    assert embedding.dtype == torch.bfloat16  # the lookup keeps the compute dtype
    assert relative_error(head_weight(quantised), embedding.float()) < 0.01
    assert relative_error(logits_of(quantised), logits_of(plain)) < 0.03
    engine = make_cpu_engine(quantised)
    try:
        [output] = run_to_completion(engine, [[3, 17, 42]], [SamplingParams(temperature=0,
                                                                           max_tokens=4)])
        assert len(output.outputs[0].token_ids) == 4
    finally:
        engine.close()


def test_quant_lm_head_without_a_scheme_or_with_tp_is_refused(untied, tmp_path, capsys):
    hf_dir, _ = untied
    for extra, message in ((["--quant-lm-head"], "--quant-lm-head quantises the LM head with"),
                           (["--quant", "int8-wo", "--quant-lm-head", "--tp", "2"],
                            "--quant-lm-head is not supported with --tp/--pp")):
        out = tmp_path / "e"
        assert main(["build", str(hf_dir), "-o", str(out), *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()


def test_random_weight_build_quantises_the_head_too(untied, tmp_path):
    hf_dir, _ = untied
    engine_dir = build(hf_dir, tmp_path / "random", quant="int4-wo", quant_lm_head=True,
                       random_weights=True)
    tensors = load_file(str(open_engine(engine_dir).rank_file(0)))
    assert "lm_head.qweight" in tensors and "lm_head.weight" not in tensors
    assert torch.isfinite(logits_of(engine_dir)).all()
