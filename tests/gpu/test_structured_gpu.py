"""Structured outputs on the GPU: the token bitmask applied on the device equals the CPU's,
and a bf16 engine with CUDA graphs and overlap scheduling (the GPU defaults) produces outputs
that follow their grammars while unconstrained rows run beside them. The tokenizer is a
small byte-level BPE trained here (the GPU machine has no model packages)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kiln.structured.bitmask import allocate_token_bitmask, apply_token_bitmask

pytest.importorskip("xgrammar")


def test_bitmask_on_the_device_equals_the_host():
    generator = torch.Generator().manual_seed(0)
    vocab_size = 128_256 + 5
    bitmask = allocate_token_bitmask(64, vocab_size)
    bitmask.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.shape, generator=generator,
                                dtype=torch.int64).to(torch.int32))
    logits = torch.randn(64, vocab_size, generator=generator)
    expected = logits.clone()
    apply_token_bitmask(expected, bitmask)
    for dtype in (torch.float32, torch.bfloat16):
        on_device = logits.to("cuda", dtype)
        apply_token_bitmask(on_device, bitmask.pin_memory().to("cuda", non_blocking=True))
        assert torch.equal(on_device.isinf().cpu(), expected.isinf())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kiln.compiler.builder import build_engine
    from kiln.config import BuildConfig, EngineConfig
    from kiln.runtime.engine import LLMEngine
    from tests.helpers import save_tiny_hf_model, tiny_llama_config

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ['{"name": "alpha", "value": 12, "tags": ["x", "y"]}', "the quick brown fox"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    directory = tmp_path_factory.mktemp("structured-gpu")
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=len(fast) + 40, max_position_embeddings=1024,
                               eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    save_tiny_hf_model(config, directory / "hf")
    fast.save_pretrained(directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="bfloat16"),
                 progress=False)
    llm_engine = LLMEngine.from_engine_dir(directory / "engine", EngineConfig(
        device="cuda", max_num_seqs=64, num_kv_blocks=512, max_model_len=1024))
    yield llm_engine
    llm_engine.close()


def test_engine_follows_grammars_with_graphs_and_overlap(engine):
    from kiln.runtime.sampling_params import SamplingParams
    from kiln.structured import StructuredOutputsParams
    from tests.helpers import run_to_completion

    assert engine.overlap_scheduling and engine.runner.graphs is not None
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "value": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
        "required": ["name", "value", "tags"], "additionalProperties": False}
    params = []
    for index in range(48):
        constraint = (StructuredOutputsParams(json=schema) if index % 3 == 0 else
                      StructuredOutputsParams(regex=r"[a-f]{2,6}-[0-9]{2}") if index % 3 == 1
                      else None)
        params.append(SamplingParams(temperature=1.0, seed=index, max_tokens=96,
                                     structured_outputs=constraint))
    outputs = run_to_completion(engine, [[1, 2, 3]] * len(params), params)
    for index, output in enumerate(outputs):
        completion = output.outputs[0]
        if index % 3 == 2:
            continue  # unconstrained
        assert completion.finish_reason == "stop", (index, completion.text)
        if index % 3 == 0:
            value = json.loads(completion.text)
            assert set(value) == {"name", "value", "tags"} and 0 <= value["value"] <= 99
        else:
            assert re.fullmatch(r"[a-f]{2,6}-[0-9]{2}", completion.text), completion.text
